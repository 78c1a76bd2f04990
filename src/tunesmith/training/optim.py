"""AdamW with the usual no-decay groups, and warmup + decay schedules (transformers' get_scheduler)."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from tunesmith.config import TrainConfig
from tunesmith.models import decoder_layers


def build_optimizer(model: torch.nn.Module, train: TrainConfig, method=None, method_settings=None) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in BERT and GPT-2 practice.

    A method may shape the parameter groups itself (LoRA+ gives B matrices a larger learning rate)
    through `MethodSpec.optimizer_groups`.
    """
    custom = getattr(method, "optimizer_groups", None)
    if custom is not None:
        groups = custom(model, method_settings, train.lr, train.weight_decay)
    else:
        decay, no_decay = [], []
        for parameter in model.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = split_at_decoder_layers(groups, model)
    parameters = [parameter for group in groups for parameter in group["params"]]
    # The fused kernel (one pass over all parameters) exists for CPU and CUDA: on CPU it steps ~5x faster
    # than the default per-tensor loop (bench: 102M parameters, 818 -> 164 ms a step on one thread).
    fused = all(parameter.device.type in ("cpu", "cuda") for parameter in parameters)
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, fused=fused or None)


def split_at_decoder_layers(groups: list[dict], model: torch.nn.Module) -> list[dict]:
    """Each group in two: the parameters of decoder layers, then the others. Under FSDP the first are
    sharded and the second not, and one fused AdamW call cannot mix the two kinds; the split is made
    in every run, so a checkpoint's optimizer state lines up whether the run that wrote it was sharded."""
    in_layers = {id(parameter) for layer in decoder_layers(model) for parameter in layer.parameters()}
    return [
        {**group, "params": part}
        for group in groups
        for part in ([p for p in group["params"] if id(p) in in_layers],
                     [p for p in group["params"] if id(p) not in in_layers])
        if part
    ]


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    return round(train.warmup * total_steps) if train.warmup < 1 else int(train.warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    names = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        names[train.scheduler],
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(train, total_steps),
        num_training_steps=total_steps,
    )
