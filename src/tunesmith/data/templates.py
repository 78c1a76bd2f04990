"""Chat formatting: always through the tokenizer's own `chat_template`, so training sees exactly
what inference (transformers, vLLM, llama.cpp) will render.

A tokenizer without a template gets the fallback below, set on the tokenizer itself so that it is
saved with the model and used again at inference.
"""

from __future__ import annotations

# ChatML (as used by Qwen and SmolLM2): `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
# `__END_OF_TURN__` is filled in with `<|im_end|>` when the tokenizer knows that token, else with its eos token,
# so a model learns to stop with a token it already has instead of a string spelled out in pieces.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '__END_OF_TURN__' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"


def fallback_chat_template(tokenizer) -> str:
    """The ChatML template installed on tokenizers that have none (see `_FALLBACK_TEMPLATE`)."""
    vocabulary = tokenizer.get_vocab()
    end = CHATML_END if CHATML_END in vocabulary or tokenizer.eos_token is None else tokenizer.eos_token
    return _FALLBACK_TEMPLATE.replace("__END_OF_TURN__", end)


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the fallback ChatML template if it has none; True when it was installed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = fallback_chat_template(tokenizer)
    return True


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the tokenizer's chat template writes it."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
