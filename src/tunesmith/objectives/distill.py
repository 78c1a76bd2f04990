"""distill: knowledge distillation of a teacher's next-token distributions into the student, on sft data.

At every response token (the positions sft trains on) the student matches the teacher's distribution
under a registered divergence (`DIVERGENCES`): forward KL (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network"; word-level KD of Kim & Rush 2016), reverse KL, or the generalised Jensen-Shannon
divergence JSD(beta) of Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD), eq. 3.
The hard-label sft cross-entropy is mixed in with weight `alpha`:

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * D(teacher_T || student_T)

with both distributions softened by the temperature T. The T^2 factor keeps the soft term's gradients
on the same scale as the hard term's when T changes (Hinton et al. 2015, sec. 2).

The teacher is any model tunesmith loads (a run directory, a model folder, a .gguf, a built-in alias),
loaded once per process and kept. Its logits are computed on the fly by the objective's `reference`
hook, which the loop runs without gradients on every batch (train and eval), at the loss positions only.
The teacher must share the student's tokenizer: distributions over different vocabularies cannot be
compared token by token, so another tokenizer is refused with one line.

Normalisation: `loss` returns sums over loss tokens and their count; the loop divides by the tokens of
the whole optimiser step, as for sft.

Memory: student and teacher logits are held as (N, V) float32 at the N loss positions (sft's chunked
loss does not apply to a loss between two distributions); with a large vocabulary, `teacher_top_k`
keeps the teacher's side at (N, k).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from tunesmith.data.collate import collate_padded
from tunesmith.errors import ConfigError, ModelError
from tunesmith.objectives.base import OBJECTIVES, LossOutput, ObjectiveSettings, ObjectiveSpec, register
from tunesmith.objectives.causal_lm import _language_model, loss_position_logits
from tunesmith.registry import Registry, closest

# --- divergences -----------------------------------------------------------------------------------------

Divergence = Callable[[torch.Tensor, torch.Tensor, "DistillSettings"], torch.Tensor]
"""divergence(student_log_probs (N, K), teacher_log_probs (N, K), settings) -> per-token divergence (N,)."""
DIVERGENCES: Registry[Divergence] = Registry("divergence")
JSD_DEFAULT_BETA = 0.5


def register_divergence(name: str):
    def decorate(function: Divergence) -> Divergence:
        return DIVERGENCES.register(name, function)

    return decorate


def kl_divergence(p_log_probs: torch.Tensor, q_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) per row (N,), from log-probabilities (N, K)."""
    return F.kl_div(q_log_probs, p_log_probs, reduction="none", log_target=True).sum(-1)


@register_divergence("forward_kl")
def forward_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, settings) -> torch.Tensor:
    """KL(teacher || student): mode-covering; the classic KD loss (Hinton et al. 2015)."""
    return kl_divergence(teacher_log_probs, student_log_probs)


@register_divergence("reverse_kl")
def reverse_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, settings) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM, Gu et al. 2024; GKD's beta -> 1 end)."""
    return kl_divergence(student_log_probs, teacher_log_probs)


@register_divergence("jsd")
def generalised_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, settings) -> torch.Tensor:
    """JSD(beta) = beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S (GKD, eq. 3).

    beta = 0.5 is the symmetric Jensen-Shannon divergence; small beta behaves like forward KL scaled
    by beta, beta near 1 like reverse KL (GKD, sec. 3).
    """
    beta = JSD_DEFAULT_BETA if settings.beta is None else settings.beta
    mixture_log_probs = torch.logsumexp(
        torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log(1 - beta)]), dim=0
    )  # (N, K)
    return beta * kl_divergence(teacher_log_probs, mixture_log_probs) + (1 - beta) * kl_divergence(
        student_log_probs, mixture_log_probs
    )


# --- settings ------------------------------------------------------------------------------------------------


class DistillSettings(ObjectiveSettings):
    teacher: str = Field(
        description="The teacher: a run directory, a model folder, a .gguf file or a built-in alias. It must "
        "use the student's tokenizer."
    )
    divergence: str = Field("forward_kl", description="forward_kl (Hinton KD), reverse_kl, or jsd (GKD's JSD(beta)).")
    beta: float | None = Field(
        None, gt=0, lt=1, description="jsd only: the teacher's weight in the mixture (GKD tries 0.1 to 0.9); "
        "null: 0.5, the symmetric JSD."
    )
    temperature: float = Field(1.0, gt=0, description="Softens both distributions; the soft loss is scaled by T^2.")
    alpha: float = Field(
        0.0, ge=0, le=1, description="Weight of the hard-label sft loss; 1 - alpha weighs the distillation loss."
    )
    teacher_top_k: int | None = Field(
        None, ge=1, description="Compare on the teacher's k most likely tokens only (both renormalised there); "
        "null: the whole vocabulary."
    )

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, name: str) -> str:
        if name not in DIVERGENCES:
            known = ", ".join(DIVERGENCES.names())
            raise ValueError(f"unknown divergence {name!r}{closest(name, DIVERGENCES.names())}; known: {known}")
        return name

    @field_validator("teacher")
    @classmethod
    def _not_empty(cls, teacher: str) -> str:
        if not teacher.strip():
            raise ValueError("give a run directory, model folder, .gguf file or built-in alias")
        return teacher

    @model_validator(mode="after")
    def _beta_needs_jsd(self):
        # null rather than a default of 0.5, so that a resolved config read back still validates
        if self.beta is not None and self.divergence != "jsd":
            raise ValueError("beta applies to divergence: jsd only")
        return self


# --- the teacher ----------------------------------------------------------------------------------------------


def _load_teacher(teacher: str, device: str):
    """(model, tokenizer) of the teacher, in eval mode, frozen, on `device`."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_run, load_tokenizer, read_run

    if (Path(teacher) / "config.yaml").is_file():  # a tunesmith run directory
        run = read_run(Path(teacher))
        if OBJECTIVES.get(run.task).model_kind != "causal_lm":
            raise ConfigError(
                f"objective.teacher: {teacher} is a {run.task!r} run; the teacher must be a language model"
            )
        model, tokenizer = load_run(Path(teacher), device=device)
    else:
        model_config = ModelConfig(name=teacher)
        model, tokenizer = load_model(model_config, "sft"), load_tokenizer(model_config)
        model.to(device)
    return model.eval().requires_grad_(False), tokenizer


@functools.lru_cache(maxsize=1)
def _student_vocabulary(folder: str) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab()
    except (OSError, ValueError):
        return None  # a student folder without a tokenizer: only the logit widths can be compared


@functools.lru_cache(maxsize=1)
def cached_teacher(teacher: str, device: str, student_folder: str, student_vocab_size: int):
    """The teacher, loaded once per process (every batch of every step reuses it), after checking that
    it shares the student's tokenizer; a ConfigError of one line otherwise."""
    try:
        model, tokenizer = _load_teacher(teacher, device)
    except ModelError as error:  # its message names model.name; here the key is objective.teacher
        raise ConfigError(f"objective.teacher: {str(error).removeprefix('model.name: ')}") from None
    student_vocabulary = _student_vocabulary(student_folder)
    teacher_vocab_size = _language_model(model).get_output_embeddings().weight.shape[0]
    if student_vocabulary is not None:
        if tokenizer.get_vocab() != student_vocabulary:
            raise ConfigError(
                f"objective.teacher: {teacher} uses another tokenizer than the student ({len(tokenizer)} vs "
                f"{len(student_vocabulary)} tokens or different ids); distillation needs a shared tokenizer"
            )
        # Same tokenizer, but the embedding matrices may be padded to different widths (Qwen 0.5B vs 7B):
        # the columns past the tokenizer are never real tokens, so both sides are cut to the shorter.
        if len(tokenizer) > min(teacher_vocab_size, student_vocab_size):
            raise ConfigError(f"objective.teacher: the shared tokenizer has {len(tokenizer)} tokens, but the teacher "
                              f"has {teacher_vocab_size} output logits and the student {student_vocab_size}")
    elif teacher_vocab_size != student_vocab_size:
        raise ConfigError(f"objective.teacher: {teacher} has {teacher_vocab_size} output logits and the student "
                          f"{student_vocab_size}; distillation needs a shared tokenizer")
    return model


def teacher_logits(reference_model: torch.nn.Module, batch: dict, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """The `reference` hook: the teacher's logits at the batch's loss positions (N, V) in float32, or with
    teacher_top_k its k largest (N, k) and their token ids (N, k). The loop runs it without gradients.

    `reference_model` is the student as it starts; only its tokenizer and vocabulary are read here.
    """
    student = _language_model(reference_model)
    student_vocab_size = student.get_output_embeddings().weight.shape[0]
    device = batch["input_ids"].device
    teacher = cached_teacher(settings.teacher, str(device), str(student.name_or_path), student_vocab_size)
    with torch.no_grad():
        logits, _ = loss_position_logits(teacher, batch)  # (N, V_teacher)
    logits = logits[:, :student_vocab_size]  # padding columns past the shared tokenizer (see cached_teacher)
    if settings.teacher_top_k is None:
        return {"teacher_logits": logits}
    values, token_ids = logits.topk(min(settings.teacher_top_k, logits.shape[-1]), dim=-1)  # (N, k), (N, k)
    return {"teacher_top_logits": values, "teacher_top_ids": token_ids}


# --- loss ----------------------------------------------------------------------------------------------------------


def matched_logits(student_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits over the same K tokens: the shared vocabulary, or the teacher's top k.

    Departure with teacher_top_k: both distributions are renormalised over the teacher's k tokens, so the
    soft term does not see the student's mass outside them (the hard-label term, alpha > 0, does). This
    keeps every divergence a proper one (reverse KL is infinite where the teacher has no mass).
    """
    if "teacher_top_ids" in batch:
        return student_logits.gather(-1, batch["teacher_top_ids"]), batch["teacher_top_logits"]  # (N, k) each
    teacher = batch["teacher_logits"]  # (N, V_teacher)
    width = min(student_logits.shape[-1], teacher.shape[-1])
    return student_logits[:, :width], teacher[:, :width]  # (N, V) each


def distill_terms(model: torch.nn.Module, batch: dict, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """Summed terms over the batch's loss tokens: hard (sft CE), divergence (at temperature T), teacher_kl
    (forward KL at T = 1, what the tests and eval track), correct (student argmax == data token)."""
    logits, targets = loss_position_logits(model, batch)  # (N, V) float32, (N,)
    hard = F.cross_entropy(logits, targets, reduction="sum")  # exactly sft's loss (alpha = 1 test)
    student, teacher = matched_logits(logits, batch)  # (N, K) each
    temperature = settings.temperature
    divergence = DIVERGENCES.get(settings.divergence, "objective.divergence")(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1), settings
    )  # (N,)
    with torch.no_grad():
        teacher_kl = kl_divergence(F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1))  # (N,)
    return {
        "hard": hard,
        "divergence": divergence.sum(),
        "teacher_kl": teacher_kl.sum(),
        "correct": (logits.argmax(-1) == targets).sum().float(),
    }


def combined_loss(terms: dict[str, torch.Tensor], settings: DistillSettings) -> torch.Tensor:
    """alpha * hard + (1 - alpha) * T^2 * divergence, summed over the loss tokens."""
    if settings.alpha == 1:
        return terms["hard"]  # not 1 * hard + 0 * soft: exactly sft's loss, whatever the soft term holds
    soft = settings.temperature**2 * terms["divergence"]
    return settings.alpha * terms["hard"] + (1 - settings.alpha) * soft


def distill_loss(model: torch.nn.Module, batch: dict, settings: DistillSettings) -> LossOutput:
    terms = distill_terms(model, batch, settings)
    metrics = {"hard_loss": terms["hard"].detach(), "divergence": terms["divergence"].detach(),
               "teacher_kl": terms["teacher_kl"]}
    return LossOutput(combined_loss(terms, settings), batch["num_loss_tokens"], metrics)


@torch.no_grad()
def evaluate_distill(model: torch.nn.Module, batches: Iterable[dict], settings: DistillSettings) -> dict[str, float]:
    """Token-weighted means over the eval set (not means of batch means): the objective, sft's loss, its
    perplexity and token accuracy, the divergence at T, and KL(teacher || student) at T = 1."""
    totals = {"eval_loss": 0.0, "hard_loss": 0.0, "divergence": 0.0, "teacher_kl": 0.0, "token_accuracy": 0.0}
    tokens = 0
    for batch in batches:
        terms = distill_terms(model, batch, settings)
        totals["eval_loss"] += float(combined_loss(terms, settings))
        totals["hard_loss"] += float(terms["hard"])
        totals["divergence"] += float(terms["divergence"])
        totals["teacher_kl"] += float(terms["teacher_kl"])
        totals["token_accuracy"] += float(terms["correct"])
        tokens += batch["num_loss_tokens"]
    means = {name: value / max(tokens, 1) for name, value in totals.items()}
    return {**means, "perplexity": math.exp(min(means["hard_loss"], 50.0)), "eval_tokens": tokens}


register(
    ObjectiveSpec(
        name="distill",
        model_kind="causal_lm",
        collate=collate_padded,
        loss=distill_loss,
        evaluate=evaluate_distill,
        settings=DistillSettings,
        supports_packing=True,
        reference=teacher_logits,
    )
)
