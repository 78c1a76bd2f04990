"""`train.accelerate_config`: a run config that names an accelerate config file launches itself with it.

`tunesmith train run.yaml` with `train.accelerate_config: fsdp.yaml` runs
`accelerate launch --config_file fsdp.yaml -m tunesmith.cli train run.yaml ...` (the same options), so
the processes, machines and FSDP settings of a team's accelerate config apply without a second
command line. Inside a launched process (accelerate or torchrun set WORLD_SIZE) nothing is relaunched.
The file is read and checked when the run config is loaded, before any process starts. A config with
`distributed_type: DEEPSPEED` launches as plain data parallel (same processes and machines) and its ZeRO
settings run on FSDP (training/deepspeed_config.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunesmith.errors import ConfigError

# accelerate's distributed types this loop runs: one process, data parallel, and FSDP (training/sharding.py).
SUPPORTED_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                   "MULTI_HPU", "FSDP"}


def read_accelerate_config(path: Path) -> dict:
    """The settings of an accelerate config file; ValueError (reported against the config key) for an
    unreadable one."""
    from tunesmith.config import read_yaml

    try:
        return read_yaml(path, expected="a mapping of accelerate settings (written by `accelerate config`)")
    except ConfigError as error:
        raise ValueError(str(error)) from None


def check_accelerate_config(path: Path) -> None:
    """Raise ValueError (reported against the config key) unless `path` is an accelerate config this loop runs."""
    settings = read_accelerate_config(path)
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind not in SUPPORTED_TYPES | {"DEEPSPEED"}:  # DEEPSPEED: read by training/deepspeed_config.py
        raise ValueError(f"{path}: distributed_type {kind} is not supported; use one of {sorted(SUPPORTED_TYPES)}")
    strategy = str((settings.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "")).upper()
    if strategy in {"HYBRID_SHARD", "HYBRID_SHARD_ZERO2", "4", "5"}:
        raise ValueError(f"{path}: fsdp_sharding_strategy {strategy} is not supported; use FULL_SHARD or SHARD_GRAD_OP")


def launched_shape(path: Path) -> tuple[int, bool]:
    """(processes in all, whether FSDP) of the launch an accelerate config file describes."""
    settings = read_accelerate_config(path)
    processes = int(settings.get("num_processes") or 1)
    fsdp = str(settings.get("distributed_type", "NO")).upper() == "FSDP"
    strategy = str((settings.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "")).upper()
    # A DEEPSPEED config's sharding is already in train.sharding (training/deepspeed_config.py).
    return processes, fsdp and strategy not in {"NO_SHARD", "3"}


def without_deepspeed(settings: dict) -> dict:
    """An accelerate config with `distributed_type: DEEPSPEED` as the plain data-parallel launch it becomes:
    the processes and machines stay, the ZeRO settings are applied by tunesmith itself (deepspeed_config.py),
    so neither accelerate nor the processes need DeepSpeed installed."""
    plain = {key: value for key, value in settings.items() if key != "deepspeed_config"}
    processes = int(settings.get("num_processes") or 1)
    if processes <= 1 and int(settings.get("num_machines") or 1) <= 1:
        plain["distributed_type"] = "NO"
    else:
        # accelerate's torchrun-based launcher, also on CPU (its MULTI_CPU type launches through MPI).
        plain["distributed_type"] = "MULTI_GPU"
    return plain


LAUNCHED_BY_US = "TUNESMITH_LAUNCHED"


def inside_launch() -> bool:
    """True in a process started by `accelerate launch` or `torchrun` (or by our own launch, even when the
    launcher ran it as a plain single process: it must never launch itself again)."""
    return "WORLD_SIZE" in os.environ or LAUNCHED_BY_US in os.environ


def launch_rank() -> int:
    """This process's rank in a launched run (0 outside one), read before the run's process group exists."""
    return int(os.environ.get("RANK", "0"))


def launch_id() -> str | None:
    """A name of the current launch of several processes, the same in each of them on every machine (None outside
    one): the rendezvous address and the launcher's run id."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return ":".join(os.environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))


def launch_with_accelerate(accelerate_config: Path, train_arguments: list[str]) -> int:
    """Run `tunesmith train` through `accelerate launch --config_file`; returns its exit code."""
    settings = read_accelerate_config(accelerate_config)
    with tempfile.TemporaryDirectory(prefix="tunesmith-launch-") as folder:
        if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED":
            accelerate_config = Path(folder) / "accelerate.yaml"
            accelerate_config.write_text(yaml.safe_dump(without_deepspeed(settings)), encoding="utf-8")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                   "-m", "tunesmith.cli", "train", *train_arguments]
        return subprocess.run(command, env={**os.environ, LAUNCHED_BY_US: "1"}).returncode


def fsdp_from_launcher() -> tuple[bool, bool | None]:
    """(whether `accelerate launch` asked for FSDP, its reshard-after-forward choice or None if unsaid).
    FSDP1 strategies map onto FSDP2's: FULL_SHARD reshards, SHARD_GRAD_OP keeps, NO_SHARD does not shard."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False, None
    choice = (os.environ.get("FSDP_RESHARD_AFTER_FORWARD") or os.environ.get("FSDP_SHARDING_STRATEGY") or "").upper()
    if choice in {"NO_SHARD", "3"}:
        return False, None
    if choice in {"TRUE", "FULL_SHARD", "1"}:
        return True, True
    if choice in {"FALSE", "SHARD_GRAD_OP", "2"}:
        return True, False
    return True, None
