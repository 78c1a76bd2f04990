"""LoRA's dropout masks drawn from a seed per micro-batch part and a number per module, on the CPU.

`nn.Dropout` draws its masks from the process's one random generator, in the order the modules run. That order is
fixed only while one thread runs the forward: with a micro-batch's rows in parallel threads (`train.parallel_rows`,
training/parallel_rows.py) two forwards would take turns at the generator as the scheduler decides, and a run
would not repeat. Here each part of a micro-batch gets its own seed, drawn from that generator in part order before
the parts start (so a run repeats, and resumes, with the generator's state in its checkpoints), and each LoRA
dropout module its own number; a mask depends on the pair alone, not on which thread asks or when. A recomputed
layer (`train.gradient_checkpointing`) draws the same masks again in the backward, since the part's seed is set
for its backward too.

It is also faster, and holds less: `F.dropout` on the CPU draws one Bernoulli sample per element from the
Mersenne Twister (~4 ns each, one core) and keeps a noise tensor in the input's dtype for the backward; a keyed
mask takes 15 random bits per element, four lanes from each 64-bit draw, so `p` is applied to 1/32768. In float32
it keeps a bool mask; in half precision (and under autocast) nothing: the backward makes the mask again (`DropBits`).
One (1024, 576) input, one thread, forward and backward: float32 3.5 -> 2.5 ms, bf16 3.3 -> 2.0 ms (bench/README.md).

A module called twice for the same rows within one part draws the same mask twice; LoRA's linears run once per
forward. On a GPU, and in compiled layers (`train.compile`, whose rows run in one thread), the loop sets no seed and
the modules are `nn.Dropout`: CUDA's fused kernel, the compiler's own dropout (a seeded generator per call would
break the graph at every module).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

RESOLUTION = 1 << 15  # a keyed mask compares 15 random bits per element with p * RESOLUTION
_MASK64 = (1 << 64) - 1
_part = threading.local()  # .seed: the running part's seed in this thread, or None


class KeyedDropout(torch.nn.Dropout):
    """`nn.Dropout` whose mask comes from the running part's seed (`dropout_seed`) and `key`, this module's number
    in the model; with no seed set, `nn.Dropout` itself."""

    def __init__(self, p: float, key: int):
        super().__init__(p)
        self.key = key

    def drop(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`x` with the dropped elements zeroed, and the factor the kept ones still need (1 / keep probability), for
        a caller that folds it into a scale it applies anyway (LoRA's fast forward: methods/lora_forward.py)."""
        seed = getattr(_part, "seed", None)
        if not self.training or self.p == 0 or seed is None or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training), 1.0
        seed = mix_seed(seed, self.key)
        rescale = RESOLUTION / (RESOLUTION - dropped_count(self.p))
        # Half precision, or autocast's (its matmul after would cast x anyway: cast first, the same values).
        compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if compute_dtype in (torch.bfloat16, torch.float16):
            return DropBits.apply(x.to(compute_dtype), self.p, seed), rescale
        return x * keep_mask(x.shape, self.p, seed), rescale  # autograd keeps the bool mask for the backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped, rescale = self.drop(x)
        return dropped if rescale == 1.0 else dropped * rescale

    def extra_repr(self) -> str:
        return f"p={self.p}, key={self.key}"


class DropBits(torch.autograd.Function):
    """A half-precision tensor with its dropped elements zeroed, forward and backward, by AND-ing their bits with
    the mask's (all ones where kept): one integer pass, where a half tensor times a bool takes PyTorch's mixed-dtype
    path (~4x a same-dtype product). The backward makes the mask again from its seed rather than keeping it: one
    (1024, 576) bf16 input, forward and backward, 2.2 -> 1.8 ms, and no mask held (bench/README.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return (x.view(torch.int16) & keep_bits(x.shape, p, seed)).view(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (grad.view(torch.int16) & keep_bits(grad.shape, ctx.p, ctx.seed)).view(grad.dtype), None, None


def dropped_count(p: float) -> int:
    """p as a count of RESOLUTION: a lane below it is dropped."""
    return min(round(p * RESOLUTION), RESOLUTION - 1)


def random_lanes(shape: torch.Size, seed: int) -> torch.Tensor:
    """int16 values of `shape`, uniform on [0, RESOLUTION), the same for the same seed whatever the thread count:
    the low 15 bits of four 16-bit lanes per 64-bit draw."""
    count = shape.numel()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    return draws.view(torch.int16)[:count].view(shape) & (RESOLUTION - 1)


def keep_mask(shape: torch.Size, p: float, seed: int) -> torch.Tensor:
    """A bool mask of `shape`, each element kept with probability 1 - p (p to 1/32768)."""
    return random_lanes(shape, seed) >= dropped_count(p)


def keep_bits(shape: torch.Size, p: float, seed: int) -> torch.Tensor:
    """`keep_mask` as int16 bits: all ones where kept, zeros where dropped."""
    lanes = random_lanes(shape, seed)
    # lane - dropped < 0 where dropped: shifted right by 15 (sign-filling), all ones there; inverted, where kept.
    return lanes.sub_(dropped_count(p)).bitwise_right_shift_(15).bitwise_not_()


def mix_seed(seed: int, key: int) -> int:
    """A 64-bit seed for module `key` within the part seeded `seed` (SplitMix64's finaliser, Steele et al. 2014):
    nearby seeds and keys give unrelated generators."""
    z = (seed + (key + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@contextmanager
def dropout_seed(seed: int | None) -> Iterator[None]:
    """Keyed dropout modules draw from `seed` in this thread while the block runs (a part's forward and
    backward); None: they are plain `nn.Dropout`."""
    saved = getattr(_part, "seed", None)
    _part.seed = seed
    try:
        yield
    finally:
        _part.seed = saved


def part_seeds(count: int) -> list[int]:
    """One seed per part, drawn from the process's generator (the one a checkpoint saves) in part order."""
    return torch.empty(count, dtype=torch.int64).random_(-(1 << 63), None).tolist()


def use_keyed_dropout(model: torch.nn.Module) -> None:
    """Swap each LoRA layer's active dropout (`lora_dropout`, an `nn.Dropout` with p > 0) for a `KeyedDropout`
    with the next number."""
    key = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = KeyedDropout(dropout.p, key)
                key += 1


def keyed_dropout_in(model: torch.nn.Module) -> bool:
    """Whether `model` (or one layer of it) has a keyed dropout that drops anything: the loop then draws part seeds
    on a CPU; tunesmith.plan counts the LoRA linears that have one."""
    return any(isinstance(module, KeyedDropout) and module.p > 0 for module in model.modules())
