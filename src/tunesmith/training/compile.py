"""`train.compile`: torch.compile each decoder layer (regional compilation), not the whole model.

The layers of a model share one code path, so one compiled graph serves all of them and compile
time does not grow with depth; the loss is compiled on its own (below); the data path and our packed
attention stay eager (the attention function is excluded from tracing: its record lengths vary from
batch to batch). What
the compiler gains is fusing a layer's elementwise work (RMSNorm, RoPE, SiLU x up, LoRA's scale,
residual adds) into fewer passes over memory. The fusion is meant for GPUs, where the elementwise passes are
most of a step (an H100 profile of full fine-tuning at 2048 tokens: matmuls 20% of the kernel time). On a
CPU the eager step is faster: compiled code is not thread-safe (pytorch/pytorch#118260), so compiled rows run
in sequence, without `train.parallel_rows` and the CPU attention kernel for masked rows. On this project's
2-core CPU the benchmark job (SmolLM2-135M LoRA, 20 steps of packed 512-token rows) ran 3-5% slower compiled
than eager after its compiling steps (bf16 743-755 vs 772-787 tokens/s, float32 392-398 vs 408-412; the whole run
6-16% slower) at 8-9% less peak memory (bench/README.md).
Generation-heavy objectives (grpo, ppo) gain little: decoding changes shapes every token.

One shape per run: a layer is traced again whenever its inputs change shape, dtype, stride or kind,
and each trace costs seconds. So under `train.compile` the loop pads packed rows to data.max_length
and the packed block's attention mask is always a materialised tensor (training/packed_attention.py);
tests/test_compile.py checks that no graph is traced after the first step. (Before that, an H100 run
spent more time recompiling than it saved: bench/README.md.)

With `train.sharding: fsdp` the layers are compiled after `fully_shard` (compiling first traces the
same graphs: measured, equal gradients). FSDP2's hooks, which gather a layer's weights before its
forward and free them after, are excluded from tracing by PyTorch itself, so they run eagerly around
the compiled layer body; Dynamo takes the weights of FSDP-managed modules as graph inputs, not
constants, so each call reads the gathered tensors, and the compiled backward's gradients are
reduce-scattered as in eager mode. Two sharded, compiled processes reach one eager process's losses
(within 8e-8 relative) and LoRA weights (within 1e-7; compiling alone differs from eager as much):
tests/test_compile.py.

The loss is compiled too (objectives/causal_lm.py `compiled_loss_chunks`): for a plain output head, the
fused loss's float32 softmax, loss and logit gradient of each chunk (objectives/linear_cross_entropy.py);
for a wrapped head, the chunk's head matmul, float32 log-softmax and target pick. Either becomes one
graph, so the chunk's (C, V) logits are read a few times instead of once per elementwise pass. On an H100
(full fine-tuning, bf16, batch 16 x 2048, 4096-position loss chunks, steady steps; measured before the
fused loss, with the head matmul in the graph): eager 120,052 tokens/s, layers and loss compiled
174,576 (+45%, peak memory 27.9 -> 18.8 GB); in an earlier run compiling the layers alone gave +7%.
`train.compile_mode: reduce-overhead` (each compiled piece replayed as a CUDA graph: one launch
instead of dozens) ran at 173,506 in the same run: no gain at this batch (bench/README.md).
"""

from __future__ import annotations

import shutil

import torch

from tunesmith.errors import ConfigError
from tunesmith.models import decoder_layers, unwrapped_model


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU backend writes C++: refuse `train.compile` before any work when no compiler is there."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise ConfigError("train.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; "
                          "install one or set train.compile: false")


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that replay compiled code as CUDA graphs."""


def check_compile_mode(mode: str, processes: int) -> None:
    """A CUDA graph replays fixed memory addresses: under FSDP each layer's weights are gathered into new
    memory every step, and data-parallel gradient hooks fire inside the replayed backward. Neither is
    measured here, so the CUDA-graph modes are for one process."""
    if mode in CUDA_GRAPH_MODES and processes > 1:
        raise ConfigError(f"train.compile_mode: {mode} replays CUDA graphs, which tunesmith runs on one process only "
                          f"({processes} here); use default or max-autotune-no-cudagraphs")


def compile_layers(model: torch.nn.Module, mode: str = "default") -> None:
    """Compile, in place, every module of `model` whose class is one of its decoder-layer classes
    (transformers lists them in `_no_split_modules`). State-dict keys do not change."""
    layers = decoder_layers(model)
    if not layers:
        name = type(unwrapped_model(model)).__name__
        raise ConfigError(f"train.compile: no decoder layers found in {name} to compile; set train.compile: false")
    for layer in layers:
        layer.compile(mode=mode)
