"""One typed schema for a run: YAML in, `--set key=value` overrides, one-line errors out.

Every field's `description` is its documentation; `tunesmith config-help` prints them all.
Relative paths are relative to the directory tunesmith is run from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunesmith.continual.config import ContinualConfig
from tunesmith.curate.config import CurateConfig
from tunesmith.errors import ConfigError
from tunesmith.evaluate.config import EvalSuiteConfig
from tunesmith.methods import METHODS
from tunesmith.registry import closest
from tunesmith.settings import Section, parse_yaml
from tunesmith.training.meta import MetaConfig


class ModelConfig(Section):
    name: str = Field(
        description="Built-in alias (see `tunesmith models`), a local Hugging Face folder, or a .gguf file."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a CUDA GPU that supports it, else float32 (on a CPU "
        "with bf16 matmuls, AMX or AVX512-BF16, bfloat16 trains fastest, under the bf16 autocast "
        "train.mixed_precision auto then takes: bench/README.md)."
    )
    allow_download: bool = Field(False, description="Allow fetching `name` from the Hugging Face hub.")
    allow_pickle: bool = Field(False, description="Allow loading pickled (.bin) weights; safetensors otherwise.")
    trust_remote_code: bool = Field(False, description="Allow running model code shipped with the weights.")
    revision: str | None = Field(None, description="Hub revision, only with allow_download.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    from_run: Path | None = Field(
        None,
        description="Continue from a previous tunesmith run directory (continual learning): its result is the "
        "starting point, and `name` must be that run's base model.",
    )


DataFormat = Literal["auto", "text", "instruction", "chat", "classification"]


class MixtureComponent(Section):
    """One dataset of a multi-task mixture; unset fields take the `data:` section's value."""

    name: str = Field(description="Task name; its loss and eval metrics are logged as `<name>/...`.")
    train: Path = Field(description="This task's training data (file or folder).")
    eval: Path | None = Field(None, description="This task's evaluation data; default: hold out data.eval_split.")
    format: DataFormat | None = Field(None, description="Record format of this dataset; default data.format.")
    columns: dict[str, str] | None = Field(None, description="Column map of this dataset; default data.columns.")
    limit: int | None = Field(None, ge=1, description="Use only the first N training records of this dataset.")
    weight: float | None = Field(
        None, gt=0, description="Sampling weight; default the dataset's record count (examples-proportional mixing)."
    )

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError(f"file not found: {path}")
        return path


class DataConfig(Section):
    train: Path | None = Field(
        None, description="Training data: a .jsonl/.json/.csv/.tsv/.parquet file or a folder of them."
    )
    mixture: list[MixtureComponent] | None = Field(
        None,
        description="Multi-task training instead of `train`: datasets each with a name, its own format/columns and "
        "a weight; micro-batches hold one task each and per-task losses and eval metrics are logged.",
    )
    mixture_temperature: float = Field(
        1.0, gt=0,
        description="Sampling probability of a mixture task is proportional to weight^(1/T) (weight defaults to the "
        "record count): 1 mixes by size or weight, larger T flattens towards uniform (T5, mT5).",
    )
    eval: Path | None = Field(None, description="Evaluation data; when unset, `eval_split` of train is held out.")
    eval_split: float = Field(0.05, ge=0, lt=1, description="Fraction of train held out for eval (seeded).")
    format: DataFormat = Field("auto", description="Record format; auto detects it from the first record's fields.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map of tunesmith field -> column in your file, e.g. {prompt: question, response: answer}.",
    )
    header: Literal["auto", "yes", "no"] = Field(
        "auto", description="Whether CSV/TSV files start with a header row."
    )
    max_length: int = Field(1024, ge=8, description="Tokens per record; longer records are truncated.")
    packing: bool = Field(False, description="Pack several records per row, without attention across them.")
    group_by_length: bool = Field(True, description="Batch records of similar length to reduce padding.")
    train_on_prompt: bool = Field(False, description="sft: also compute the loss on prompt tokens.")
    system_prompt: str | None = Field(None, description="System message for chats that have none.")
    labels: list[str] | None = Field(None, description="classify: label names in id order; default sorted.")
    limit: int | None = Field(None, ge=1, description="Use only the first N training records.")
    sample_weights: Path | None = Field(
        None,
        description="JSONL of {source: 'file:line', weight} per training record (e.g. `tunesmith eval --reweigh`); "
        "each record's loss is multiplied by its weight. Records without a weight get 1.",
    )
    eval_limit: int | None = Field(None, ge=1, description="Use only the first N evaluation records.")
    cache: bool = Field(
        True,
        description="Reuse the read + tokenised records of an earlier run on the same data files, data settings and "
        "tokenizer ($TUNESMITH_CACHE/prepared/); false always prepares afresh.",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="On a bad record: stop (fail) or write it to rejects.jsonl and go on (skip)."
    )

    @field_validator("train", "eval", "sample_weights")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _train_or_mixture(self):
        if (self.train is None) == (self.mixture is None):
            raise ValueError("give either `train` (one dataset) or `mixture` (several), not both or neither")
        if self.mixture is not None:
            names = [component.name for component in self.mixture]
            if not names:
                raise ValueError("mixture: needs at least one dataset")
            if len(set(names)) != len(names):
                raise ValueError(f"mixture: task names must be unique, got {names}")
            if self.eval is not None or self.sample_weights is not None:
                raise ValueError("mixture: give `eval` per mixture dataset; sample_weights needs a single `train`")
        return self

    def component(self, component: MixtureComponent) -> DataConfig:
        """The data section of one mixture dataset: this section with the dataset's own fields."""
        own = {key: value for key, value in component.model_dump(exclude={"name", "weight"}).items()
               if value is not None}
        return self.model_copy(update={"mixture": None, "eval": None, **own})

    @property
    def described(self) -> str:
        """How error messages name the training data."""
        if self.mixture is None:
            return str(self.train)
        return "data.mixture (" + ", ".join(str(component.train) for component in self.mixture) + ")"


class EarlyStoppingConfig(Section):
    metric: str = Field("eval_loss", description="Metric watched (eval_loss, accuracy, f1_macro, ...).")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for losses, max otherwise.")

    @property
    def lower_is_better(self) -> bool:
        if self.mode != "auto":
            return self.mode == "min"
        return "loss" in self.metric or "perplexity" in self.metric


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Records (or packed rows) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default from the method.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null for no clipping.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup: float = Field(
        0.03, ge=0, description="Warmup: a ratio of all steps if < 1, else a number of steps."
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at each eval).")
    keep_checkpoints: int = Field(2, ge=1, description="How many newest checkpoints to keep.")
    export_shard_size: str = Field(
        "5GB",
        description="Largest safetensors file of the exported model/ (e.g. 5GB, 500MB): a bigger model is split "
        "into model-0000k-of-0000n files with an index, as on the Hugging Face Hub. Under train.sharding: fsdp "
        "the main process holds one file's tensors at a time while exporting.",
    )
    eval_before: bool = Field(True, description="Evaluate the starting model before the first step.")
    eval_batch_size: int | None = Field(None, ge=1, description="Eval micro-batch; default batch_size.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when `metric` stops improving; `true` for the defaults."
    )
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    checkpoint_layers: int | None = Field(
        None,
        ge=1,
        description="With gradient_checkpointing: recompute only the first N decoder layers (default: all). Each "
        "recomputed layer keeps ~1/34 of its activations and runs its forward once more; `tunesmith plan` names "
        "the smallest N that fits a budget.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer and the loss (the first steps compile, ~1 min on CPU); works "
        "with train.sharding: fsdp. On an H100 (full fine-tuning, 16 x 2048 tokens, bf16): +45% tokens/s and "
        "33% less memory than eager. On a CPU eager is faster (compiled rows run in sequence, not in "
        "train.parallel_rows' threads): the CPU benchmark 3-5% fewer tokens/s, 8-9% less memory (bench/README.md).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode for train.compile. reduce-overhead replays each compiled layer as a CUDA "
        "graph (one launch instead of dozens; one process only; on an H100, full fine-tuning at 16 x 2048 tokens: "
        "the same tokens/s as default, 7% more memory: bench/README.md). max-autotune also benchmarks matmul "
        "kernels (minutes of compiling).",
    )
    parallel_rows: bool | None = Field(
        None,
        description="CPU, one process: run each micro-batch's rows in parallel threads (one per op-thread, at "
        "most one per row; the op-threads shared out among them), so one thread's serial work (allocation, "
        "dispatch, autograd) overlaps another's matmuls; the same gradients up to rounding, the same from run to "
        "run. null (auto): on where that holds (sft, pretrain, classify, reward, simpo, orpo; dpo and distill "
        "with cache_reference; batch_size >= 2; no dropout; not compiled), in as many parts as keep the extra "
        "gradient copies (one per part but the first) within 10% of the model's parameters: adapters yes, full "
        "fine-tuning no; true: one part per op-thread, or an error saying why it cannot be. CPU benchmark "
        "(2 cores), bf16 LoRA: +8% tokens/s by medians (bench/README.md).",
    )
    release_memory: bool | None = Field(
        None,
        description="CPU (glibc): true gives large tensor buffers back to the system as soon as they are freed, and "
        "the heaps' free memory every 0.25 s (lower peak resident memory, 7-20% fewer tokens/s: bench/README.md); "
        "false keeps freed buffers for reuse; "
        "null keeps them until the process's resident memory passes 80% of what it could take at the start, then "
        "gives them back for the rest of the run (at long sequences kept buffers grow far past the live tensors).",
    )
    cache_reference: bool = Field(
        False,
        description="dpo, kto, distill: compute the reference (or teacher) outputs of every record once before "
        "training instead of every step; full fine-tuning then holds no frozen copy of the model.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, and on the CPU for model.dtype bfloat16 "
        "(without it peft runs its float32 adapters on float32 copies of their inputs, at half the tokens/s); none for "
        "float32 weights on the CPU. The autocast covers the loss, "
        "the reference's outputs, rollouts and evaluation alike (as Trainer and Lightning evaluate): with float32 "
        "weights the eval metrics are those of the bf16 computation; `no` evaluates in float32. Frozen float32 "
        "weights (the base linears of LoRA, IA3, adapters; every linear of prompt and prefix tuning) are cast to bf16 "
        "once a run, not in every forward (training/weight_casts.py)."
    )
    sharding: Literal["auto", "none", "fsdp"] = Field(
        "auto",
        description="Across processes: fsdp shards each decoder layer's weights, gradients and optimizer state "
        "(FSDP2); none keeps a full replica per process; auto is fsdp when `accelerate launch` runs with an FSDP "
        "config, else none.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each layer's gathered weights after its forward and gather them again for the "
        "backward (least memory, ZeRO-3); false keeps them until the backward (less communication).",
    )
    reduce_each_micro_batch: bool = Field(
        True,
        description="fsdp with grad_accum > 1: reduce-scatter each layer's gradients after every micro-batch (the "
        "gradients stay sharded: least memory); false: only after the step's last micro-batch, each process "
        "accumulating whole layer gradients until then (1/grad_accum of the gradient traffic for one model's worth "
        "of layer gradients per process; `tunesmith plan` counts it).",
    )
    half_precision_gather: bool = Field(
        True,
        description="fsdp under mixed_precision bf16 / fp16 with float32 weights: cast each layer's shard to the half "
        "dtype before gathering it (FSDP2 MixedPrecisionPolicy: half the all-gather traffic and gathered memory, no "
        "autocast weight casts; gradients reduced in float32 into float32 shards). Norm weights then compute in the "
        "half dtype too. false: gather float32 and let autocast cast.",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp: keep the sharded layers' weights, gradients and AdamW state in host memory and step the "
        "optimizer there (FSDP2 CPUOffloadPolicy); each layer is copied to the device for its forward and backward. "
        "Least device memory, slower.",
    )
    accelerate_config: Path | None = Field(
        None,
        description="An accelerate config file (from `accelerate config`): `tunesmith train` launches itself "
        "through `accelerate launch --config_file` with it (processes, machines, FSDP; a DEEPSPEED one runs its "
        "ZeRO settings on FSDP, see deepspeed_config).",
    )
    deepspeed_config: Path | None = Field(
        None,
        description="A DeepSpeed config (JSON): its ZeRO stage, offload and precision are run on FSDP2 (stage 3: "
        "fsdp resharding after forward; 1-2: fsdp keeping gathered weights to the backward; 0: replicas; offload "
        "cpu: cpu_offload). Its batch, accumulation, clipping and AdamW values must be \"auto\" or agree with "
        "this section (training/deepspeed_config.py).",
    )
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every N steps.")
    report_to: Literal["none", "tensorboard"] = Field("none", description="Extra metrics sink.")

    @model_validator(mode="after")
    def _checkpoint_layers_need_checkpointing(self):
        if self.checkpoint_layers is not None and not self.gradient_checkpointing:
            raise ValueError("checkpoint_layers: needs gradient_checkpointing: true")
        return self

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _deepspeed_settings(cls, raw: Any) -> Any:
        """Fill sharding, offload and precision from a named DeepSpeed config (before the fields are
        validated, so a key the run config leaves out can take the file's value and one it gives must agree)."""
        if not isinstance(raw, dict) or (raw.get("deepspeed_config") is None and raw.get("accelerate_config") is None):
            return raw
        from tunesmith.training.deepspeed_config import apply_zero_plan, zero_plan

        plan = zero_plan(raw)
        if plan is None:
            return raw
        return apply_zero_plan(raw, plan, {name: info.default for name, info in cls.model_fields.items()})

    @field_validator("accelerate_config")
    @classmethod
    def _launchable(cls, path: Path | None) -> Path | None:
        if path is not None:
            from tunesmith.training.launch import check_accelerate_config

            check_accelerate_config(path)
        return path

    @field_validator("export_shard_size")
    @classmethod
    def _a_size(cls, size: str) -> str:
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            parse_size_to_int(size)
        except ValueError:
            raise ValueError(f"{size!r} is not a size; write a number and a unit, e.g. 5GB or 500MB") from None
        return size

    @field_validator("warmup")
    @classmethod
    def _whole_steps(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a warmup >= 1 is a number of steps and must be whole")
        return value


MethodConfig = Annotated[
    Union[tuple(spec.settings for spec in (METHODS.get(name) for name in METHODS.names()))],
    Field(discriminator="name"),
]


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    task: str = Field("sft", description="Objective: sft, pretrain, classify (and those registered later).")
    objective: Any = Field(
        None, validate_default=True, description="The task's own settings, e.g. {beta: 0.1} for dpo."
    )
    method: MethodConfig = Field(default_factory=lambda: METHODS.get("lora").settings())
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: Path = Field(Path("runs/run"), description="Run directory written by `tunesmith train`.")
    curate: CurateConfig | None = Field(
        None, description="Curate data.train first (see `tunesmith curate`); training reads the kept records."
    )
    eval: EvalSuiteConfig | None = Field(
        None, description="Evaluation suite run on the result after training (see `tunesmith eval`)."
    )
    continual: ContinualConfig | None = Field(
        None, description="Continue from model.from_run while guarding its skills: replay, a regulariser, "
        "a LoRA adapter per task (see docs/continual.md)."
    )
    meta: MetaConfig | None = Field(
        None, description="Reptile meta-training settings, read by `tunesmith meta-train` (docs/meta.md)."
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from tunesmith.objectives import OBJECTIVES

        if task not in OBJECTIVES:
            raise ValueError(f"unknown task {task!r}{closest(task, OBJECTIVES.names())}; "
                             f"known: {', '.join(OBJECTIVES.names())}")
        return task

    @field_validator("objective")
    @classmethod
    def _objective_settings(cls, value: Any, info) -> Any:
        from tunesmith.objectives import OBJECTIVES, ObjectiveSettings

        if "task" not in info.data:  # the task itself failed validation; that error is reported
            return value
        settings = OBJECTIVES.get(info.data["task"]).settings
        if isinstance(value, ObjectiveSettings):
            value = value.model_dump()
        return settings.model_validate(value or {})

    @model_validator(mode="after")
    def _consistent(self):
        if self.curate is not None and self.data.mixture is not None:
            raise ValueError("curate: curates a single data.train; curate each mixture dataset with `tunesmith curate`")
        if self.data.packing and self.task == "classify":
            raise ValueError("data.packing: packing applies to sft and pretrain, not classify")
        if self.data.packing and not METHODS.get(self.method.name).supports_packing:
            raise ValueError(f"data.packing: method {self.method.name} prepends virtual tokens and cannot use packing")
        if self.train.cache_reference and getattr(self.objective, "teacher_top_k", 0) is None:
            # Refused here, not when the cache pass starts: a sharded run would have loaded the teacher by then.
            raise ValueError("objective.teacher_top_k: required with train.cache_reference: true (the teacher's "
                             "k most likely tokens are stored at every response token; the whole vocabulary would "
                             "not fit)")
        if self.continual is not None and self.model.from_run is None and self.continual.needs_from_run():
            raise ValueError(f"{self.continual.needs_from_run()}: needs model.from_run (the run to continue from)")
        if self.train.lr is None:
            self.train.lr = METHODS.get(self.method.name).default_lr
        return self


# --- loading -------------------------------------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['train.lr=1e-4', 'method.r=8'] -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node[parts[-1]] = parse_yaml(raw) if raw else ""
    return nested


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, expected: str = "a mapping of sections (model, data, task, method, train)") -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return loaded


def _fields_at(model_class: type[BaseModel], location: tuple) -> list[str]:
    """Field names of the (sub)model at `location`, for suggesting the closest key to a typo."""
    current: Any = model_class
    for part in location:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def describe_validation_error(error: ValidationError, root: type[BaseModel] = None, task: str = "") -> str:
    """The first problem as one line: `key.path: what is wrong`."""
    root = root or RunConfig
    first = error.errors()[0]
    location = tuple(part for part in first["loc"] if not (isinstance(part, str) and part in METHODS))
    key = ".".join(str(part) for part in location) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        siblings = _fields_at(root, location[:-1])
        if location[:-1] == ("method",):
            siblings = _method_fields(first.get("input"), error)
        if location[:-1] == ("objective",):
            from tunesmith.objectives import OBJECTIVES

            siblings = list(OBJECTIVES.get(task).settings.model_fields) if task in OBJECTIVES else []
        return f"{key}: unknown key{closest(str(location[-1]), siblings)}"
    if kind == "missing":
        return f"{key}: required but missing"
    if kind == "union_tag_invalid":
        tag = first.get("ctx", {}).get("tag", "")
        return f"{key}.name: unknown method {tag!r}{closest(tag, METHODS.names())}; known: {', '.join(METHODS.names())}"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = f" (got {given!r})" if isinstance(given, (str, int, float, bool)) and kind != "value_error" else ""
    return f"{key}: {message}{shown}"


def _method_fields(_, error: ValidationError) -> list[str]:
    for detail in error.errors():
        if detail["loc"][:1] == ("method",) and len(detail["loc"]) > 1 and detail["loc"][1] in METHODS:
            return list(METHODS.get(detail["loc"][1]).settings.model_fields)
    return []


def build_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        task = raw.get("task", "sft") if isinstance(raw, dict) else ""
        raise ConfigError(describe_validation_error(error, task=str(task))) from None


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply `--set` overrides, validate; raise ConfigError with one line on any problem."""
    raw = read_yaml(path) if path is not None else {}
    return build_config(merge(raw, parse_overrides(overrides or [])))


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
