"""DeepSpeed config files, run on PyTorch FSDP2.

Teams that train with DeepSpeed keep their ZeRO settings in a JSON file (`ds_config.json`, named by
`train.deepspeed_config`) or in the `deepspeed_config` section of an accelerate config with
`distributed_type: DEEPSPEED` (named by `train.accelerate_config`). tunesmith reads either and runs the
same partitioning with FSDP2 on each decoder layer (training/sharding.py), not with DeepSpeed's engine:

| DeepSpeed                                   | tunesmith                                                |
| ------------------------------------------- | -------------------------------------------------------- |
| ZeRO stage 0                                | `train.sharding: none` (a full replica per process)      |
| stage 1 / 2 (optimizer state / + gradients) | `fsdp` with `reshard_after_forward: false`               |
| stage 3 (+ weights)                         | `fsdp` with `reshard_after_forward: true`                |
| offload_optimizer / offload_param: cpu      | `train.cpu_offload: true` (FSDP2's CPUOffloadPolicy)     |
| bf16 / fp16 enabled                         | `train.mixed_precision: bf16 / fp16`                     |

Stages 1 and 2 keep a whole copy of the weights on every device; FSDP shards them between steps too,
so a layer's weights are whole only from its forward to its backward: memory is at most DeepSpeed's.
FSDP2's offload moves the weights as well as the optimizer state to host memory (DeepSpeed can offload
the optimizer state alone), so `offload_optimizer` alone offloads more than it says: slower, smaller.

What the training itself does (micro-batch, accumulation, clipping, optimizer) stays the run config's:
in the DeepSpeed file those values must be "auto" or agree with it, and a disagreement is a one-line
error naming both keys, never a silent choice of one. Engine tuning (bucket sizes, overlap_comm, ...)
has no FSDP counterpart and is listed as ignored when training starts; what would change the maths or
needs DeepSpeed itself (NVMe offload, ZeRO++ quantised weights or gradients, hpZ, MiCS, a DeepSpeed
scheduler, pipeline parallelism) is refused before any work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

# DeepSpeed's optimizer params -> (TrainConfig field, how to compare); eps must be torch AdamW's.
OPTIMIZER_PARAMS = {"lr": "lr", "betas": "adam_betas", "weight_decay": "weight_decay"}
TORCH_ADAMW_EPS = 1e-8
# Refused unless off (the values that mean off): they change the computation, or only DeepSpeed's engine has them.
REFUSED_ZERO_KEYS = {
    "zero_quantized_weights": ("ZeRO++ quantised weights change the numbers", (False,)),
    "zero_quantized_nontrainable_weights": ("ZeRO++ quantised weights change the numbers", (False,)),
    "zero_quantized_gradients": ("ZeRO++ quantised gradients change the numbers", (False,)),
    "zero_hpz_partition_size": ("ZeRO++ hierarchical partitioning (hpZ) needs DeepSpeed's engine", (1,)),
    "mics_shard_size": ("MiCS sharding needs DeepSpeed's engine", (-1, 0)),
}
REFUSED_TOP_KEYS = {
    "scheduler": "the schedule comes from train.scheduler and train.warmup; remove the scheduler section",
    "pipeline": "pipeline parallelism needs DeepSpeed's engine",
    "compression_training": "compression training needs DeepSpeed's engine",
    "sparse_attention": "DeepSpeed's sparse attention changes the model",
}
# Read into the plan (or checked) below; any other key is reported as ignored.
MAPPED_TOP_KEYS = {"zero_optimization", "bf16", "fp16", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "gradient_clipping", "optimizer", "train_batch_size"}


@dataclass(frozen=True)
class ZeroPlan:
    """What a DeepSpeed config asks of a run, in tunesmith's terms."""

    source: str  # the file, for messages
    stage: int
    cpu_offload: bool
    precision: str | None  # "bf16", "fp16", "no", or None when the file leaves it to the run config
    agreements: dict[str, tuple[str, Any]] = field(default_factory=dict)  # DeepSpeed key -> (train field, value)
    global_batch: int | None = None  # train_batch_size, checked once the process count is known
    ignored: tuple[str, ...] = ()

    @property
    def sharding(self) -> str:
        return "fsdp" if self.stage >= 1 else "none"

    @property
    def reshard_after_forward(self) -> bool:
        return self.stage == 3

    def describe(self) -> str:
        if self.stage == 0:
            layout = "ZeRO-0: a full replica per process"
        else:
            kept = "resharded after each forward" if self.reshard_after_forward else "kept from forward to backward"
            layout = f"ZeRO-{self.stage} on FSDP2: decoder layers sharded, gathered weights {kept}"
        offload = ", weights/gradients/optimizer state offloaded to host memory" if self.cpu_offload else ""
        ignored = f"; ignored (DeepSpeed engine tuning): {', '.join(self.ignored)}" if self.ignored else ""
        return f"deepspeed config {self.source}: {layout}{offload}{ignored}"


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def read_deepspeed_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"train.deepspeed_config: {path}: file not found")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"train.deepspeed_config: {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"train.deepspeed_config: {path}: expected a JSON object of DeepSpeed settings")
    return settings


def offload_device(section: Any, key: str, where: str) -> bool:
    """Whether an offload section (or accelerate's `*_device` value) asks for host memory; NVMe is refused."""
    device = section.get("device", "none") if isinstance(section, dict) else (section or "none")
    device = str(device).lower()
    if device == "nvme":
        raise ConfigError(f"{where}: {key} device nvme is not supported (FSDP2 offloads to host memory only); "
                          "use cpu or none")
    if device not in ("cpu", "none"):
        raise ConfigError(f"{where}: {key} device {device!r}: expected cpu or none")
    return device == "cpu"


def enabled(section: Any) -> bool | None:
    """A precision section's `enabled`: None when the section is absent or says "auto"."""
    if not isinstance(section, dict) or is_auto(section.get("enabled")):
        return None
    return bool(section.get("enabled", False))  # DeepSpeed's default for a section without the key


def plan_from_deepspeed(settings: dict, source: str, where: str = "train.deepspeed_config") -> ZeroPlan:
    """The plan of a DeepSpeed JSON config; `where` names the key that brought it, for errors."""
    for key, why in REFUSED_TOP_KEYS.items():
        if key in settings:
            raise ConfigError(f"{where}: {source}: {key}: not supported ({why})")
    zero = settings.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: {source}: zero_optimization must be an object")
    for key, (why, off) in REFUSED_ZERO_KEYS.items():
        if key in zero and zero[key] not in off:
            raise ConfigError(f"{where}: {source}: zero_optimization.{key}: not supported ({why})")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: {source}: zero_optimization.stage {stage!r}: expected 0, 1, 2 or 3")
    cpu_offload = any([offload_device(zero.get(key), f"zero_optimization.{key}", f"{where}: {source}")
                       for key in ("offload_optimizer", "offload_param")])
    if cpu_offload and stage == 0:
        raise ConfigError(f"{where}: {source}: offloading needs zero_optimization.stage 1, 2 or 3")

    bf16, fp16 = enabled(settings.get("bf16")), enabled(settings.get("fp16"))
    if bf16 and fp16:
        raise ConfigError(f"{where}: {source}: bf16 and fp16 are both enabled; enable one")
    # Both sections disabled: float32. One disabled and the other unsaid: the run config decides.
    precision = "bf16" if bf16 else "fp16" if fp16 else "no" if (bf16, fp16) == (False, False) else None

    agreements: dict[str, tuple[str, Any]] = {}
    for key, train_field in (("train_micro_batch_size_per_gpu", "batch_size"),
                             ("gradient_accumulation_steps", "grad_accum")):
        if key in settings and not is_auto(settings[key]):
            agreements[key] = (train_field, int(settings[key]))
    if "gradient_clipping" in settings and not is_auto(settings["gradient_clipping"]):
        agreements["gradient_clipping"] = clipping_agreement(settings["gradient_clipping"])
    optimizer = settings.get("optimizer")
    if optimizer is not None:
        agreements.update(optimizer_agreements(optimizer, source, where))
    global_batch = settings.get("train_batch_size")
    zero_ignored = sorted(f"zero_optimization.{key}" for key in zero
                          if key not in ("stage", "offload_optimizer", "offload_param", *REFUSED_ZERO_KEYS))
    ignored = sorted(key for key in settings if key not in MAPPED_TOP_KEYS) + zero_ignored
    return ZeroPlan(source, stage, cpu_offload, precision, agreements,
                    None if global_batch is None or is_auto(global_batch) else int(global_batch), tuple(ignored))


def clipping_agreement(value: Any) -> tuple[str, float | None]:
    clipping = float(value)
    return "max_grad_norm", clipping if clipping > 0 else None  # DeepSpeed's 0: no clipping


def optimizer_agreements(optimizer: Any, source: str, where: str) -> dict[str, tuple[str, Any]]:
    if not isinstance(optimizer, dict):
        raise ConfigError(f"{where}: {source}: optimizer must be an object")
    kind = str(optimizer.get("type", "AdamW"))
    if kind.lower() not in ("adam", "adamw"):
        raise ConfigError(f"{where}: {source}: optimizer.type {kind}: tunesmith trains with AdamW; "
                          "use Adam/AdamW or remove the optimizer section")
    params = optimizer.get("params") or {}
    if kind.lower() == "adam" and params.get("adam_w_mode") is False:
        raise ConfigError(f"{where}: {source}: optimizer.params.adam_w_mode false (L2-regularised Adam) is not "
                          "supported; tunesmith's AdamW decouples weight decay")
    eps = params.get("eps")
    if eps is not None and not is_auto(eps) and float(eps) != TORCH_ADAMW_EPS:
        raise ConfigError(f"{where}: {source}: optimizer.params.eps {eps}: tunesmith's AdamW uses {TORCH_ADAMW_EPS}")
    agreements = {}
    for key, train_field in OPTIMIZER_PARAMS.items():
        if key in params and not is_auto(params[key]):
            value = params[key]
            agreements[f"optimizer.params.{key}"] = (train_field, tuple(value) if key == "betas" else float(value))
    return agreements


def plan_from_accelerate(settings: dict, accelerate_path: Path) -> ZeroPlan:
    """The plan of an accelerate config with `distributed_type: DEEPSPEED` (its `deepspeed_config`
    section, or the JSON file that section names)."""
    where = "train.accelerate_config"
    section = settings.get("deepspeed_config") or {}
    source = str(accelerate_path)
    named = section.get("deepspeed_config_file")
    if named:
        path = Path(named)
        if not path.exists() and (accelerate_path.parent / path).exists():
            path = accelerate_path.parent / path
        plan = plan_from_deepspeed(read_deepspeed_json(path), str(path), where)
    else:
        stage = int(section.get("zero_stage", 0))
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}: {source}: deepspeed_config.zero_stage {stage}: expected 0, 1, 2 or 3")
        where_section = f"{where}: {source}: deepspeed_config"
        cpu_offload = any([offload_device(section.get(key), key, where_section)
                           for key in ("offload_optimizer_device", "offload_param_device")])
        agreements: dict[str, tuple[str, Any]] = {}
        if section.get("gradient_accumulation_steps") is not None:
            agreements["deepspeed_config.gradient_accumulation_steps"] = (
                "grad_accum", int(section["gradient_accumulation_steps"]))
        if section.get("gradient_clipping") is not None:
            agreements["deepspeed_config.gradient_clipping"] = clipping_agreement(section["gradient_clipping"])
        mapped = {"zero_stage", "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps",
                  "gradient_clipping"}
        ignored = tuple(sorted(f"deepspeed_config.{key}" for key in section if key not in mapped))
        plan = ZeroPlan(source, stage, cpu_offload, None, agreements, None, ignored)
    precision = str(settings.get("mixed_precision") or "no").lower()
    if plan.precision is None and precision in ("bf16", "fp16"):
        plan = replace(plan, precision=precision)
    return plan


def zero_plan(raw_train: dict) -> ZeroPlan | None:
    """The DeepSpeed plan a (raw, not yet validated) `train` section names, if any."""
    deepspeed_file = raw_train.get("deepspeed_config")
    accelerate_file = raw_train.get("accelerate_config")
    launched = None
    if accelerate_file is not None:
        from tunesmith.training.launch import read_accelerate_config

        try:
            settings = read_accelerate_config(Path(accelerate_file))
        except ValueError:
            settings = {}  # the accelerate_config field reports an unreadable file itself
        if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED":
            launched = plan_from_accelerate(settings, Path(accelerate_file))
    if deepspeed_file is not None:
        if launched is not None:
            raise ConfigError("train.deepspeed_config: the accelerate config is already a DeepSpeed one "
                              f"({accelerate_file}); name the DeepSpeed settings once")
        return plan_from_deepspeed(read_deepspeed_json(Path(deepspeed_file)), str(deepspeed_file))
    return launched


def apply_zero_plan(raw_train: dict, plan: ZeroPlan, defaults: dict[str, Any]) -> dict:
    """`raw_train` with the plan's sharding, offload and precision filled in; ConfigError where the run
    config says otherwise. `defaults` are TrainConfig's field defaults (a key the run config leaves out
    has its default)."""
    result = dict(raw_train)

    def given(name: str) -> Any:
        return raw_train.get(name, defaults[name])

    def disagree(deepspeed_says: str, train_field: str, auto: bool = True) -> ConfigError:
        ours = given(train_field)
        ours = "unset (the method's default)" if ours is None and train_field == "lr" else repr(ours)
        remedy = f" (or write \"auto\" in {plan.source})" if auto else ""
        return ConfigError(f"train.{train_field}: {ours}, but {plan.source} says {deepspeed_says}; "
                           f"make them agree{remedy}")

    sharding = given("sharding")
    if sharding not in ("auto", plan.sharding):
        raise disagree(f"ZeRO stage {plan.stage} (sharding {plan.sharding})", "sharding", auto=False)
    result["sharding"] = plan.sharding
    if plan.stage >= 1:
        asked = raw_train.get("reshard_after_forward", plan.reshard_after_forward)
        if bool(asked) != plan.reshard_after_forward:
            raise disagree(f"ZeRO stage {plan.stage} (reshard_after_forward {plan.reshard_after_forward})",
                           "reshard_after_forward", auto=False)
        result["reshard_after_forward"] = plan.reshard_after_forward
    if plan.cpu_offload:
        if "cpu_offload" in raw_train and not raw_train["cpu_offload"]:
            raise disagree("offload to cpu", "cpu_offload", auto=False)
        result["cpu_offload"] = True
    if plan.precision is not None:
        if given("mixed_precision") not in ("auto", plan.precision):
            raise disagree(f"mixed precision {plan.precision}", "mixed_precision")
        result["mixed_precision"] = plan.precision
    for deepspeed_key, (train_field, value) in plan.agreements.items():
        ours = given(train_field)
        same = (ours is None and value is None) or (
            ours is not None and value is not None and (
                tuple(float(part) for part in ours) == tuple(float(part) for part in value)
                if isinstance(value, tuple) else float(ours) == float(value)))
        if not same:
            raise disagree(f"{deepspeed_key} {value!r}", train_field)
    return result


def check_global_batch(plan: ZeroPlan | None, batch_size: int, grad_accum: int, processes: int) -> None:
    """DeepSpeed's train_batch_size is micro-batch x accumulation x processes: checked once the process
    count is known, before any step."""
    if plan is None or plan.global_batch is None:
        return
    ours = batch_size * grad_accum * processes
    if ours != plan.global_batch:
        raise ConfigError(f"train.batch_size: {plan.source} says train_batch_size {plan.global_batch}, but "
                          f"batch_size {batch_size} x grad_accum {grad_accum} x {processes} processes is {ours}")
