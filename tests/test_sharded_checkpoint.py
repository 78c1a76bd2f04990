"""Sharded checkpoints: under FSDP every process writes its own rows (no process holds a whole sharded tensor),
and a checkpoint written by 2 processes resumes on 3 sharded processes (uneven chunks) or on 1 to the weights
of the uninterrupted run; the row reading itself is checked in-process for every rank of 2, 3 and 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_same_weights, chat_records, run_cli, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tunesmith.training.sharded_checkpoint import StoredTensors, read_like, write_index, write_rank_file


def write_config(tmp_path, model_dir, name: str, batch_size: int, output: str) -> str:
    train = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat_records(2))
    path = tmp_path / f"{name}.yaml"
    # Global micro-batch 6 = 2 x 3 = 3 x 2 = 1 x 6; evaluated at the end only, so `best/` is the final step.
    path.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"data: {{train: {train}, eval: {held_out}, max_length: 128, group_by_length: true}}\n"
        "method: {name: full}\n"
        f"train: {{max_steps: 3, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 3, "
        "save_every: 2, max_grad_norm: 0.5, sharding: fsdp}\n"
        f"output_dir: {tmp_path / output}\n"
    )
    return str(path)


def torchrun(processes: int, port: int, config: str, *options: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(port), "-m", "tunesmith.cli", "train", config, *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, [line for line in completed.stderr.splitlines() if "rror" in line][:5]


def test_two_processes_write_their_own_shards_and_resume_on_three_or_one(tiny_llama_dir, tmp_path, capsys):
    torchrun(2, 29570, write_config(tmp_path, tiny_llama_dir, "two", 3, "two"))
    two = tmp_path / "two"
    assert json.loads((two / "summary.json").read_text())["sharding"] == "fsdp"

    step_2 = two / "checkpoints" / "step-000002"
    for folder, stems in [(step_2, ["trainable", "optimizer"]), (two / "checkpoints" / "best", ["trainable"])]:
        for stem in stems:
            assert not (folder / f"{stem}.safetensors").exists()
            index = json.loads((folder / f"{stem}.index.json").read_text())
            files = [folder / f"{stem}-rank{rank:05d}-of-00002.safetensors" for rank in (0, 1)]
            held = [load_file(file) for file in files]
            sharded = {name for name, entry in index["tensors"].items() if len(entry["pieces"]) == 2}
            # Every decoder-layer tensor (weights, norms, their AdamW moments) is split across the two files,
            # each holding its rows only; the replicated ones (embeddings, final norm, step) are in file 0 only.
            assert sharded and all(".layers." in name or name.split(".")[0].isdigit() for name in sharded)
            for name in sharded:
                rows = [piece["rows"] for piece in index["tensors"][name]["pieces"]]
                assert [len(part[name]) for part in held] == [stop - start for start, stop in rows]
                assert all(stop - start < index["tensors"][name]["shape"][0] for start, stop in rows)
            assert set(held[1]) == sharded
            assert set(held[0]) == set(index["tensors"])
    assert "model.embed_tokens.weight" in load_file(step_2 / "trainable-rank00000-of-00002.safetensors")

    # The step-2 checkpoint finishes the run on 3 sharded processes (chunks of 22, 22 and 20 rows for a
    # 64-row tensor) and on 1 unsharded process, to the weights the 2 processes reached without stopping.
    for copy in ("three", "one"):
        shutil.copytree(two, tmp_path / copy)
        shutil.rmtree(tmp_path / copy / "model")
    torchrun(3, 29571, write_config(tmp_path, tiny_llama_dir, "three", 2, "three"), "--resume")
    code, _, err = run_cli(capsys, "train", write_config(tmp_path, tiny_llama_dir, "one", 6, "one"), "--resume")
    assert code == 0, err[-2000:]
    for copy in ("three", "one"):
        assert_same_weights(two / "model" / "model.safetensors", tmp_path / copy / "model" / "model.safetensors",
                            rtol=1e-4)

    # The 2-process best/ loads into a whole model too (what `load_best` does before the export).
    from transformers import AutoModelForCausalLM

    from tunesmith.training.checkpoint import load_best

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert load_best(two / "checkpoints", model)["step"] == 3
    state = model.state_dict()
    for name, tensor in load_file(two / "model" / "model.safetensors").items():
        torch.testing.assert_close(state[name], tensor, msg=name)


@contextmanager
def fake_process(rank: int, world: int):
    """This process as rank `rank` of `world` (torch's fake backend: no communication, nothing launched),
    with the 1-D device mesh FSDP shards over."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def sharded_like_fsdp(tensors: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """Each `layer.` tensor as this rank's dim-0 chunk (what fully_shard makes of a decoder layer's), the
    others left whole (replicated, like the embeddings and AdamW's step)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return {name: distribute_tensor(tensor, mesh, [Shard(0)], src_data_rank=None) if name.startswith("layer.")
            else tensor for name, tensor in tensors.items()}


def local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def test_rows_written_by_two_processes_read_back_on_three_and_one(tmp_path):
    generator = torch.Generator().manual_seed(0)
    full = {
        "layer.weight": torch.randn(5, 3, generator=generator),  # 2 processes: rows 0-3, 3-5; 3: 0-2, 2-4, 4-5
        "layer.row": torch.randn(1, 8, generator=generator),  # fewer rows than processes: empty chunks
        "layer.norm": torch.randn(4, generator=generator),
        "embed": torch.randn(4, 2, generator=generator).to(torch.bfloat16),  # replicated
        "step": torch.tensor(7.0),
    }
    for rank in range(2):
        with fake_process(rank, 2) as mesh:
            write_rank_file(tmp_path, "trainable", sharded_like_fsdp(full, mesh), rank, 2)
    write_index(tmp_path, "trainable", 2)
    rank_1 = load_file(tmp_path / "trainable-rank00001-of-00002.safetensors")
    assert {name: tuple(tensor.shape) for name, tensor in rank_1.items()} == {"layer.weight": (2, 3),
                                                                              "layer.norm": (2,)}
    whole_file = tmp_path / "whole"
    whole_file.mkdir()
    save_file(full, whole_file / "trainable.safetensors")  # the layout unsharded runs write

    for folder in (tmp_path, whole_file):
        stored = StoredTensors.open(folder, "trainable")
        for rank in range(3):
            with fake_process(rank, 3) as mesh:
                expected = sharded_like_fsdp(full, mesh)
                targets = sharded_like_fsdp({name: torch.zeros_like(tensor) for name, tensor in full.items()}, mesh)
                for name, target in targets.items():
                    read = read_like(stored, name, target)
                    assert type(read) is type(target)
                    assert torch.equal(local(read), local(expected[name])), (folder.name, rank, name)
        for name, tensor in full.items():  # one unsharded process: every piece, concatenated
            assert torch.equal(read_like(stored, name, torch.zeros_like(tensor)), tensor)

    stored = StoredTensors.open(tmp_path, "trainable")
    with pytest.raises(ValueError, match="shape"):
        read_like(stored, "layer.weight", torch.zeros(6, 3))
    with safe_open(tmp_path / "trainable-rank00001-of-00002.safetensors", framework="pt") as file:
        assert json.loads(file.metadata()["pieces"])["layer.weight"]["rows"] == [3, 5]
    stored.tensors["layer.weight"]["pieces"].pop()  # a lost rank file: its rows cannot be read
    with pytest.raises(ValueError, match="rows 0..5"):
        stored.read("layer.weight")
