"""Checkpoints: everything needed to continue a run exactly, written atomically, in safetensors + JSON.

A checkpoint folder `checkpoints/step-000010/` is complete if and only if it exists under that
name: it is written as `.tmp-step-000010/` and renamed, so a kill mid-write leaves no half
checkpoint that resume could pick. No pickle anywhere: optimizer tensors go to safetensors and
the rest to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.training.sharding import full_tensor, shard_like

CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole host tensors. Under sharding every process must call it (each
    sharded tensor is gathered in turn); `keep=False` joins the gathers and keeps nothing."""
    state = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            tensor = full_tensor(parameter.detach())
            if keep:
                state[name] = tensor.to("cpu").contiguous().clone()
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    expected = {name for name, parameter in parameters.items() if parameter.requires_grad}
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint does not match the trainable parameters (missing {missing}, extra {extra})")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(shard_like(tensor.to(parameters[name].dtype), parameters[name]))


def optimizer_to_files(
    optimizer: torch.optim.Optimizer, keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into whole tensors (safetensors) and the rest (JSON); under sharding
    every process must call it, as for `trainable_state`."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_parameter in state_dict["state"].items():
        for key, value in per_parameter.items():
            if isinstance(value, torch.Tensor):
                value = full_tensor(value.detach())
                if keep:
                    tensors[f"{index}.{key}"] = value.to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        if isinstance(value, torch.Tensor) and value.shape == parameters[int(index)].shape:
            value = shard_like(value, parameters[int(index)])  # moments of a sharded parameter
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{device}"] = cuda_state
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda_states = [states[key] for key in sorted(states) if key.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def write_atomically(final: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to final (replacing an older final)."""
    temporary = final.parent / f".tmp-{final.name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    write(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loop_state: dict[str, Any],
    keep: int,
    is_main: bool = True,
) -> Path | None:
    """Write a checkpoint (the main process); under sharding every process calls it to join the gathers."""
    trainable = trainable_state(model, keep=is_main)
    tensors, meta = optimizer_to_files(optimizer, keep=is_main)
    if not is_main:
        return None

    def write(folder: Path) -> None:
        save_file(trainable, folder / "trainable.safetensors")
        save_file(tensors, folder / "optimizer.safetensors")
        (folder / "optimizer.json").write_text(json.dumps(meta))
        (folder / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        save_file(rng_state(), folder / "rng.safetensors")
        (folder / "state.json").write_text(json.dumps(loop_state, indent=1))

    final = checkpoints_dir / f"step-{step:06d}"
    write_atomically(final, write)
    for old in complete_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.exists():
        return []
    found = [path for path in checkpoints_dir.iterdir() if CHECKPOINT_NAME.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_NAME.match(path.name).group(1)))


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict[str, Any]:
    load_trainable_state(model, load_file(folder / "trainable.safetensors"))
    optimizer_from_files(
        optimizer, load_file(folder / "optimizer.safetensors"), json.loads((folder / "optimizer.json").read_text())
    )
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    restore_rng(load_file(folder / "rng.safetensors"))
    return json.loads((folder / "state.json").read_text())


def save_best(checkpoints_dir: Path, model: torch.nn.Module, record: dict[str, Any], is_main: bool = True) -> None:
    trainable = trainable_state(model, keep=is_main)
    if not is_main:
        return

    def write(folder: Path) -> None:
        save_file(trainable, folder / "trainable.safetensors")
        (folder / "best.json").write_text(json.dumps(record, indent=1))

    write_atomically(checkpoints_dir / "best", write)


def load_best(checkpoints_dir: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    folder = checkpoints_dir / "best"
    if not (folder / "best.json").exists():
        return None
    load_trainable_state(model, load_file(folder / "trainable.safetensors"))
    return json.loads((folder / "best.json").read_text())
