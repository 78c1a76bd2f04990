"""Activation checkpointing (recomputation) for all the decoder layers or only some of them.

Checkpointing a decoder layer keeps only its input for the backward and runs its forward again when
the backward reaches it: its activations (~18-26 hidden-sized values per token, by model, method and
precision: plan.layer_bytes_per_token) shrink to one, for one more forward of the layer. Every layer,
transformers' `gradient_checkpointing_enable`, is the largest saving and the largest cost (~30% more
time for full fine-tuning). `train.checkpoint_layers: N` recomputes only the first N layers
(Megatron-LM's "block" recomputation), so a run that is a little over its memory pays a little:
`tunesmith plan` names the smallest N that fits.

The first layers rather than the last: the backward frees each layer's activations as it passes it,
and reaches the first layers last, so their recomputation happens when the later layers' activations
are already gone; recomputing the last layers would hold every earlier layer's activations and one
recomputed layer at once.
"""

from __future__ import annotations

import torch

from tunesmith.errors import ConfigError
from tunesmith.models import decoder_layers, unwrapped_model


def recomputed_layers(requested: int | None, available: int) -> int:
    """How many of `available` decoder layers `train.checkpoint_layers` recomputes (None: all of them)."""
    if requested is None:
        return available
    if requested > available:
        raise ConfigError(f"train.checkpoint_layers: {requested}, but the model has {available} decoder layers")
    return requested


def enable_recompute(model: torch.nn.Module, layers: int | None = None) -> int:
    """Checkpoint the first `layers` decoder layers of `model` (None: every layer, with transformers'
    own switch for the models that check it outside their layers); returns how many are checkpointed."""
    base = unwrapped_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name (the old one warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    found = decoder_layers(base)
    recomputed = recomputed_layers(layers, len(found))
    for layer in found[recomputed:]:
        layer.gradient_checkpointing = False
    return recomputed
