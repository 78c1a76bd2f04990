"""Data parallelism across processes (launched by `accelerate launch` or `torchrun`).

Each process runs the same loop on its share of every global micro-batch. Gradients are summed
across processes after the last micro-batch of a step, and every process divides its loss by
the GLOBAL number of loss tokens of the step, so N processes reach the same weights as one
process with the same global batch (tested with 2 processes on CPU / gloo).

Why not DistributedDataParallel: our LM loss calls the backbone directly to compute logits only
at loss positions; DDP prepares its gradient reducer in its own forward, which that path
bypasses. One flattened all-reduce per optimiser step is exact and needs no wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tunesmith.training.keyed_dropout import mix_seed


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes in the default group: (0, 1) without one. For code that
    runs outside the loop's ProcessGroup (an objective's hooks, a continual penalty)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class ProcessGroup:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, global_batch: list[int]) -> list[int]:
        """This process's part of a global micro-batch (strided, so length-sorted batches stay balanced)."""
        return global_batch[self.rank :: self.world]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of small numbers across processes (one collective)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: object) -> list:
        """`value` (plain numbers, lists, dicts) from every process, in rank order (one collective)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        if not self.distributed:
            return
        # Sharded (FSDP) gradients were already summed by their reduce-scatter.
        grads = [parameter.grad for parameter in parameters
                 if parameter.grad is not None and not isinstance(parameter.grad, DTensor)]
        if not grads:
            return
        flat = torch.cat([grad.flatten() for grad in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextmanager
    def own_random_draws(self) -> Iterator[None]:
        """The block (a training step's forwards and backwards) draws its random numbers, dropout masks and sampled
        completions, from this process's own seed, and the process's generators are as before after it, one
        number further on.

        Every process starts from the one `train.seed`. Left alone, they would draw the same masks for different
        rows, and their generators would drift apart (a mask takes as many draws as its tensor has elements, and
        the processes' rows differ in length), while a checkpoint saves rank 0's state for all of them: a
        resumed run would not repeat the uninterrupted one. Here each step draws one number from the process's
        generator, the same on every process, mixes in the rank for the step's own seed, and puts the generators
        back after the step: they stay equal, so rank 0's state is every process's, on any number of processes.
        One process: the step draws from the process's generator as it is.
        """
        if not self.distributed:
            yield
            return
        draw = int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None))
        seed = mix_seed(draw, self.rank)
        device = self.accelerator.device
        cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield
