"""Online RL inside the one loop: grpo (Shao et al. 2024, "DeepSeekMath", sec. 4.1) and ppo with a value
head (Schulman et al. 2017; the RL stage of Ouyang et al. 2022, "InstructGPT").

Each micro-batch holds prompts. The objectives' `rollout`, which the loop runs before `loss`, samples
completions from the CURRENT policy (batched, with the KV cache), scores them with registered reward
functions and/or a reward model (a `reward` run), and has the reference score them for the KL term.
grpo samples a group of G completions per prompt, normalises the rewards within each group into
advantages, and returns the clipped-ratio objective with a KL penalty to the reference (eq. 3, with
the k3 KL estimator of eq. 4). ppo puts a per-token KL penalty into the reward, estimates advantages
with GAE from a scalar value head on the policy's last hidden state, and returns the clipped policy
loss plus the clipped value loss.

Normalisation: both average tokens within a completion, then completions of a prompt (grpo's eq. 3);
the loop then divides the summed per-prompt losses by the prompts of the whole step
(`num_loss_tokens` counts prompts), so accumulation does not change the objective.

Departure from the papers: one policy update per generation (mu = 1, as trl's grpo default), so
pi_old = pi_theta (detached) and the ratio is 1 at the point where the gradient is taken; the clips
only matter for mu > 1, which would need the loop to reuse a batch. They are written out so the
formulas read as in the papers.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import Field, field_validator
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from tunesmith.errors import ConfigError
from tunesmith.objectives.base import LossOutput, ObjectiveSettings, ObjectiveSpec, mean_metrics, register
from tunesmith.objectives.branched_rows import BEGINNING, branched_row_hidden, branched_rows_pay, sliding_window
from tunesmith.objectives.causal_lm import (
    _can_skip_unused_logits,
    _language_model,
    chunked_token_logps,
    continues_from_cache,
)
from tunesmith.registry import Registry, closest
from tunesmith.training.reference import ReferenceModel
from tunesmith.training.sharding import sharded_across_processes

# --- reward functions ----------------------------------------------------------------------------------------

RewardFunction = Callable[[list[list[dict]], list[str], list[str | None]], list[float]]
"""reward(prompts, completions, answers) -> one float per completion; `answers` are the records' reference
answers (None where the record has none)."""
REWARD_FUNCTIONS: Registry[RewardFunction] = Registry("reward function")


def register_reward(name: str):
    def decorate(function: RewardFunction) -> RewardFunction:
        return REWARD_FUNCTIONS.register(name, function)

    return decorate


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str | None) -> str | None:
    """The answer of a GSM8K-style text: the number after `####`, else the last number in it."""
    if not text:
        return None
    tail = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    try:
        return str(float(value)).removesuffix(".0")
    except ValueError:
        return None


@register_reward("gsm8k_correctness")
def gsm8k_correctness(prompts, completions, answers) -> list[float]:
    """1.0 when the completion's final number equals the reference answer's (after `####`), else 0.0."""
    return [
        float(answer is not None and final_number(completion) is not None
              and final_number(completion) == final_number(answer))
        for completion, answer in zip(completions, answers, strict=True)
    ]


@register_reward("gsm8k_format")
def gsm8k_format(prompts, completions, answers) -> list[float]:
    """1.0 when the completion states its answer the GSM8K way, `#### <number>`, else 0.0."""
    return [float(re.search(r"####\s*-?\d", completion) is not None) for completion in completions]


@register_reward("length_penalty")
def length_penalty(prompts, completions, answers) -> list[float]:
    """-(characters / 1000): a mild push towards shorter completions."""
    return [-len(completion) / 1000 for completion in completions]


# --- settings --------------------------------------------------------------------------------------------------


class SamplingSettings(ObjectiveSettings):
    """How completions are sampled and scored: shared by grpo and ppo."""

    group_size: int = Field(4, ge=1, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(128, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    rewards: list[str] = Field(
        default_factory=lambda: ["gsm8k_correctness"], description="Registered reward functions, summed."
    )
    reward_weights: list[float] | None = Field(None, description="Weight of each reward function; default 1 each.")
    reward_run: Path | None = Field(None, description="A `reward` run whose model scores completions (added).")
    loss_chunk_tokens: int | None = Field(
        512, ge=1, description="Compute the completion tokens' log-probs (policy and reference) over chunks of this "
        "many positions, so the (BG, C, V) float32 logits and log-softmax never exist at once (exact): with a frozen "
        "head (adapters) each chunk's gradients are made in the forward pass, with a trained one each chunk is "
        "recomputed in the backward pass (one more head matmul). null: all at once, nothing recomputed."
    )

    @field_validator("rewards")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in REWARD_FUNCTIONS:
                known = ", ".join(REWARD_FUNCTIONS.names())
                raise ValueError(f"unknown reward function {name!r}{closest(name, REWARD_FUNCTIONS.names())}; "
                                 f"known: {known}")
        return names

    @field_validator("reward_weights")
    @classmethod
    def _one_weight_per_reward(cls, weights: list[float] | None, info) -> list[float] | None:
        rewards = info.data.get("rewards")
        if weights is not None and rewards is not None and len(weights) != len(rewards):
            raise ValueError(f"{len(weights)} weights for {len(rewards)} rewards ({', '.join(rewards)})")
        return weights


class GRPOSettings(SamplingSettings):
    group_size: int = Field(4, ge=2, description="Completions sampled per prompt (G).")
    beta: float = Field(0.04, ge=0, description="KL penalty to the reference (DeepSeekMath: 0.04); 0 skips it.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's std (paper); off = Dr. GRPO.")


class PPOSettings(SamplingSettings):
    group_size: int = Field(1, ge=1, description="Completions sampled per prompt (PPO's baseline is the value head).")
    beta: float = Field(0.02, ge=0, description="Per-token KL penalty to the reference in the reward (InstructGPT: "
                        "0.02); 0 skips it.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    value_epsilon: float = Field(0.2, gt=0, description="Clip range of the value update around the sampled values.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount per token (1: the final reward counts fully).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 0 is one-step TD, 1 is Monte Carlo returns.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 over the batch's tokens.")


# --- batches ------------------------------------------------------------------------------------------------------


def collate_prompts(examples: list[dict], pad_id: int) -> dict:
    """LEFT-padded prompts (B, P) (generation continues from the last column); counts prompts."""
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, P)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, longest - length:] = torch.tensor(example["input_ids"])
        attention_mask[row, longest - length:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompts": [example["prompt"] for example in examples],
        "answers": [example.get("answer") for example in examples],
        "num_loss_tokens": len(examples),
        "num_tokens": int(attention_mask.sum()),
    }


@functools.lru_cache(maxsize=4)
def _tokenizer_of(folder: str):
    """The tokenizer saved beside the model's weights (objectives are not handed the run's tokenizer)."""
    from transformers import AutoTokenizer

    from tunesmith.models import ensure_pad_token

    return ensure_pad_token(AutoTokenizer.from_pretrained(folder, local_files_only=True))


@functools.lru_cache(maxsize=2)
def _reward_model(run_dir: str, device: str):
    """The reward model of a `reward` run, frozen, on the policy's device (it scores every rollout), and its
    tokenizer."""
    from tunesmith.models import load_run

    model, tokenizer = load_run(Path(run_dir), device=device)
    return model.requires_grad_(False), tokenizer


# --- sampling and scoring ------------------------------------------------------------------------------------------


def shares_prompts(model, group: int) -> bool:
    """Whether a group's G copies of its prompt can run as one forward that the copies continue from through its
    KV cache: where the model `continues_from_cache`, unless it trains with recomputed layers (transformers drops
    the cache in a checkpointed layer, where the recompute would write it twice)."""
    return (group > 1 and continues_from_cache(model)
            and not (model.training and _language_model(model).is_activation_checkpointing))


@torch.no_grad()
def sampling_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: int, new_tokens: int):
    """The KV cache `generate` starts from: each prompt's tokens but its last (B, P - 1), computed once per prompt
    and repeated for its G completions (BG rows), in a static cache with room for `new_tokens` more; or None where
    the model cannot continue from a cache of transformers' default kind (`generate` then makes its own).

    `generate` then runs only the last prompt token of each row before it decodes, where it would run all BG x P
    prompt tokens (a prompt's G copies compute the same keys and values). A static cache writes each step's keys
    and values in place; the dynamic one concatenated the whole cache in every layer at every step. Positions as
    `generate` gives them under left padding (the mask's running count). The dynamic cache stays for processes
    sampling on sharded layers (one that finishes first runs dummy steps for the others, `synced_gpus`, which a
    cache sized to its own completions would not hold) and for models with sliding-window layers (transformers'
    static sliding layers sample otherwise than its dynamic cache from left-padded prompts: tests/test_rl_grpo.py),
    and under autocast (keys and values of more than one dtype)."""
    if input_ids.shape[1] < 2 or not continues_from_cache(model):
        return None
    language_model = _language_model(model)
    prompt_ids, prompt_mask = input_ids[:, :-1], attention_mask[:, :-1]  # (B, P - 1)
    inputs = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
    if "position_ids" in inspect.signature(language_model.forward).parameters:
        inputs["position_ids"] = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    # The backbone only: the cache is what is wanted, not the head's (B, P - 1, V) logits.
    backbone = getattr(language_model, language_model.base_model_prefix, language_model)
    _, prompt_cache = repeated_prefix_cache(backbone, inputs, group)  # (BG, P - 1), each prompt's rows side by side
    # Under autocast the keys and values come out float32 or bf16 by the path that made them (the rotary embedding
    # leaves float32 keys): a static cache holds one dtype.
    autocast = torch.is_autocast_enabled(input_ids.device.type)
    if sharded_across_processes(model) or sliding_window(language_model.config) is not None or autocast:
        return prompt_cache
    cache = StaticCache(config=language_model.config, max_cache_len=input_ids.shape[1] + new_tokens)
    for index, layer in enumerate(prompt_cache.layers):
        cache.update(layer.keys, layer.values, index)
    return cache


class CategoricalSample(LogitsProcessor):
    """Draws each row's next token from softmax(scores) by inverse transform (one uniform number per row against
    the cumulative probabilities), and leaves the scores -inf but at the drawn token, for `generate`'s greedy pick.

    `generate`'s own sampling, torch.multinomial, draws one exponential number per vocabulary entry: 49,152 per row
    per step, 40 ms a step for 40 rows on a 2-core CPU, more than the output head's matmul. Both draw exactly from
    the same distribution (the cumulative sum taken in float64); they use the random stream differently, so a seed
    gives other completions than `generate`'s sampling would."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cumulative = torch.softmax(scores.float(), dim=-1).cumsum(-1, dtype=torch.float64)  # (R, V)
        draw = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cumulative[:, -1:]
        tokens = torch.searchsorted(cumulative, draw, right=True).clamp(max=scores.shape[-1] - 1)  # (R, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


def repeated_prefix_cache(module: torch.nn.Module, prefixes: dict, copies: int):
    """`module`'s output on prefix rows (B, P) and their KV cache (transformers' DynamicCache), repeated for
    `copies` continuations of each (B x copies, P), a prefix's copies next to each other; with gradients, the
    repeated keys and values are differentiable back to the prefixes' one forward."""
    cache = DynamicCache(config=_language_model(module).config)
    output = module(**prefixes, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(copies)
    return output, cache


@torch.no_grad()
def sample_groups(model, batch: dict, settings: SamplingSettings, greedy: bool = False) -> dict:
    """G completions per prompt, batched with the KV cache, each prompt's part of it computed once
    (`sampling_cache`): sequences (BG, P+C), completion_mask (BG, C)."""
    from tunesmith.inference import stop_token_ids

    tokenizer = _tokenizer_of(str(_language_model(model).name_or_path))
    group = 1 if greedy else settings.group_size
    input_ids = batch["input_ids"].repeat_interleave(group, 0)  # (BG, P)
    attention_mask = batch["attention_mask"].repeat_interleave(group, 0)  # (BG, P)
    stops = stop_token_ids(_language_model(model), tokenizer)
    was_training = model.training
    model.eval()
    # Sampling as logits processors in front of generate's greedy pick (CategoricalSample: its own draw is slow).
    sample = [] if greedy else [TemperatureLogitsWarper(settings.temperature)] + (
        [TopPLogitsWarper(settings.top_p)] if settings.top_p < 1 else []) + [CategoricalSample()]
    try:
        cache = sampling_cache(model, batch["input_ids"], batch["attention_mask"], group, settings.max_new_tokens)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=LogitsProcessorList(sample),
            use_cache=True, past_key_values=cache, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            # Sharded layers gather their weights in every forward: all processes decode until the last is done.
            synced_gpus=sharded_across_processes(model),
            # On a GPU, generate would compile its forward for a static cache, again for each batch's prompt width
            # and cache length; compiling is `train.compile`'s choice.
            disable_compile=True,
        )  # (BG, P + C)
    finally:
        model.train(was_training)
    completions = sequences[:, input_ids.shape[1]:]  # (BG, C)
    # Keep tokens up to and including the first stop token (it is what the model chose to end with).
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))  # (BG, C)
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0  # (BG, C) strictly after the first stop
    completion_mask = (~after_stop).long()  # (BG, C)
    texts = [
        tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
        for row, mask in zip(completions, completion_mask, strict=True)
    ]
    return {
        "sequences": sequences,
        "attention_mask": torch.cat([attention_mask, completion_mask], dim=1),  # (BG, P + C)
        "completion_mask": completion_mask,
        "texts": texts,
        "group": group,
    }


def score_completions(
    batch: dict, samples: dict, settings: SamplingSettings
) -> tuple[torch.Tensor, dict[str, list]]:
    """The total reward of each completion (BG,) and each reward function's values."""
    group = samples["group"]
    prompts = [prompt for prompt in batch["prompts"] for _ in range(group)]
    answers = [answer for answer in batch["answers"] for _ in range(group)]
    weights = settings.reward_weights or [1.0] * len(settings.rewards)
    parts: dict[str, list] = {}
    total = torch.zeros(len(samples["texts"]))
    for name, weight in zip(settings.rewards, weights, strict=True):
        values = REWARD_FUNCTIONS.get(name)(prompts, samples["texts"], answers)
        parts[name] = values
        total += weight * torch.tensor(values, dtype=torch.float32)
    if settings.reward_run is not None:
        reward_model, reward_tokenizer = _reward_model(str(settings.reward_run), str(samples["sequences"].device))
        conversations = [[*prompt, {"role": "assistant", "content": text}]
                         for prompt, text in zip(prompts, samples["texts"], strict=True)]
        values = reward_model_scores(reward_model, reward_tokenizer, conversations, group)
        parts["reward_model"] = values
        total += torch.tensor(values, dtype=torch.float32)
    return total, parts


@torch.no_grad()
def reward_model_scores(
    reward_model: torch.nn.Module, tokenizer, conversations: list[list[dict]], group: int, batch_size: int = 8
) -> list[float]:
    """A reward model's score of each conversation, where each `group` in a row shares its prompt: as
    `score_conversations` scores them whole, with each group's common tokens run once.

    The group's conversations are rendered and tokenised whole (so each ends in exactly the tokens it would
    alone); their longest common prefix (all but at least one token of the shortest) runs once, and each
    ending continues from its KV cache (`continued_forward`): B x L + BG x E positions instead of BG x (L + E).
    The score is read at each ending's last token, as `sequence_rewards` reads it. Whole conversations where
    the model cannot continue from a cache."""
    from tunesmith.data.templates import ensure_chat_template, render_chat
    from tunesmith.objectives.reward import score_conversations

    if group == 1 or not continues_from_cache(reward_model):
        return score_conversations(reward_model, tokenizer, conversations, batch_size)
    ensure_chat_template(tokenizer)
    rows = [tokenizer(render_chat(messages, tokenizer), add_special_tokens=False)["input_ids"]
            for messages in conversations]
    classifier = _language_model(reward_model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    device = next(reward_model.parameters()).device
    pad = tokenizer.pad_token_id
    scores: list[float] = []
    per_batch = max(1, batch_size // group) * group
    for start in range(0, len(rows), per_batch):
        batch_rows = rows[start:start + per_batch]
        groups = [batch_rows[first:first + group] for first in range(0, len(batch_rows), group)]
        shared = [common_prefix_length(members) for members in groups]  # (B,) L
        width = max(shared)
        if width == 0:  # nothing shared (one-token conversations): nothing to continue from
            scores += score_conversations(reward_model, tokenizer, conversations[start:start + per_batch], batch_size)
            continue
        prefix_ids = torch.tensor([[pad] * (width - length) + members[0][:length]
                                   for members, length in zip(groups, shared, strict=True)], device=device)
        prefix_mask = torch.tensor([[0] * (width - length) + [1] * length for length in shared], device=device)
        endings = [row[length:] for members, length in zip(groups, shared, strict=True) for row in members]
        longest = max(len(ending) for ending in endings)
        ending_ids = torch.tensor([ending + [pad] * (longest - len(ending)) for ending in endings], device=device)
        ending_mask = torch.tensor([[1] * len(ending) + [0] * (longest - len(ending)) for ending in endings],
                                   device=device)  # (BG, E)
        prefixes = {"input_ids": prefix_ids, "attention_mask": prefix_mask,  # (B, L) left-padded
                    "position_ids": (prefix_mask.cumsum(-1) - 1).clamp(min=0)}
        starts = torch.tensor(shared, device=device).repeat_interleave(group)  # (BG,)
        continuations = {
            "input_ids": ending_ids,
            "attention_mask": torch.cat([prefix_mask.repeat_interleave(group, 0), ending_mask], dim=1),  # (BG, L + E)
            "position_ids": starts[:, None] + torch.arange(longest, device=device)[None, :],  # (BG, E)
        }
        _, hidden = continued_forward(backbone, prefixes, continuations, group)  # (BG, E, H)
        last = ending_mask.sum(-1) - 1  # (BG,)
        pooled = hidden[torch.arange(len(endings), device=device), last]  # (BG, H)
        scores += classifier.score(pooled).float().squeeze(-1).tolist()
    return scores


def common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving at least one token of the shortest row out."""
    shortest = min(len(row) for row in rows)
    for index in range(shortest - 1):
        if any(row[index] != rows[0][index] for row in rows[1:]):
            return index
    return max(shortest - 1, 0)


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(r - mean(group)) / std(group) for each completion (BG,) (DeepSeekMath sec. 4.1.2, outcome supervision)."""
    grouped = rewards.view(-1, group)  # (B, G)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)
    return centred.view(-1)


def sequence_inputs(samples: dict) -> dict[str, torch.Tensor]:
    """Forward inputs of the sampled sequences (BG, P + C); left-padded prompts count positions over real
    tokens only, as generate() numbered them."""
    attention_mask = samples["attention_mask"]  # (BG, P + C)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (BG, P + C)
    return {"input_ids": samples["sequences"], "attention_mask": attention_mask, "position_ids": position_ids}


def gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] (BG, C) in float32, from logits (BG, C, V) and targets (BG, C)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_logps(model, samples: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of each completion token (BG, C), in float32; where the head can run apart from the
    model, over at most `chunk_tokens` positions at a time (`chunked_token_logps`; None: all at once)."""
    completion_length = samples["completion_mask"].shape[1]
    targets = samples["sequences"][:, -completion_length:]  # (BG, C)
    if _can_skip_unused_logits(model):
        hidden, head = completion_hidden(model, samples)  # (BG, C, H)
        return chunked_token_logps(hidden.flatten(0, 1), head, targets.flatten(), chunk_tokens).view_as(targets)
    logits = model(
        **sequence_inputs(samples), use_cache=False, logits_to_keep=completion_length + 1
    ).logits[:, :-1]  # (BG, C, V): the position before each completion token predicts it
    return gather_logps(logits, targets)


def completion_hidden(model, samples: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """The policy's last hidden states at the position before each completion token (BG, C, H), and its head;
    each prompt run once for its group where it can be (`shares_prompts`)."""
    completion_length = samples["completion_mask"].shape[1]
    language_model = _language_model(model)
    backbone = getattr(language_model, language_model.base_model_prefix)
    head = language_model.get_output_embeddings()
    if shares_prompts(model, samples["group"]):
        return shared_prompt_hidden(backbone, samples), head
    hidden = group_row_hidden(model, samples) if samples["group"] > 1 else None
    if hidden is not None:
        return hidden, head
    hidden = backbone(**sequence_inputs(samples), use_cache=False).last_hidden_state  # (BG, P + C, H)
    return hidden[:, -completion_length - 1:-1], head


def shared_prompt_hidden(backbone: torch.nn.Module, samples: dict) -> torch.Tensor:
    """completion_hidden's states (BG, C, H) from B x P + BG x (C - 1) positions instead of BG x (P + C).

    A group's G rows hold the same prompt, so the prompt runs once (B, P) and the completions continue from its
    KV cache (`continued_forward`). The last prompt position's state predicts the first completion token; the
    completions' last tokens predict nothing and do not run.
    """
    group, completion_length = samples["group"], samples["completion_mask"].shape[1]
    inputs = sequence_inputs(samples)  # (BG, P + C) each
    prompt_length = inputs["input_ids"].shape[1] - completion_length
    prompts = {key: value[::group, :prompt_length] for key, value in inputs.items()}  # (B, P) one row a group
    if completion_length == 1:
        return backbone(**prompts, use_cache=False).last_hidden_state[:, -1:].repeat_interleave(group, 0)
    completions = {
        "input_ids": inputs["input_ids"][:, prompt_length:-1],  # (BG, C - 1)
        "position_ids": inputs["position_ids"][:, prompt_length:-1],  # (BG, C - 1)
        "attention_mask": inputs["attention_mask"][:, :-1],  # (BG, P + C - 1): the cache's positions, then these
    }
    prompt_hidden, completion_states = continued_forward(backbone, prompts, completions, group)
    return torch.cat([prompt_hidden[:, -1:].repeat_interleave(group, 0), completion_states], dim=1)  # (BG, C, H)


def group_row_hidden(model, samples: dict) -> torch.Tensor | None:
    """completion_hidden's states (BG, C, H) with each group as one row (objectives/branched_rows.py): its prompt's
    p real tokens, then each of its G completions but the last token, B rows of p + G x (C - 1) positions. Where
    the prompt cannot run once through a KV cache (recomputed layers drop the cache), this still runs it once.
    None where that layout does not pay against BG rows of P + C (`branched_rows_pay`)."""
    group, completion_length = samples["group"], samples["completion_mask"].shape[1]
    sequences = samples["sequences"]  # (BG, P + C), prompts left-padded
    prompt_width = sequences.shape[1] - completion_length
    prompt_lengths = samples["attention_mask"][::group, :prompt_width].sum(-1)  # (B,) p
    prompts, continued = len(prompt_lengths), completion_length - 1  # each completion's last token predicts nothing
    row_lengths = prompt_lengths + group * continued  # (B,)
    width = int(row_lengths.max())
    if not branched_rows_pay(model, prompts, width, prompts * group, sequences.shape[1]):
        return None

    column = torch.arange(width, device=sequences.device)[None, :]  # (1, W)
    in_prompt = column < prompt_lengths[:, None]  # (B, W)
    past_prompt = (column - prompt_lengths[:, None]).clamp(min=0)  # (B, W)
    completion = torch.where(in_prompt, 0, past_prompt // max(continued, 1)).clamp(max=group - 1)  # (B, W) j
    step = past_prompt - completion * continued  # (B, W) t, the token's place in its completion
    first_row = torch.arange(prompts, device=sequences.device)[:, None] * group  # (B, 1)
    source_row = first_row + completion  # (B, W)
    source_column = torch.where(in_prompt, prompt_width - prompt_lengths[:, None] + column, prompt_width + step)
    in_row = column < row_lengths[:, None]  # (B, W)
    positions = torch.where(in_row, torch.where(in_prompt, column, prompt_lengths[:, None] + step), 0)
    branch = torch.where(in_prompt, BEGINNING, completion + 1)  # (B, W)
    input_ids = torch.where(in_row, sequences[source_row, source_column.clamp(max=sequences.shape[1] - 1)], 0)
    hidden = branched_row_hidden(model, input_ids, positions, branch, row_lengths)  # (B, W, H)

    # Completion j of prompt b: the prompt's last state predicts its first token, its own tokens the rest.
    row = torch.arange(prompts * group, device=sequences.device) // group  # (BG,)
    copy = torch.arange(prompts * group, device=sequences.device) % group  # (BG,)
    start = prompt_lengths[row] + copy * continued  # (BG,) the completion's first column
    columns = start[:, None] + torch.arange(completion_length, device=sequences.device) - 1  # (BG, C)
    columns[:, 0] = prompt_lengths[row] - 1
    return hidden[row[:, None], columns]  # (BG, C, H)


def continued_forward(
    backbone: torch.nn.Module, prefixes: dict, continuations: dict, copies: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of prefix rows (B, P, H) and of `copies` continuations of each (B x copies, C, H), a
    prefix's next to each other, with each prefix run once. Its KV cache, repeated for its copies, is what they
    attend to, and their gradients meet in the prefix's one forward; a prefix's states do not depend on what
    follows it (causal attention), so this equals running every copy whole. `continuations` carries the
    attention mask of the prefix's positions and its own (B x copies, P + C) and its positions (B x copies, C)."""
    prefix_output, cache = repeated_prefix_cache(backbone, prefixes, copies)  # cache: (B x copies, P)
    continuation_hidden = backbone(**continuations, past_key_values=cache, use_cache=True).last_hidden_state
    return prefix_output.last_hidden_state, continuation_hidden  # (B, P, H), (B x copies, C, H)


def grpo_token_losses(
    logps: torch.Tensor, old_logps: torch.Tensor, reference_logps: torch.Tensor | None, advantages: torch.Tensor,
    settings: GRPOSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss (BG, C) and the per-token KL estimate (BG, C); DeepSeekMath eqs. 3 and 4."""
    ratio = torch.exp(logps - old_logps)  # (BG, C)
    advantage = advantages.unsqueeze(-1)  # (BG, 1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - settings.epsilon, 1 + settings.epsilon) * advantage)
    if reference_logps is None:
        kl = torch.zeros_like(logps)
    else:
        log_ratio = reference_logps - logps  # k3 estimator: pi_ref/pi - log(pi_ref/pi) - 1 >= 0
        kl = torch.exp(log_ratio) - log_ratio - 1
    return -(surrogate - settings.beta * kl), kl


@torch.no_grad()
def rollout(model: torch.nn.Module, reference: ReferenceModel | None, batch: dict, settings: SamplingSettings) -> dict:
    """The experience one update learns from (the objectives' `rollout`): G completions per prompt sampled
    from the current policy, their rewards (BG,) and each reward function's values, and the reference's
    log-probs of the completion tokens (BG, C) when there is a KL term (beta > 0), else None."""
    samples = sample_groups(model, batch, settings)
    rewards, parts = score_completions(batch, samples, settings)  # (BG,)
    reference_logps = None
    if reference is not None and settings.beta > 0:
        with reference.active(model) as reference_model:  # peft: the policy with its adapters disabled
            reference_logps = completion_logps(reference_model, samples, settings.loss_chunk_tokens)  # (BG, C)
    return {**batch, "samples": samples, "rewards": rewards.to(samples["sequences"].device), "reward_parts": parts,
            "reference_logps": reference_logps}


def grpo_loss(model: torch.nn.Module, batch: dict, settings: GRPOSettings) -> LossOutput:
    """GRPO's objective on a `rollout` batch. One update per generation (mu = 1): pi_old is this forward's
    detached log-probs, so the ratio is 1 where the gradient is taken; the clip is written out as in eq. 3."""
    samples, rewards, parts = batch["samples"], batch["rewards"], batch["reward_parts"]
    advantages = group_advantages(rewards, samples["group"], settings.scale_rewards)  # (BG,)
    logps = completion_logps(model, samples, settings.loss_chunk_tokens)  # (BG, C)
    token_losses, kl = grpo_token_losses(logps, logps.detach(), batch["reference_logps"], advantages, settings)
    mask = samples["completion_mask"].float()  # (BG, C)
    lengths = mask.sum(-1).clamp(min=1)  # (BG,)
    completion_losses = (token_losses * mask).sum(-1) / lengths  # (BG,) eq. 3: mean over tokens ...
    prompt_losses = completion_losses.view(-1, samples["group"]).mean(-1)  # (B,) ... then over the group
    prompts = len(batch["prompts"])
    group_rewards = rewards.view(prompts, -1)
    metrics = {
        "reward": group_rewards.mean(-1).sum(),
        "reward_std": group_rewards.std(-1).sum(),
        "kl": ((kl * mask).sum(-1) / lengths).view(prompts, -1).mean(-1).sum().detach(),
        "completion_length": lengths.view(prompts, -1).mean(-1).sum(),
        **{f"reward_{name}": torch.tensor(values).view(prompts, -1).mean(-1).sum() for name, values in parts.items()},
    }
    return LossOutput(prompt_losses.sum(), batch["num_loss_tokens"], {key: value.detach().float() for key, value in
                                                                      metrics.items()})


def reward_eval_sums(model: torch.nn.Module, batch: dict, settings: SamplingSettings) -> dict:
    """The summed reward (and each reward function's part) of one greedy completion per eval prompt."""
    samples = sample_groups(model, batch, settings, greedy=True)
    rewards, parts = score_completions(batch, samples, settings)
    return {
        "reward": float(rewards.sum()),
        # summed as the total is (float32), so a run with one reward function reports one number for both
        **{f"reward_{name}": float(torch.tensor(values, dtype=torch.float32).sum()) for name, values in parts.items()},
        "completion_length": float(samples["completion_mask"].sum()),
        "count": len(samples["texts"]),
    }


def reward_metrics(totals: dict) -> dict[str, float]:
    """Mean rewards of the eval prompts' greedy completions; eval_loss is the negative mean reward."""
    metrics = mean_metrics(totals, "eval_prompts")
    return {**metrics, "eval_loss": -metrics.get("reward", 0.0)}


@torch.no_grad()
def pass_rates(model: torch.nn.Module, batches: Iterable[dict], settings: SamplingSettings) -> list[float]:
    """The mean total reward of G sampled completions of each prompt, in batch order; with a 0/1 reward such as
    gsm8k_correctness, the prompt's pass rate at `settings.temperature`.

    Screening prompts by it finds where GRPO can learn: a group whose completions all score the same has zero
    advantages (eq. 3's group normalisation), so only prompts with 0 < rate < 1 give a gradient (the
    observation behind DAPO's dynamic sampling, Yu et al. 2025, sec. 3.2).
    """
    rates: list[float] = []
    for batch in batches:
        samples = sample_groups(model, batch, settings)
        rewards, _ = score_completions(batch, samples, settings)  # (BG,)
        rates += rewards.view(-1, samples["group"]).mean(-1).tolist()
    return rates


register(ObjectiveSpec(
    name="grpo", model_kind="causal_lm", collate=collate_prompts, loss=grpo_loss,
    eval_sums=reward_eval_sums, eval_metrics=reward_metrics,
    settings=GRPOSettings, rollout=rollout,
))


# --- ppo: a value head and GAE -------------------------------------------------------------------------------------


def add_value_head(model: torch.nn.Module, settings: PPOSettings) -> None:
    """`prepare_model` of ppo: a trainable scalar head `model.value_head` on the policy's last hidden state.

    Zero-initialised, so every value starts at 0 (a critic that knows nothing yet) instead of at a random
    offset that the first advantages would inherit. It trains and checkpoints with the policy but is not
    exported: peft saves adapter weights only, and a plain transformers model is told to skip its keys
    (`_keys_to_ignore_on_save`), so the exported policy loads as the same causal LM it started as.
    """
    if not _can_skip_unused_logits(model):
        raise ConfigError("task ppo: the value head reads the policy's last hidden state, which this model or method "
                          "does not expose (prompt-learning methods, soft-capped heads); use lora or full")
    language_model = _language_model(model)
    value_head = torch.nn.Linear(language_model.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    model.value_head = value_head.to(language_model.device)
    if model is language_model:
        ignored = set(language_model._keys_to_ignore_on_save or ())
        language_model._keys_to_ignore_on_save = ignored | {"value_head.weight", "value_head.bias"}


def policy_logps_and_values(
    model, samples: dict, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(o_t | q, o_<t) (BG, C) and V(q, o_<t) (BG, C), in float32, from ONE forward of the policy:
    the head (over chunks of `chunk_tokens` positions) and the value head both read the last hidden state at
    the position before each token."""
    targets = samples["sequences"][:, -samples["completion_mask"].shape[1]:]  # (BG, C)
    hidden, head = completion_hidden(model, samples)  # (BG, C, H)
    logps = chunked_token_logps(hidden.flatten(0, 1), head, targets.flatten(), chunk_tokens).view_as(targets)
    values = model.value_head(hidden).squeeze(-1).float()  # (BG, C)
    return logps, values


def kl_penalised_rewards(
    rewards: torch.Tensor, logps: torch.Tensor, reference_logps: torch.Tensor | None, mask: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (BG, C) and the per-token KL estimate log pi/pi_ref (BG, C).

    InstructGPT's reward (Ouyang et al. 2022, eq. 2; Stiennon et al. 2020, eq. 1) spread over tokens as in
    Ziegler et al. 2019: every token pays -beta * log(pi/pi_ref) for the token it chose, and the last token
    of the completion also gets the sequence reward r(x, y).
    """
    kl = torch.zeros_like(logps) if reference_logps is None else (logps - reference_logps) * mask  # (BG, C)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (BG,) the completion mask is 1s, then 0s
    token_rewards = -beta * kl  # (BG, C)
    token_rewards[torch.arange(len(rewards), device=mask.device), last] += rewards.to(mask.device)
    return token_rewards, kl


def generalised_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (BG, C) and the value targets, returns = advantages + values (BG, C).

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with
    V = 0 after the last token (the episode ends there). Masked positions hold r = V = 0, so the
    backward recursion carries nothing across them.
    """
    values = values * mask  # (BG, C)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (BG, C) V(s_{t+1})
    deltas = token_rewards * mask + gamma * next_values - values  # (BG, C)
    advantages = torch.zeros_like(deltas)  # (BG, C)
    running = torch.zeros_like(deltas[:, 0])  # (BG,)
    for position in reversed(range(deltas.shape[1])):
        running = deltas[:, position] + gamma * lam * running
        advantages[:, position] = running
    return advantages * mask, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked-in entries (as the PPO implementations of Ziegler et al. 2019 do)."""
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_token_losses(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
    old_values: torch.Tensor, returns: torch.Tensor, settings: PPOSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped policy loss (BG, C) and clipped value loss (BG, C).

    Policy: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7:
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old.
    Value: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2), the clipped value loss of
    OpenAI's PPO implementation (baselines ppo2) that InstructGPT's lineage uses (Ziegler et al. 2019).
    """
    ratio = torch.exp(logps - old_logps)  # (BG, C)
    clipped_ratio = ratio.clamp(1 - settings.epsilon, 1 + settings.epsilon)
    policy_losses = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # (BG, C)
    clipped_values = old_values + (values - old_values).clamp(-settings.value_epsilon, settings.value_epsilon)
    value_losses = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # (BG, C)
    return policy_losses, value_losses


def ppo_loss(model: torch.nn.Module, batch: dict, settings: PPOSettings) -> LossOutput:
    """One PPO update on a `rollout` batch (InstructGPT's RL stage, Ouyang et al. 2022, sec. 3.5).

    Like grpo, one update per generation (mu = 1): pi_old and V_old are this forward's detached values,
    so the ratio is 1 and both clips are inactive where the gradient is taken; they are written out so
    the formulas read as in the papers.
    """
    samples, rewards, parts = batch["samples"], batch["rewards"], batch["reward_parts"]
    mask = samples["completion_mask"].float()  # (BG, C)
    logps, values = policy_logps_and_values(model, samples, settings.loss_chunk_tokens)  # (BG, C), (BG, C)
    old_logps, old_values = logps.detach(), values.detach()
    token_rewards, kl = kl_penalised_rewards(rewards, old_logps, batch["reference_logps"], mask,
                                             settings.beta)  # (BG, C)
    advantages, returns = generalised_advantages(token_rewards, old_values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask)
    policy_losses, value_losses = ppo_token_losses(
        logps, old_logps, advantages, values, old_values, returns, settings
    )  # (BG, C), (BG, C)
    token_losses = policy_losses + settings.value_coef * value_losses  # (BG, C)
    lengths = mask.sum(-1).clamp(min=1)  # (BG,)
    prompts = len(batch["prompts"])

    def per_prompt(per_token: torch.Tensor) -> torch.Tensor:
        """Mean over each completion's tokens, then over the prompt's completions (B,), as in grpo."""
        return ((per_token * mask).sum(-1) / lengths).view(prompts, -1).mean(-1)

    metrics = {
        "reward": rewards.view(prompts, -1).mean(-1).sum(),
        "kl": per_prompt(kl).sum(),
        "value_loss": per_prompt(value_losses).sum(),
        "value": per_prompt(old_values).sum(),
        "completion_length": lengths.view(prompts, -1).mean(-1).sum(),
        **{f"reward_{name}": torch.tensor(values).view(prompts, -1).mean(-1).sum() for name, values in parts.items()},
    }
    return LossOutput(per_prompt(token_losses).sum(), batch["num_loss_tokens"],
                      {key: value.detach().float() for key, value in metrics.items()})


register(ObjectiveSpec(
    name="ppo", model_kind="causal_lm", collate=collate_prompts, loss=ppo_loss,
    eval_sums=reward_eval_sums, eval_metrics=reward_metrics,
    settings=PPOSettings, rollout=rollout, prepare_model=add_value_head,
))
