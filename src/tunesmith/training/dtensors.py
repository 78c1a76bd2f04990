"""FSDP's sharded parameters (DTensors) read whole on every process.

A leaf module (torch only), so that continual/ can use it: training/sharding.py imports the model
helpers, which import the config, which imports continual/.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate


def full_tensor(tensor: torch.Tensor, sum_gradients: bool = False) -> torch.Tensor:
    """The whole tensor of a shard, on the mesh's device (a collective: every process must call it, in the
    same order); a plain tensor is returned as it is. `sum_gradients`: the gradient that flows back into
    the shard is summed across the processes (Partial), for a loss each process adds its own share of;
    by default each process's gradient is taken as the whole one (Replicate)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.to_local().device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type)  # offloaded to the host: NCCL gathers device memory
    whole = tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim)
    return whole.to_local(grad_placements=[Partial()] * tensor.device_mesh.ndim if sum_gradients else None)
