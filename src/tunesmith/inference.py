"""Generate text with a (tuned) model: batched generation, an interactive chat, a tuned/base comparison.

Prompts are formatted with the tokenizer's own chat template (the one saved with the model or
run), so the model sees exactly the format it was trained on. A tokenizer without a template
(a base model trained with `pretrain`) gets the raw prompt text.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer


def format_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], system_prompt: str | None = None
) -> str:
    """The text the model sees for `messages`, ending with the assistant turn's opening."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if tokenizer.chat_template is None:
        # No template: a plain LM continues the text (the system prompt, if any, leads it).
        return "\n\n".join(message["content"] for message in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos of the tokenizer and of the generation config, and `<|im_end|>` when the vocab has it
    (ChatML models whose eos is `<|endoftext|>` still end a turn with `<|im_end|>`)."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for candidate in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if candidate is not None and candidate not in ids:
            ids.append(int(candidate))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


def _generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The model's generation config with our decoding settings; greedy when temperature is 0."""
    config = copy.deepcopy(model.generation_config)
    sampling = temperature > 0
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        # Unset sampling knobs when greedy so transformers does not warn that they are ignored.
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return config


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase):
    """Decoder-only generation continues from the last position, so padding must be on the left."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> list[str]:
    """One answer per prompt (only the new text), in order; greedy when temperature is 0."""
    texts = [format_chat(tokenizer, [{"role": "user", "content": prompt}], system_prompt) for prompt in prompts]
    config = _generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    device = _device_of(model)
    answers: list[str] = []
    with _left_padding(tokenizer):
        for start in range(0, len(texts), batch_size):
            # The chat template already writes any special tokens the model expects.
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=tokenizer.chat_template is None,
            ).to(device)
            output = model.generate(**batch, generation_config=config)  # (B, T_prompt + T_new)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


class _CallbackStreamer(TextStreamer):
    """Sends each finished piece of decoded text to a callable instead of printing it, and keeps it."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.pieces.append(text)
            self.write(text)


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _print_piece,
) -> list[dict[str, str]]:
    """Interactive chat: read a line, stream the answer, keep the history; returns the history.

    `/exit` (or `/quit`), Ctrl-D and Ctrl-C end it; `/reset` clears the history. `read(prompt)`
    and `write(text)` default to the terminal and can be replaced (tests, other front ends).
    """
    config = _generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    device = _device_of(model)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            write("(history cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        text = format_chat(tokenizer, history, system_prompt)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=tokenizer.chat_template is None).to(device)
        streamer = _CallbackStreamer(tokenizer, write)
        write("model> ")
        try:
            with torch.inference_mode():
                model.generate(**batch, generation_config=config, streamer=streamer)
        except KeyboardInterrupt:  # stop this answer, keep what was said
            pass
        write("\n")
        history.append({"role": "assistant", "content": "".join(streamer.pieces).strip()})
    return history


@dataclass(frozen=True)
class ComparedAnswer:
    prompt: str
    tuned: str
    base: str


def compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    base_model: PreTrainedModel | None = None,
    base_tokenizer: PreTrainedTokenizerBase | None = None,
    **generate_kwargs,
) -> list[ComparedAnswer]:
    """Answers of the tuned and the base model to the same prompts, with the same decoding.

    For a peft model, `base_model` may be left out: the base answers come from the same model with
    its adapters disabled, so no second copy is loaded.
    """
    tuned = generate(model, tokenizer, prompts, **generate_kwargs)
    if base_model is not None:
        base = generate(base_model, base_tokenizer or tokenizer, prompts, **generate_kwargs)
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = generate(model, base_tokenizer or tokenizer, prompts, **generate_kwargs)
    else:
        raise ValueError("compare: give base_model, or a peft model whose adapters can be disabled")
    return [ComparedAnswer(prompt, t, b) for prompt, t, b in zip(prompts, tuned, base, strict=True)]
