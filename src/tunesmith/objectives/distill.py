"""distill: knowledge distillation of a teacher's next-token distributions into the student, on sft data.

At every response token (the positions sft trains on) the student matches the teacher's distribution
under a registered divergence (`DIVERGENCES`): forward KL (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network"; word-level KD of Kim & Rush 2016), reverse KL, or the generalised Jensen-Shannon
divergence JSD(beta) of Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD), eq. 3.
The hard-label sft cross-entropy is mixed in with weight `alpha`:

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * D(teacher_T || student_T)

with both distributions softened by the temperature T. The T^2 factor keeps the soft term's gradients
on the same scale as the hard term's when T changes (Hinton et al. 2015, sec. 2).

The teacher is any model tunesmith loads (a run directory, a model folder, a .gguf, a built-in alias).
Its distributions reach the loss in one of two ways:

- on the fly (the default): the objective's `reference` hook runs the teacher, loaded once per process
  and kept, without gradients on every batch (train and eval), at the loss positions only;
- cached (`train.cache_reference: true`, which needs `teacher_top_k`): before the first step, one pass
  of the teacher computes its top-k log-probabilities (values and token ids) at every response token
  of every train and eval example, and stores them as safetensors under
  `$TUNESMITH_CACHE/teacher_log_probs/`, keyed by a hash of everything they depend on (`cache_key`).
  A later run with the same key reads them without running the teacher (an unsharded run does not even
  load it); in both cases training holds no teacher. They depend neither on the student nor on the
  temperature, divergence or alpha, so one cache serves a whole sweep over those. In a sharded run
  (`train.sharding: fsdp`) the pass runs the teacher the loop sharded like the student, every process
  on its share of the examples, so no device holds it whole; elsewhere one process loads it whole and
  runs every example.

The teacher must share the student's tokenizer: distributions over different vocabularies cannot be
compared token by token, so another tokenizer is refused with one line (checked in the loss, against
the student being trained, so that neither path needs a copy of the student).

Normalisation: `loss` returns sums over loss tokens and their count; the loop divides by the tokens of
the whole optimiser step, as for sft.

Memory: the student's logits and the loss terms are computed over chunks of `loss_chunk_tokens` loss
positions, the teacher's logits too (from its final hidden states, held for the batch: (N, H_t)), and with
gradients each chunk's gradients are computed in the forward pass (as sft's fused loss does), so the student's
and the teacher's (C, V) logits and the divergence's (C, V) intermediates exist for one chunk at a time and no
head runs again in the backward pass (sft's fused softmax does not apply to a loss between two
distributions). A teacher whose logits need its full forward (soft-capped heads) gives its (N, V) logits, in its
compute dtype (each chunk upcasts its rows), or with `teacher_top_k` its (N, k) top-k.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from tunesmith.data.collate import IGNORE_INDEX, collate_padded, eval_batches
from tunesmith.errors import ConfigError, ModelError
from tunesmith.filelock import file_lock
from tunesmith.files import write_file_atomically
from tunesmith.objectives.base import OBJECTIVES, LossOutput, ObjectiveSettings, ObjectiveSpec, register
from tunesmith.objectives.causal_lm import (
    _can_skip_unused_logits,
    _language_model,
    chunks_with_gradients,
    loss_position_hidden,
    loss_position_logits,
)
from tunesmith.registry import Registry
from tunesmith.training.distributed import rank_and_world

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
        "null: the whole vocabulary. Required with train.cache_reference, which stores these k per token."
    )
    loss_chunk_tokens: int | None = Field(
        256, ge=1, description="Compute the student's and the teacher's logits and the loss terms over chunks of this "
        "many loss positions, each chunk's gradients at once, so the (N, V) logits and the divergence's (N, V) "
        "intermediates never exist at once (exact). null: the whole batch at once."
    )
    teacher_batch_size: int = Field(
        8, ge=1, description="train.cache_reference: records per teacher forward pass (on each process of a "
        "sharded run) in the one pass that computes the teacher's log-probs before training."
    )

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, name: str) -> str:
        return DIVERGENCES.known(name)

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


def is_run_directory(teacher: str) -> bool:
    return (Path(teacher) / "config.yaml").is_file()


def load_teacher(teacher: str, device: str | torch.device, key: str = "objective.teacher"):
    """(model, tokenizer) of the teacher, in eval mode, frozen, on `device`; a ConfigError naming `key`
    (the config key or command argument that gave the teacher) when it cannot be loaded."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_run, load_tokenizer, read_run

    try:
        if is_run_directory(teacher):
            run = read_run(Path(teacher))
            if OBJECTIVES.get(run.task).model_kind != "causal_lm":
                raise ConfigError(f"{key}: {teacher} is a {run.task!r} run; the teacher must be a language model")
            model, tokenizer = load_run(Path(teacher), device=device)
        else:
            model_config = ModelConfig(name=teacher)
            model, tokenizer = load_model(model_config, "sft"), load_tokenizer(model_config)
            model.to(device)
    except ModelError as error:  # its message names model.name; here the key is `key`
        raise ConfigError(f"{key}: {str(error).removeprefix('model.name: ')}") from None
    return model.eval().requires_grad_(False), tokenizer


@functools.lru_cache(maxsize=4)
def teacher_tokenizer(teacher: str):
    """The teacher's tokenizer, read without loading its weights (for the shared-tokenizer check)."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import _run_tokenizer, load_tokenizer, read_run

    try:
        if is_run_directory(teacher):
            return _run_tokenizer(read_run(Path(teacher)))
        return load_tokenizer(ModelConfig(name=teacher))
    except ModelError as error:
        raise ConfigError(f"objective.teacher: {str(error).removeprefix('model.name: ')}") from None


@functools.lru_cache(maxsize=1)
def cached_teacher(teacher: str, device: str) -> torch.nn.Module:
    """The teacher of on-the-fly distillation, loaded once per process: every batch of every step reuses it."""
    model, _ = load_teacher(teacher, device)
    return model


def shard_teacher(settings: DistillSettings, shard: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """The `shard_reference` hook: the teacher loaded on the host and sharded like the student, so no device
    holds it whole (a teacher is usually the larger model)."""
    teacher, _ = load_teacher(settings.teacher, "cpu")
    shard(teacher)
    return teacher


@functools.lru_cache(maxsize=1)
def _student_vocabulary(folder: str) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab()
    except (OSError, ValueError):
        return None  # a student folder without a tokenizer: only the sizes can be compared


@functools.lru_cache(maxsize=4)
def _check_vocabularies(teacher: str, student_folder: str, student_vocab_size: int) -> None:
    tokenizer = teacher_tokenizer(teacher)
    student_vocabulary = _student_vocabulary(student_folder)
    if student_vocabulary is not None and tokenizer.get_vocab() != student_vocabulary:
        raise ConfigError(
            f"objective.teacher: {teacher} uses another tokenizer than the student ({len(tokenizer)} vs "
            f"{len(student_vocabulary)} tokens or different ids); distillation needs a shared tokenizer"
        )
    if len(tokenizer) > student_vocab_size:
        raise ConfigError(f"objective.teacher: the teacher's tokenizer has {len(tokenizer)} tokens, but the student "
                          f"has {student_vocab_size} output logits; distillation needs a shared tokenizer")


def check_shared_tokenizer(student: torch.nn.Module, teacher: str) -> None:
    """A ConfigError of one line unless the teacher's tokenizer is the student's (checked once per pair)."""
    language_model = _language_model(student)
    student_vocab_size = language_model.get_output_embeddings().weight.shape[0]
    _check_vocabularies(teacher, str(language_model.name_or_path), student_vocab_size)


def top_k_log_probs(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The teacher's k most likely tokens at each position: their log-probabilities under the whole
    vocabulary (N, k) and their ids (N, k), from logits (N, V).

    Log-probabilities rather than logits because they mean the same in every batch and run, so they can be
    stored; the loss renormalises them over the k tokens, which gives the same distribution as the top-k
    logits would (log_softmax is shift-invariant).
    """
    values, token_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (N, k), (N, k)
    return {"teacher_top_log_probs": values - logits.logsumexp(dim=-1, keepdim=True), "teacher_top_ids": token_ids}


@dataclass(frozen=True)
class TeacherStates:
    """The teacher's side of a batch on the fly: its final hidden states at the batch's N loss positions (N, H_t),
    in its compute dtype, and its output head. Its logits are made from them a chunk of positions at a time
    (`states[positions].logits()`), so the (N, V) logits never exist at once."""

    hidden: torch.Tensor  # (N, H_t)
    head: torch.nn.Module
    vocabulary: int  # the shared tokenizer's size: the head's columns past it are embedding padding

    def __getitem__(self, positions: slice) -> TeacherStates:
        return TeacherStates(self.hidden[positions], self.head, self.vocabulary)

    def logits(self) -> torch.Tensor:
        """(C, V) logits of these C positions in the head's compute dtype, as the teacher's forward made them
        (outside the student's autocast)."""
        with torch.no_grad(), torch.autocast(self.hidden.device.type, enabled=False):
            return self.head(self.hidden)[:, : self.vocabulary]


def teacher_logits(
    reference_model: torch.nn.Module | None, batch: dict, settings: DistillSettings
) -> dict[str, torch.Tensor | TeacherStates]:
    """The `reference` hook: the teacher's side of the batch at its N loss positions. Its final hidden states and
    head (`TeacherStates`, whose logits the loss makes chunk by chunk) where its logits are a plain head over
    them, else its logits (N, V) in its compute dtype; with teacher_top_k in that case the top-k
    log-probabilities (N, k) and their token ids (N, k). The loop runs it without gradients;
    `reference_model` is None (the spec says reference_is_starting_model=False, so the loop keeps no copy of
    the student: the teacher is this objective's own model, loaded once per process), or the teacher sharded
    by the loop (`shard_teacher`) in a run with sharded layers.
    """
    teacher = reference_model
    if teacher is None:
        teacher = cached_teacher(settings.teacher, str(batch["input_ids"].device))
    # Same tokenizer, but embedding matrices may be padded past it to different widths (Qwen 0.5B vs 7B):
    # those columns are never real tokens, so the teacher's side is cut to the tokenizer.
    vocabulary = len(teacher_tokenizer(settings.teacher))
    with torch.no_grad():
        if _can_skip_unused_logits(teacher):
            hidden, head = loss_position_hidden(teacher, batch)  # (N, H_t)
            return {"teacher_states": TeacherStates(hidden, head, vocabulary)}
        # In the head's compute dtype: a bf16 teacher's take half the memory of a float32 copy; each chunk of the
        # loss upcasts its own rows (`matched_logits`), the same values.
        logits, _ = loss_position_logits(teacher, batch, float32=False)  # (N, V_teacher)
    return teacher_rows({"teacher_logits": logits[:, :vocabulary]}, settings)


def teacher_rows(teacher: dict, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """The teacher's rows for some loss positions as the loss compares them (`matched_logits`): its logits (C, V)
    in its compute dtype, or with teacher_top_k its top-k log-probabilities and their token ids (C, k) each.
    `teacher`: those positions' `TEACHER_KEYS`; stored top-k rows are returned as they are."""
    if "teacher_states" in teacher:
        teacher = {"teacher_logits": teacher["teacher_states"].logits()}
    if settings.teacher_top_k is None or "teacher_logits" not in teacher:
        return teacher
    return top_k_log_probs(teacher["teacher_logits"].float(), settings.teacher_top_k)


# --- the teacher's top-k log-probs, computed once and stored (train.cache_reference) --------------------------

CACHE_FORMAT = "tunesmith teacher top-k log-probs v1"


def teacher_cache_folder() -> Path:
    from tunesmith.models import cache_dir

    return cache_dir() / "teacher_log_probs"


def teacher_folders(teacher: str) -> list[Path]:
    """The folders the teacher is loaded from: a run's model/ or adapter/ (and an adapter's base), or the
    resolved folder of a model folder, .gguf file (its cached conversion) or built-in alias."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import _adapter_base_folder, read_run, resolve_model

    try:
        if is_run_directory(teacher):
            run = read_run(Path(teacher))
            return [run.weights_dir, _adapter_base_folder(run)] if run.is_adapter else [run.weights_dir]
        return [resolve_model(ModelConfig(name=teacher))]
    except ModelError as error:
        raise ConfigError(f"objective.teacher: {str(error).removeprefix('model.name: ')}") from None


def teacher_fingerprint(teacher: str) -> str:
    """sha256 over the relative path and contents of every file of the teacher's folders (weights, config,
    tokenizer), and a run's model section (its dtype): a retrained or replaced teacher gets a new key; the
    same files at another path do not."""
    from tunesmith.models import read_run

    digest = hashlib.sha256()
    if is_run_directory(teacher):
        digest.update(read_run(Path(teacher)).model.model_dump_json().encode())
    for folder in teacher_folders(teacher):
        files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def cache_key(teacher: str, examples: list[dict], k: int, device: torch.device) -> str:
    """Hash of everything the stored values depend on: the teacher's files, k, the device type (bf16 on
    GPU, float32 on CPU), and every example's token ids and loss mask in order. The tokens stand for the
    data files' contents, the tokenizer, chat template, max_length and the train/eval split at once:
    they are exactly what the teacher reads, so any change to those that reaches the teacher changes the key.
    """
    digest = hashlib.sha256(f"{CACHE_FORMAT}|k={k}|device={device.type}|{teacher_fingerprint(teacher)}".encode())
    for example in examples:
        for ids in (example["input_ids"], example["labels"]):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()[:32]


def teacher_device() -> torch.device:
    """This process's accelerator (each process of a distributed run has its own current device), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _progress(total: int, quiet: bool = False) -> tuple[Progress, int]:
    progress = Progress(
        TextColumn("[bold]teacher log-probs"), BarColumn(), TextColumn("{task.completed}/{task.total} records"),
        TextColumn("{task.fields[rate]} records/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True, quiet=quiet),
    )
    return progress, progress.add_task("teacher", total=total, rate="-")


def _say(message: str) -> None:
    Console(stderr=True).print(message)


def _padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way


def _batch_top_k(
    teacher: torch.nn.Module, examples: list[dict], indices: list[int], vocabulary_size: int, pad_id: int,
    settings: DistillSettings, device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One teacher forward over the examples `indices` picks: for each of them, on the host, its top-k
    log-probs (n_i, k) float32 and their token ids (n_i, k) int32 at its n_i loss positions."""
    batch = collate_padded([examples[index] for index in indices], pad_id)
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    logits, _ = loss_position_logits(teacher, batch)  # (N, V_teacher), rows of example after example
    # The columns past the tokenizer are embedding padding (see teacher_logits).
    top = top_k_log_probs(logits[:, :vocabulary_size], settings.teacher_top_k)  # (N, k) each
    rows = (batch["targets"] != IGNORE_INDEX).sum(dim=1).tolist()  # n_i of each example in the batch
    pieces = zip(top["teacher_top_log_probs"].split(rows), top["teacher_top_ids"].split(rows), strict=True)
    return [(values.float().cpu(), token_ids.to(torch.int32).cpu()) for values, token_ids in pieces]


def _in_example_order(per_example: dict[int, tuple[torch.Tensor, torch.Tensor]], count: int) -> dict:
    """The stored tensors from example index -> its (n_i, k) pair: example after example, in index order."""
    in_order = [per_example[index] for index in range(count)]
    return {
        "teacher_top_log_probs": torch.cat([values for values, _ in in_order]),  # (M, k)
        "teacher_top_ids": torch.cat([token_ids for _, token_ids in in_order]),  # (M, k)
        "loss_positions": torch.tensor([len(values) for values, _ in in_order], dtype=torch.int64),  # (E,)
    }


@torch.no_grad()
def compute_teacher_log_probs(settings: DistillSettings, examples: list[dict], device: torch.device) -> dict:
    """One pass of the teacher, loaded whole on `device`, over `examples` (longest first, teacher_batch_size at
    a time), then the teacher is released. Returns, example after example in the order given:
    teacher_top_log_probs (M, k) float32, teacher_top_ids (M, k) int32 and loss_positions (E,), the n_i
    rows of each example (M = sum of n_i, its loss positions in order)."""
    teacher, tokenizer = load_teacher(settings.teacher, device)
    _say(f"teacher log-probs: one pass of the teacher, loaded whole on {device}, over {len(examples)} records")
    per_example: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # example index -> its (n_i, k) pair
    progress, task = _progress(len(examples))
    started, done = time.perf_counter(), 0
    with progress:
        for indices in eval_batches([len(example["input_ids"]) for example in examples], settings.teacher_batch_size):
            pieces = _batch_top_k(teacher, examples, indices, len(tokenizer), _padding_id(tokenizer), settings, device)
            per_example.update(zip(indices, pieces, strict=True))
            done += len(indices)
            progress.update(task, advance=len(indices), rate=f"{done / (time.perf_counter() - started):.1f}")
    del teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _in_example_order(per_example, len(examples))


@torch.no_grad()
def compute_teacher_log_probs_sharded(
    teacher: torch.nn.Module, settings: DistillSettings, examples: list[dict], device: torch.device
) -> dict | None:
    """The pass of `compute_teacher_log_probs` through a teacher sharded across the processes (the loop's,
    sharded like the student): the same batches, batch j run by process j % world. Every process must run
    every forward, since FSDP gathers each layer's weights from all of them, so in the last round a process
    left without a batch runs the shortest one again and discards it. Each round's results are gathered to
    process 0, which alone holds them all (as the one computing process does unsharded). Returns the same
    tensors on process 0, None on the others."""
    rank, world = rank_and_world()
    tokenizer = teacher_tokenizer(settings.teacher)  # no weights: the teacher itself is `teacher`
    vocabulary_size, pad_id = len(tokenizer), _padding_id(tokenizer)
    batches = list(eval_batches([len(example["input_ids"]) for example in examples], settings.teacher_batch_size))
    per_example: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # on process 0: example index -> (n_i, k) pair
    progress, task = _progress(len(examples), quiet=rank != 0)
    started, done = time.perf_counter(), 0
    with progress:
        for first in range(0, len(batches), world):
            mine = first + rank
            indices = batches[mine] if mine < len(batches) else batches[-1]  # batches[-1]: the shortest, discarded
            pieces = _batch_top_k(teacher, examples, indices, vocabulary_size, pad_id, settings, device)
            result = list(zip(indices, pieces, strict=True)) if mine < len(batches) else []
            # CPU tensors, one batch per process: process 0 receives a round at a time, the others never
            # hold more than their current batch.
            gathered = [None] * world if rank == 0 else None
            if world > 1:
                dist.gather_object(result, gathered, dst=0)
            else:
                gathered = [result]
            if rank == 0:
                for results in gathered:
                    per_example.update(results)
                done = len(per_example)
                progress.update(task, completed=done, rate=f"{done / (time.perf_counter() - started):.1f}")
    return _in_example_order(per_example, len(examples)) if rank == 0 else None


def _broadcast_from_first(value):
    """Process 0's `value` on every process (itself when the run is not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _store(path: Path, tensors: dict, settings: DistillSettings) -> None:
    metadata = {"format": CACHE_FORMAT, "teacher": settings.teacher, "k": str(settings.teacher_top_k)}
    # A killed run leaves no partial cache under the final name.
    write_file_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _store_from_sharded_teacher(
    load_sharded_teacher: Callable[[], torch.nn.Module], examples: list[dict], settings: DistillSettings,
    folder: Path, device: torch.device,
) -> tuple[Path, bool]:
    """The cache file of `examples` in `folder`, computed and stored unless it exists, with every process taking
    part; and whether this run computed it. Process 0 alone hashes the key (the teacher's files: many GB for a
    large teacher), looks for the file and writes it, and all processes follow its answer, so all load the
    sharded teacher and run the pass, or none does (one waiting in a collective while the others skip it
    would hang the run); a stored pass is read without loading the teacher at all. The folder must
    be one the processes share (one node, or a shared file system). Another run storing the same key at the
    same time computes the same values and replaces the file atomically: no lock is held across collectives."""
    rank, world = rank_and_world()
    found = None
    if rank == 0:
        path = folder / f"{cache_key(settings.teacher, examples, settings.teacher_top_k, device)}.safetensors"
        found = (path, path.is_file())
    path, cached = _broadcast_from_first(found)
    if cached:
        return path, False
    if rank == 0:
        _say(f"teacher log-probs: one pass of the teacher sharded across {world} processes, over "
             f"{len(examples)} records")
    teacher = load_sharded_teacher()
    tensors = compute_teacher_log_probs_sharded(teacher, settings, examples, device)
    del teacher  # freed before training starts: the loop keeps no reference to it
    if rank == 0:
        _store(path, tensors, settings)
    if world > 1:
        dist.barrier()  # the file exists before any process reads it
    return path, True


def cache_teacher_log_probs(
    load_sharded_teacher: Callable[[], torch.nn.Module] | None, examples: list[dict], settings: DistillSettings
) -> None:
    """The `cache_reference` hook: put on each example its teacher_top_log_probs (n_i, k) and teacher_top_ids
    (n_i, k) at its n_i loss positions, read from the cache when a run with the same `cache_key` stored
    them, else computed in one pass of the teacher and stored.

    In a sharded run the loop gives `load_sharded_teacher`, which loads the teacher sharded across the
    processes like the student (`shard_teacher`): called only if the pass must run, then all processes run it
    together (`compute_teacher_log_probs_sharded`) and none loads the teacher whole. Otherwise it is None:
    under a file lock the first process loads the teacher whole and computes, and the processes of the run
    (and any other run with the same key) then read its file.
    """
    if settings.teacher_top_k is None:
        raise ConfigError("objective.teacher_top_k: required with train.cache_reference: true (the teacher's k most "
                          "likely tokens are stored at every response token; the whole vocabulary would not fit)")
    device = teacher_device()
    folder = teacher_cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    if load_sharded_teacher is not None:
        path, computed = _store_from_sharded_teacher(load_sharded_teacher, examples, settings, folder, device)
    else:
        path = folder / f"{cache_key(settings.teacher, examples, settings.teacher_top_k, device)}.safetensors"
        with file_lock(folder / f".{path.stem}.lock"):  # processes of one distributed run: one computes, all read
            computed = not path.is_file()
            if computed:
                _store(path, compute_teacher_log_probs(settings, examples, device), settings)
    if not computed and rank_and_world()[0] == 0:
        _say(f"teacher log-probs: read from {path}")
    stored = load_file(str(path))
    positions = stored["loss_positions"].tolist()
    pieces = zip(stored["teacher_top_log_probs"].split(positions), stored["teacher_top_ids"].split(positions),
                 strict=True)
    for example, (values, token_ids) in zip(examples, pieces, strict=True):
        example["teacher_top_log_probs"] = values  # (n_i, k)
        example["teacher_top_ids"] = token_ids  # (n_i, k) int32


def collate_distill(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """sft's padded batch; with train.cache_reference also the examples' stored teacher top-k, concatenated
    example after example: (N, k) each, row for row the batch's N loss positions in the row-major order in
    which `loss_position_logits` takes them."""
    batch = collate_padded(examples, pad_id)
    if "teacher_top_ids" in examples[0]:
        batch["teacher_top_log_probs"] = torch.cat([example["teacher_top_log_probs"] for example in examples])
        batch["teacher_top_ids"] = torch.cat([example["teacher_top_ids"] for example in examples]).long()
    return batch


# --- loss ----------------------------------------------------------------------------------------------------------


def matched_logits(student_logits: torch.Tensor, teacher: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits and teacher logits (or log-probs: the same up to a constant per row) over the same
    K tokens: the shared vocabulary, or the teacher's top k. `teacher`: a batch, or its `TEACHER_KEYS`.

    Departure with teacher_top_k: both distributions are renormalised over the teacher's k tokens, so the
    soft term does not see the student's mass outside them (the hard-label term, alpha > 0, does). This
    keeps every divergence a proper one (reverse KL is infinite where the teacher has no mass).
    """
    if "teacher_top_ids" in teacher:
        return student_logits.gather(-1, teacher["teacher_top_ids"]), teacher["teacher_top_log_probs"]  # (N, k) each
    if "teacher_logits" not in teacher:  # the loop collates packed rows itself, without the stored values
        raise ConfigError("data.packing: packed batches do not carry the teacher log-probs that "
                          "train.cache_reference stores per record; set data.packing: false")
    teacher_logits = teacher["teacher_logits"]  # (N, V_teacher), in the teacher's compute dtype
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[:, :width], teacher_logits[:, :width].float()  # (N, V) each, float32


TEACHER_KEYS = ("teacher_states", "teacher_logits", "teacher_top_log_probs", "teacher_top_ids")
"""What the batch carries of the teacher, row for row the batch's N loss positions."""


def chunk_terms(
    student_logits: torch.Tensor, targets: torch.Tensor, teacher: dict, settings: DistillSettings
) -> dict[str, torch.Tensor]:
    """The summed terms over C loss positions, from the student's (C, V) float32 logits, the data tokens (C,)
    and the teacher's rows for those positions (`TEACHER_KEYS`): hard (sft CE), divergence (at temperature T),
    teacher_kl (forward KL at T = 1, what the tests and eval track), correct (student argmax == data token), and
    loss, the two combined (`combined_loss`)."""
    hard = F.cross_entropy(student_logits, targets, reduction="sum")  # exactly sft's loss (alpha = 1 test)
    student, teacher_side = matched_logits(student_logits, teacher_rows(teacher, settings))  # (C, K) each
    temperature = settings.temperature
    divergence = DIVERGENCES.get(settings.divergence, "objective.divergence")(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher_side / temperature, dim=-1), settings
    ).sum()
    with torch.no_grad():
        teacher_kl = kl_divergence(F.log_softmax(teacher_side, dim=-1), F.log_softmax(student, dim=-1))  # (C,)
    return {
        "loss": combined_loss(hard, divergence, settings),
        "hard": hard,
        "divergence": divergence,
        "teacher_kl": teacher_kl.sum(),
        "correct": (student_logits.argmax(-1) == targets).sum().float(),
    }


def distill_terms(model: torch.nn.Module, batch: dict, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """Summed terms over the batch's loss tokens (`chunk_terms`).

    With `loss_chunk_tokens`, over chunks of that many positions: the student's logits are computed from its
    final hidden states chunk by chunk (the teacher's too, from its `TeacherStates`), and with gradients each
    chunk's gradients are computed at once (`chunks_with_gradients`), so the logits exist for one chunk at a time
    and no head runs again in the backward pass. A model whose logits need its full forward (prompt learning,
    soft-capped heads) makes them all at once; only the terms' intermediates are chunked then, each chunk
    checkpointed (recomputed in the backward pass)."""
    check_shared_tokenizer(model, settings.teacher)
    chunk_tokens = settings.loss_chunk_tokens
    teacher = {key: batch[key] for key in TEACHER_KEYS if key in batch}
    if chunk_tokens is None:
        logits, targets = loss_position_logits(model, batch)  # (N, V) float32, (N,)
        return chunk_terms(logits, targets, teacher, settings)
    if _can_skip_unused_logits(model):
        hidden, head = loss_position_hidden(model, batch)  # (N, H)
        targets = batch["targets"][batch["targets"] != IGNORE_INDEX]  # (N,)

        def terms_of(chunk: torch.Tensor, positions: slice) -> dict[str, torch.Tensor]:
            rows = {key: value[positions] for key, value in teacher.items()}
            return chunk_terms(head(chunk).float(), targets[positions], rows, settings)  # (C, V) float32 logits

        return chunks_with_gradients(hidden, head, chunk_tokens, terms_of)
    logits, targets = loss_position_logits(model, batch)  # (N, V) float32, (N,)
    totals = None
    for start in range(0, max(targets.shape[0], 1), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        rows = {key: value[piece] for key, value in teacher.items()}
        if torch.is_grad_enabled():
            terms = checkpoint(chunk_terms, logits[piece], targets[piece], rows, settings, use_reentrant=False)
        else:
            terms = chunk_terms(logits[piece], targets[piece], rows, settings)
        totals = terms if totals is None else {name: totals[name] + value for name, value in terms.items()}
    return totals


def combined_loss(hard: torch.Tensor, divergence: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    """alpha * hard + (1 - alpha) * T^2 * divergence, summed over the loss tokens."""
    if settings.alpha == 1:
        return hard  # not 1 * hard + 0 * soft: exactly sft's loss, whatever the soft term holds
    soft = settings.temperature**2 * divergence
    return settings.alpha * hard + (1 - settings.alpha) * soft


def distill_loss(model: torch.nn.Module, batch: dict, settings: DistillSettings) -> LossOutput:
    terms = distill_terms(model, batch, settings)
    metrics = {"hard_loss": terms["hard"].detach(), "divergence": terms["divergence"].detach(),
               "teacher_kl": terms["teacher_kl"]}
    return LossOutput(terms["loss"], batch["num_loss_tokens"], metrics)


def distill_eval_sums(model: torch.nn.Module, batch: dict, settings: DistillSettings) -> dict:
    terms = distill_terms(model, batch, settings)
    return {
        "eval_loss": terms["loss"], "hard_loss": terms["hard"], "divergence": terms["divergence"],
        "teacher_kl": terms["teacher_kl"], "token_accuracy": terms["correct"], "tokens": batch["num_loss_tokens"],
    }


def distill_metrics(totals: dict) -> dict[str, float]:
    """Token-weighted means over the eval set (not means of batch means): the objective, sft's loss, its
    perplexity and token accuracy, the divergence at T, and KL(teacher || student) at T = 1."""
    tokens = totals.get("tokens", 0)
    names = ("eval_loss", "hard_loss", "divergence", "teacher_kl", "token_accuracy")
    means = {name: float(totals.get(name, 0.0)) / max(tokens, 1) for name in names}
    return {**means, "perplexity": math.exp(min(means["hard_loss"], 50.0)), "eval_tokens": tokens}


register(
    ObjectiveSpec(
        name="distill",
        model_kind="causal_lm",
        collate=collate_distill,
        loss=distill_loss,
        eval_sums=distill_eval_sums,
        eval_metrics=distill_metrics,
        settings=DistillSettings,
        supports_packing=True,
        reference=teacher_logits,
        shard_reference=shard_teacher,
        reference_is_starting_model=False,
        cache_reference=cache_teacher_log_probs,
        rows_independent=True,
    )
)
