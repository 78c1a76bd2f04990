"""grpo: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", sec. 4.1), inside the one loop.

Each micro-batch holds prompts. `loss` samples a group of G completions per prompt from the CURRENT
policy (batched, with the KV cache), scores them with registered reward functions and/or a reward
model (a `reward` run), normalises the rewards within each group into advantages, and returns the
clipped-ratio objective with a KL penalty to the reference (eq. 3, with the k3 KL estimator of eq. 4).

Normalisation: eq. 3 averages tokens within a completion, then completions within a group; the loop
then divides the summed per-prompt losses by the prompts of the whole step (`num_loss_tokens` counts
prompts), so accumulation does not change the objective.

Departure from the paper: one policy update per generation (mu = 1, as trl's default), so
pi_old = pi_theta (detached) and the ratio is 1 at the point where the gradient is taken; the clip
only matters for mu > 1, which would need the loop to reuse a batch. It is written out so the
formula reads as in the paper.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import Field, field_validator

from tunesmith.objectives.base import LossOutput, ObjectiveSettings, ObjectiveSpec, register
from tunesmith.objectives.causal_lm import _language_model
from tunesmith.registry import Registry, closest

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


class GRPOSettings(ObjectiveSettings):
    group_size: int = Field(4, ge=2, description="Completions sampled per prompt (G).")
    max_new_tokens: int = Field(128, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    beta: float = Field(0.04, ge=0, description="KL penalty to the reference (DeepSeekMath: 0.04); 0 skips it.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    rewards: list[str] = Field(
        default_factory=lambda: ["gsm8k_correctness"], description="Registered reward functions, summed."
    )
    reward_weights: list[float] | None = Field(None, description="Weight of each reward function; default 1 each.")
    reward_run: Path | None = Field(None, description="A `reward` run whose model scores completions (added).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's std (paper); off = Dr. GRPO.")

    @field_validator("rewards")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in REWARD_FUNCTIONS:
                known = ", ".join(REWARD_FUNCTIONS.names())
                raise ValueError(f"unknown reward function {name!r}{closest(name, REWARD_FUNCTIONS.names())}; "
                                 f"known: {known}")
        return names


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
def _reward_model(run_dir: str):
    from tunesmith.models import load_run

    model, tokenizer = load_run(Path(run_dir), device="cpu")
    return model.requires_grad_(False), tokenizer


# --- sampling and scoring ------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_groups(model, batch: dict, settings: GRPOSettings, greedy: bool = False) -> dict:
    """G completions per prompt, batched with the KV cache: sequences (BG, P+C), completion_mask (BG, C)."""
    from tunesmith.inference import stop_token_ids

    tokenizer = _tokenizer_of(str(_language_model(model).name_or_path))
    group = 1 if greedy else settings.group_size
    input_ids = batch["input_ids"].repeat_interleave(group, 0)  # (BG, P)
    attention_mask = batch["attention_mask"].repeat_interleave(group, 0)  # (BG, P)
    stops = stop_token_ids(_language_model(model), tokenizer)
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else settings.temperature,
            top_p=None if greedy else settings.top_p, top_k=None, use_cache=True,
            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
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


def score_completions(batch: dict, samples: dict, settings: GRPOSettings) -> tuple[torch.Tensor, dict[str, list]]:
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
        from tunesmith.objectives.reward import score_conversations

        reward_model, reward_tokenizer = _reward_model(str(settings.reward_run))
        conversations = [[*prompt, {"role": "assistant", "content": text}]
                         for prompt, text in zip(prompts, samples["texts"], strict=True)]
        values = score_conversations(reward_model, reward_tokenizer, conversations)
        parts["reward_model"] = values
        total += torch.tensor(values, dtype=torch.float32)
    return total, parts


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(r - mean(group)) / std(group) for each completion (BG,) (DeepSeekMath sec. 4.1.2, outcome supervision)."""
    grouped = rewards.view(-1, group)  # (B, G)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)
    return centred.view(-1)


def completion_logps(model, samples: dict) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of each completion token (BG, C), in float32."""
    sequences, attention_mask = samples["sequences"], samples["attention_mask"]
    completion_length = samples["completion_mask"].shape[1]
    # Left-padded prompts: positions count real tokens only, as generate() numbered them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (BG, P + C)
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        logits_to_keep=completion_length + 1,
    ).logits[:, :-1].float()  # (BG, C, V): the position before each completion token predicts it
    targets = sequences[:, -completion_length:]  # (BG, C)
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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


def reference_handle(reference_model, batch: dict, settings) -> dict:
    """The loop gives the reference before `loss`, but GRPO needs it on completions sampled INSIDE `loss`:
    this hands the reference module itself to `loss` (see the report: a loop change would pass it directly)."""
    return {"reference_model": reference_model}


def _reference_logps(model, batch: dict, samples: dict) -> torch.Tensor:
    reference = batch["reference_model"]
    with torch.no_grad():
        if reference is model:  # peft: the same model with its adapters disabled
            was_training = model.training
            model.eval()
            try:
                with model.disable_adapter():
                    return completion_logps(model, samples)
            finally:
                model.train(was_training)
        return completion_logps(reference, samples)


def grpo_loss(model: torch.nn.Module, batch: dict, settings: GRPOSettings) -> LossOutput:
    samples = sample_groups(model, batch, settings)
    rewards, parts = score_completions(batch, samples, settings)  # (BG,)
    device = samples["sequences"].device
    advantages = group_advantages(rewards, samples["group"], settings.scale_rewards).to(device)  # (BG,)
    logps = completion_logps(model, samples)  # (BG, C)
    reference = _reference_logps(model, batch, samples) if settings.beta > 0 and "reference_model" in batch else None
    token_losses, kl = grpo_token_losses(logps, logps.detach(), reference, advantages, settings)
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


@torch.no_grad()
def evaluate_grpo(model: torch.nn.Module, batches: Iterable[dict], settings: GRPOSettings) -> dict[str, float]:
    """Mean reward of one greedy completion per eval prompt; eval_loss is its negative."""
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        samples = sample_groups(model, batch, settings, greedy=True)
        rewards, parts = score_completions(batch, samples, settings)
        totals["reward"] = totals.get("reward", 0.0) + float(rewards.sum())
        for name, values in parts.items():
            totals[f"reward_{name}"] = totals.get(f"reward_{name}", 0.0) + float(sum(values))
        totals["completion_length"] = totals.get("completion_length", 0.0) + float(samples["completion_mask"].sum())
        count += len(samples["texts"])
    metrics = {key: value / max(count, 1) for key, value in totals.items()}
    return {"eval_loss": -metrics.get("reward", 0.0), **metrics, "eval_prompts": count}


register(ObjectiveSpec(
    name="grpo", model_kind="causal_lm", collate=collate_prompts, loss=grpo_loss, evaluate=evaluate_grpo,
    settings=GRPOSettings, reference=reference_handle,
))
