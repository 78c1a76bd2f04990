"""Checkpoints: everything needed to continue a run exactly, written atomically, in safetensors + JSON.

A checkpoint folder `checkpoints/step-000010/` is complete if and only if it exists under that
name: it is written as `.tmp-step-000010/` and renamed, so a kill mid-write leaves no half
checkpoint that resume could pick. No pickle anywhere: tensors go to safetensors and the rest
(optimizer hyperparameters, scheduler, loop state) to JSON.

The tensors (trainable parameters, AdamW's moments) are stored in one of two layouts:
- whole, when the model is whole on every process: `trainable.safetensors` and
  `optimizer.safetensors`, written by the main process alone;
- sharded, when FSDP shards the model across processes: every process writes its own rows into the
  temporary folder, nothing is gathered, then (after a barrier) the main process writes the index
  and renames the folder (training/sharded_checkpoint.py describes the files).
Either layout loads into a model sharded over any number of processes (each reads only its own
rows) or into a whole one. `best/`, the weights early stopping exports, is written the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.training.distributed import ProcessGroup
from tunesmith.training.sharded_checkpoint import StoredTensors, read_like, write_index, write_rank_file
from tunesmith.training.sharding import sharded_across_processes

CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as they are: under sharding, this process's DTensors (nothing is gathered)."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_trainable_state(model: torch.nn.Module, stored: StoredTensors) -> None:
    parameters = dict(model.named_parameters())
    expected = {name for name, parameter in parameters.items() if parameter.requires_grad}
    if stored.names() != expected:
        missing = sorted(expected - stored.names())[:3]
        extra = sorted(stored.names() - expected)[:3]
        raise ValueError(f"checkpoint does not match the trainable parameters (missing {missing}, extra {extra})")
    with torch.no_grad():
        for name in sorted(expected):
            parameters[name].copy_(read_like(stored, name, parameters[name]))


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into its tensors, named `<parameter index>.<key>` and left as they are
    (a sharded parameter's moments are this process's DTensors), and the rest (JSON)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_parameter in state_dict["state"].items():
        for key, value in per_parameter.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, stored: StoredTensors, meta: dict) -> None:
    # Indexes follow the parameter groups, which training/optim.py splits alike in sharded and whole runs.
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key in sorted(stored.names()):
        index, name = key.split(".", 1)
        if int(index) >= len(parameters):
            raise ValueError(f"optimizer state {key}: this optimizer has {len(parameters)} parameters")
        parameter = parameters[int(index)]
        # exp_avg / exp_avg_sq have their parameter's shape (and sharding: only this process's rows are
        # read); `step` is a scalar.
        same_shape = stored.shape(key) == tuple(parameter.shape)
        state.setdefault(int(index), {})[name] = read_like(stored, key, parameter) if same_shape else stored.read(key)
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
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


def write_atomically(
    final: Path, tensors: dict[str, dict[str, torch.Tensor]], write_rest: Callable[[Path], None],
    sharded: bool, group: ProcessGroup | None,
) -> None:
    """Write `tensors` ({stem: {name: tensor}}) and the main process's other files (`write_rest(folder)`)
    into `.tmp-<final>`, then rename it to `final`, replacing an older one.

    Whole model: the main process alone does it all. Sharded model (every process calls it): the main
    process makes the temporary folder, every process writes its rank files into it, and once all have
    (a barrier), the main process writes the indexes and renames it; no process returns before that."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    barrier = group.barrier if group is not None and sharded else (lambda: None)
    temporary = final.parent / f".tmp-{final.name}"
    if rank == 0:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    barrier()
    if sharded:
        for stem, named in tensors.items():
            write_rank_file(temporary, stem, named, rank, world)
        barrier()
    if rank == 0:
        for stem, named in tensors.items():
            if sharded:
                write_index(temporary, stem, world)
            else:
                save_file({name: tensor.to("cpu", copy=True).contiguous() for name, tensor in named.items()},
                          temporary / f"{stem}.safetensors")
        write_rest(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    barrier()


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loop_state: dict[str, Any],
    keep: int,
    group: ProcessGroup | None = None,
) -> Path | None:
    """Write a checkpoint and drop all but the `keep` newest; returns its folder on the main process. A whole
    model: the main process alone calls it. A sharded one: every process does, each writing its own shards."""
    tensors, meta = optimizer_to_files(optimizer)

    def write_rest(folder: Path) -> None:  # the main process's, as the RNG state saved
        (folder / "optimizer.json").write_text(json.dumps(meta))
        (folder / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        save_file(rng_state(), folder / "rng.safetensors")
        (folder / "state.json").write_text(json.dumps(loop_state, indent=1))

    final = checkpoints_dir / f"step-{step:06d}"
    write_atomically(final, {"trainable": trainable_parameters(model), "optimizer": tensors}, write_rest,
                     sharded_across_processes(model), group)
    if group is not None and not group.is_main:
        return None
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
    """Load a checkpoint of either layout; under sharding each process reads only its own rows."""
    load_trainable_state(model, StoredTensors.open(folder, "trainable"))
    meta = json.loads((folder / "optimizer.json").read_text())
    optimizer_from_files(optimizer, StoredTensors.open(folder, "optimizer"), meta)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    restore_rng(load_file(folder / "rng.safetensors"))
    return json.loads((folder / "state.json").read_text())


def save_best(
    checkpoints_dir: Path, model: torch.nn.Module, record: dict[str, Any], group: ProcessGroup | None = None
) -> None:
    """Keep the current weights as `best/`; called like `save_checkpoint`."""
    def write_rest(folder: Path) -> None:
        (folder / "best.json").write_text(json.dumps(record, indent=1))

    write_atomically(checkpoints_dir / "best", {"trainable": trainable_parameters(model)}, write_rest,
                     sharded_across_processes(model), group)


def load_best(checkpoints_dir: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    folder = checkpoints_dir / "best"
    if not (folder / "best.json").exists():
        return None
    load_trainable_state(model, StoredTensors.open(folder, "trainable"))
    return json.loads((folder / "best.json").read_text())
