"""`train.compile` (regional torch.compile of the decoder layers) trains to the same weights as eager."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_weights, chat_records, run_config, write_jsonl
from rich.console import Console
from safetensors.torch import load_file

from tunesmith.errors import ConfigError
from tunesmith.training import loop, train
from tunesmith.training.compile import check_compile_mode, check_compiler

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)


@needs_compiler
def test_compiled_layers_train_to_the_eager_weights(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
    weights = {}
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        config = run_config(tiny_llama_dir, data, tmp_path / f"compile-{compiled}", data={"packing": True},
                            method={"name": "lora", "r": 4}, train={"max_steps": 2, "batch_size": 2,
                                                                    "compile": compiled})
        result = train(config)
        assert result.exit_code == 0
        weights[compiled] = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled run did compile
    assert weights[True].keys() == weights[False].keys()
    moved = False
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], atol=1e-5, rtol=1e-4)
        moved |= "lora_B" in name and bool(value.abs().sum() > 0)
    assert moved  # the adapters trained (B starts at zero)


@needs_compiler
def test_compiled_layers_trace_the_compilers_own_lora_dropout(tiny_llama_dir, tmp_path):
    """LoRA's keyed dropout (training/keyed_dropout.py) seeds a generator per call: a compiled run sets no seed, so
    its layers trace F.dropout into the graph, with no graph break and no graph per module."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    graphs = {}
    for dropout in (0.0, 0.2):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = run_config(tiny_llama_dir, data, tmp_path / f"run-{dropout}", data={"packing": True},
                            method={"name": "lora", "r": 4, "dropout": dropout},
                            train={"max_steps": 1, "batch_size": 2, "compile": True})
        assert train(config).exit_code == 0
        breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
        assert "Generator" not in breaks and "random_" not in breaks, breaks
        graphs[dropout] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs[0.2] == graphs[0.0]  # no graph of its own per dropout module


def test_a_compiled_cpu_run_says_its_rows_stay_in_one_thread(tiny_llama_dir, tmp_path, monkeypatch):
    """Where eager rows would run in threads, a compiled run says it keeps them in one (and why), so a CPU user
    learns that compiling costs speed there. What is under test is the choice and the note, not the compiler."""
    monkeypatch.setattr(loop, "check_compiler", lambda device: None)
    monkeypatch.setattr(loop, "compile_layers", lambda model, mode: None)
    monkeypatch.setattr(loop, "compiled_loss_chunks", contextlib.nullcontext)
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    printed = {}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for compiled in (False, True):
            config = run_config(tiny_llama_dir, data, tmp_path / f"compile-{compiled}", data={"packing": True},
                                method={"name": "lora", "r": 4},
                                train={"max_steps": 1, "batch_size": 2, "compile": compiled})
            console = Console(file=io.StringIO(), width=300)
            assert train(config, console=console).exit_code == 0
            printed[compiled] = console.file.getvalue()
    finally:
        torch.set_num_threads(saved_threads)
    assert "rows split over 2 threads" in printed[False] and "not thread-safe" not in printed[False]
    assert "not thread-safe" in printed[True] and "rows split over" not in printed[True]


def test_no_compiler_is_a_config_error_before_any_work(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile"):
        check_compiler(torch.device("cpu"))


@needs_compiler
def test_compiled_sharded_layers_train_to_the_eager_weights(tiny_llama_dir, tmp_path):
    """Two processes whose decoder layers are both FSDP-sharded and compiled reach the losses and weights of
    one eager, unsharded process with the same global batch; their checkpoint resumes on that process."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
    # max_length 40 cuts every record to one length: no recompiling for new shapes (the cold compile of
    # each process, ~1 min on 2 cores, is most of this test's time; later runs load it from inductor's cache).
    sections = {"data": {"max_length": 40}, "method": {"name": "lora", "r": 4},
                "train": {"max_steps": 2, "batch_size": 4, "save_every": 1, "max_grad_norm": 0.5, "seed": 3}}
    eager = train(run_config(tiny_llama_dir, data, tmp_path / "eager", **sections))
    assert eager.exit_code == 0

    sharded_dir = tmp_path / "sharded"
    overrides = ["train.batch_size=2", "train.sharding=fsdp", "train.compile=true", f"output_dir={sharded_dir}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29560"]
    # TORCH_LOGS=dynamo: each process logs its inductor compiles. One compile thread: with two processes on
    # a 2-core machine, a pool of compile workers per process only adds their start-up.
    environment = {**os.environ, "TORCH_LOGS": "dynamo", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    two = subprocess.run([*torchrun, "-m", "tunesmith.cli", "train", str(eager.run_dir / "config.yaml"),
                          *(part for pair in overrides for part in ("--set", pair))],
                         capture_output=True, text=True, timeout=600, env=environment)
    assert two.returncode == 0, [line for line in two.stderr.splitlines() if "rror" in line][:5]
    for rank in (0, 1):
        assert any(f"[rank{rank}]" in line and "compiler function inductor" in line for line in two.stderr.splitlines())

    summary = json.loads((sharded_dir / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"]) == (2, "fsdp")
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "sharded")}
    # Measured: losses within 8e-8 relative, weights within 5e-8 (inductor's fused float32 kernels round
    # differently from eager ones; compiling alone, unsharded, differs from eager as much).
    assert losses["sharded"] == pytest.approx(losses["eager"], rel=1e-5)
    adapter = "adapter/adapter_model.safetensors"
    assert_same_weights(eager.run_dir / adapter, sharded_dir / adapter, rtol=1e-4)

    # The step-1 checkpoint written from the compiled, sharded layers (each process its own rows) resumes on
    # one eager process to the same end (measured: within 4e-7).
    resumed = train(run_config(tiny_llama_dir, data, sharded_dir, **sections), resume=True)
    assert resumed.exit_code == 0
    assert_same_weights(eager.run_dir / adapter, sharded_dir / adapter, rtol=1e-4)


@needs_compiler
def test_compiled_packed_rows_keep_one_shape_for_the_whole_run(tiny_llama_dir, tmp_path):
    """Packed rows of different natural lengths are padded to data.max_length under train.compile, so the
    layers compiled at step 1 serve every later step: no graph is traced after the first step."""
    from tunesmith.data.collate import pack_examples

    records = [{"messages": [{"role": "user", "content": "word " * (3 + 7 * index)},
                             {"role": "assistant", "content": f"answer {index}"}]} for index in range(6)]
    data = write_jsonl(tmp_path / "uneven.jsonl", records)
    graphs = {}
    for steps in (1, 4):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = run_config(tiny_llama_dir, data, tmp_path / f"steps-{steps}", data={"packing": True, "max_length": 96},
                            method={"name": "lora", "r": 4}, train={"max_steps": steps, "batch_size": 1,
                                                                    "compile": True})
        result = train(config)
        assert result.exit_code == 0
        graphs[steps] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs[1] > 0
    assert graphs[4] == graphs[1]
    # the rows really differ in length (else the test would pass without the padding)
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer

    examples = prepare_data(config, load_tokenizer(config.model)).train
    row_lengths = {sum(len(example["input_ids"]) for example in row) for row in pack_examples(examples, 96)}
    assert len(row_lengths) >= 3


@needs_compiler
def test_compiled_loss_chunks_equal_eager_and_trace_once():
    """Under train.compile each loss chunk is one compiled graph: the same loss and gradients as eager, for
    one piece, several chunks with a short last one, and sample weights; a new number of loss positions
    reuses the graph (dynamic shapes) instead of tracing again."""
    from tunesmith.objectives.causal_lm import chunked_cross_entropy_sum, compiled_loss_chunks

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)

    def loss_and_gradients(positions: int, chunk: int | None, weighted: bool) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(positions)
        hidden = torch.randn(positions, 16, generator=generator, requires_grad=True)
        targets = torch.randint(0, 50, (positions,), generator=generator)
        targets[::5] = -100  # ignored positions, as padding and prompts are
        weights = torch.rand(positions, generator=generator) if weighted else None
        head.zero_grad()
        loss = chunked_cross_entropy_sum(hidden, head, targets, chunk, weights)
        loss.backward()
        return [loss.detach(), hidden.grad, head.weight.grad.clone()]

    cases = [(37, 8, False), (37, None, True), (37, 64, False), (54, 8, True)]
    eager = [loss_and_gradients(*case) for case in cases]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with compiled_loss_chunks():
        compiled = [loss_and_gradients(*case) for case in cases[:3]]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled.append(loss_and_gradients(*cases[3]))  # 54 positions: more chunks, a tail of a new length
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0
    for ours, reference in zip(compiled, eager, strict=True):
        for value, expected in zip(ours, reference, strict=True):
            torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
    # outside the block the eager chunk runs again: nothing more is compiled
    loss_and_gradients(37, 8, False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_cuda_graph_modes_are_refused_for_several_processes():
    check_compile_mode("reduce-overhead", 1)
    check_compile_mode("max-autotune-no-cudagraphs", 2)
    with pytest.raises(ConfigError, match="train.compile_mode: reduce-overhead .* one process"):
        check_compile_mode("reduce-overhead", 2)



def test_an_eager_run_never_loads_the_compiler(tiny_llama_dir, tmp_path, monkeypatch):
    """Without train.compile the loop never marks CUDA-graph rounds: the mark's first call imports torch's compiler
    backend (inductor), which took 3 s of every run's first step on this CPU when it was marked in every run."""

    def imports_the_compiler():
        raise AssertionError("an eager run marked a CUDA-graph round")

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", imports_the_compiler)
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    result = train(run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 1, "batch_size": 2}))
    assert result.exit_code == 0
