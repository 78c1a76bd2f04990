"""Sharded checkpoint files: each process writes the rows it holds, and a JSON index says where every row is.

Under FSDP (training/sharding.py) each decoder-layer parameter and its AdamW moments are DTensors cut
along dim 0 into torch.chunk-style pieces, one per process (the last ones smaller, or empty). A
checkpoint of such a model is written without gathering anything; for the trainable parameters:

    trainable-rank00000-of-00002.safetensors   process 0's rows of each sharded tensor, and the whole
                                               replicated ones (embeddings, final norm, head: process 0 only)
    trainable-rank00001-of-00002.safetensors   process 1's rows of each sharded tensor
    trainable.index.json                       {"format": "tunesmith-sharded", "processes": 2, "tensors":
                                                 {name: {"shape": [96, 64], "dtype": "float32", "pieces":
                                                   [{"file": "trainable-rank00000-of-00002.safetensors",
                                                     "rows": [0, 48]}, ...]}}}

and the same with `optimizer` for AdamW's tensors. "rows" is the range [start, stop) of dim 0 a file
holds (null for a 0-dim tensor, held whole). Each rank file lists its pieces in its safetensors
metadata; the main process builds the index from those headers once every process has written, so
the index describes exactly what is on disk. Safetensors + JSON only: torch.distributed.checkpoint
does the same job, but its metadata file is pickled.

`StoredTensors` reads this layout and a single whole-tensor file (`trainable.safetensors`, written by
unsharded runs) alike, any range of rows at a time through safetensors' slices: a process of a sharded
model reads only its own rows, whatever the number of processes that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

FORMAT = "tunesmith-sharded"

Rows = tuple[int, int] | None  # [start, stop) of dim 0; None: a 0-dim tensor, held whole


def rank_file(stem: str, rank: int, world: int) -> str:
    return f"{stem}-rank{rank:05d}-of-{world:05d}.safetensors"


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor) and any(placement.is_shard() for placement in tensor.placements)


def held_rows(tensor: torch.Tensor) -> Rows:
    """The rows of dim 0 this process holds of `tensor`: its own chunk of a tensor sharded along dim 0,
    all of any other."""
    if tensor.ndim == 0:
        return None
    if not is_sharded(tensor):
        return 0, tensor.shape[0]
    # The function torch.distributed.checkpoint uses to place a shard in its global tensor.
    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local_shape) != tuple(tensor.to_local().shape) or tuple(local_shape[1:]) != tuple(tensor.shape[1:]):
        raise ValueError(f"checkpoints store shards cut along dim 0 only; got {tensor.placements} for a tensor "
                         f"of shape {tuple(tensor.shape)} (local {tuple(tensor.to_local().shape)})")
    return offset[0], offset[0] + local_shape[0]


def write_rank_file(folder: Path, stem: str, tensors: dict[str, torch.Tensor], rank: int, world: int) -> None:
    """Write this process's part of `tensors` (every process, each its own file): its rows of each sharded
    tensor and, on process 0 alone, every tensor that is whole on each process."""
    data: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict] = {}
    for name, tensor in tensors.items():
        rows = held_rows(tensor)
        if rank != 0 and not is_sharded(tensor):
            continue  # replicated: written once
        if rank != 0 and rows[0] == rows[1]:
            continue  # an empty chunk: the tensor has fewer rows than there are processes
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        # A copy on the host: a shard may live on a device, or share its storage with the training state.
        data[name] = local.detach().to("cpu", copy=True).contiguous()
        pieces[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                        "rows": list(rows) if rows is not None else None}
    save_file(data, folder / rank_file(stem, rank, world), metadata={"pieces": json.dumps(pieces)})


def write_index(folder: Path, stem: str, world: int) -> None:
    """`<stem>.index.json` from the pieces the rank files list (the main process, once all are written);
    refuses pieces that leave a gap or overlap."""
    tensors: dict[str, dict] = {}
    for rank in range(world):
        file_name = rank_file(stem, rank, world)
        with safe_open(folder / file_name, framework="pt") as file:
            pieces = json.loads(file.metadata()["pieces"])
        for name, piece in pieces.items():
            entry = tensors.setdefault(name, {"shape": piece["shape"], "dtype": piece["dtype"], "pieces": []})
            entry["pieces"].append({"file": file_name, "rows": piece["rows"]})
    for name, entry in tensors.items():
        rows = sorted(tuple(piece["rows"] or (0, 0)) for piece in entry["pieces"])
        starts = [0] + [stop for _, stop in rows]
        end = entry["shape"][0] if entry["shape"] else 0
        if [start for start, _ in rows] != starts[:-1] or starts[-1] != end:
            raise RuntimeError(f"sharded checkpoint: the pieces of {name} ({rows}) do not tile its {end} rows")
    index = {"format": FORMAT, "processes": world, "tensors": tensors}
    (folder / f"{stem}.index.json").write_text(json.dumps(index, indent=1))


class StoredTensors:
    """The tensors of one stem (`trainable`, `optimizer`) of a checkpoint folder, whole or sharded."""

    def __init__(self, folder: Path, tensors: dict[str, dict]):
        self.folder = folder
        self.tensors = tensors  # name -> {"shape", "pieces": [{"file", "rows"}]}, as in the index

    @classmethod
    def open(cls, folder: Path, stem: str) -> StoredTensors:
        whole, index = folder / f"{stem}.safetensors", folder / f"{stem}.index.json"
        if index.exists():
            return cls(folder, json.loads(index.read_text())["tensors"])
        if not whole.exists():
            raise ValueError(f"{folder} holds neither {whole.name} nor {index.name}")
        tensors = {}
        with safe_open(whole, framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 (a safetensors file, not a dict: it has no __iter__)
                shape = file.get_slice(name).get_shape()
                tensors[name] = {"shape": shape, "pieces": [{"file": whole.name, "rows": [0, shape[0]] if shape
                                                                else None}]}
        return cls(folder, tensors)

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, rows: Rows = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `name` (all of it when `rows` is None), read from the
        pieces that hold them and nothing more."""
        shape, pieces = self.shape(name), self.tensors[name]["pieces"]
        if not shape:
            return self.slice(pieces[0]["file"], name, None)
        start, stop = rows if rows is not None else (0, shape[0])
        if start == stop:  # an empty chunk; the empty slice has the stored dtype and trailing dims
            return self.slice(pieces[0]["file"], name, (0, 0))
        parts = []
        for piece in pieces:
            first, last = piece["rows"]
            if max(start, first) < min(stop, last):
                parts.append(self.slice(piece["file"], name, (max(start, first) - first, min(stop, last) - first)))
        if sum(len(part) for part in parts) != stop - start:
            raise ValueError(f"{name}: the checkpoint does not hold rows {start}..{stop} of its {shape[0]}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def slice(self, file_name: str, name: str, rows: Rows) -> torch.Tensor:
        with safe_open(self.folder / file_name, framework="pt") as file:
            return file.get_tensor(name) if rows is None else file.get_slice(name)[rows[0] : rows[1]]


def read_like(stored: StoredTensors, name: str, like: torch.Tensor) -> torch.Tensor:
    """Tensor `name` laid out as `like`, in its dtype and on its device: a DTensor holding only this
    process's rows when `like` is sharded, the whole tensor otherwise."""
    if stored.shape(name) != tuple(like.shape):
        raise ValueError(f"{name}: the checkpoint holds shape {stored.shape(name)}, this model {tuple(like.shape)}")
    if not isinstance(like, DTensor):
        return stored.read(name).to(like.device, like.dtype)
    # The shard's own device: under CPU offload it is the host, not the mesh's device.
    local = stored.read(name, held_rows(like)).to(like.to_local().device, like.dtype)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())
