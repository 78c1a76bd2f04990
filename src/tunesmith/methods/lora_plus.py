"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): plain LoRA,
but B learns `lr_ratio` times faster than A. With equal rates, feature learning is inefficient in
wide models (sec. 3); the paper recommends a ratio of about 2^4 for decoder models (sec. 4).

The adapter is an ordinary LoRA adapter: only the optimiser differs. Departure from peft's
`create_loraplus_optimizer`: there every 1-D parameter (biases, DoRA magnitudes) also gets B's
rate; here only B does, as in the paper, and everything else keeps the base rate.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.methods.base import MethodSpec, register
from tunesmith.methods.lora import LoraSettings, apply_lora, save_lora


class LoraPlusSettings(LoraSettings):
    name: Literal["lora_plus"] = "lora_plus"  # type: ignore[assignment]
    lr_ratio: float = Field(16.0, ge=1, description="Learning rate of B / learning rate of A (paper: 2^4).")


def lora_plus_groups(model, settings: LoraPlusSettings, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: B matrices at lr * lr_ratio; the rest at lr; 1-D tensors without weight decay."""
    groups: dict[tuple[bool, bool], list] = {(is_b, decay): [] for is_b in (True, False) for decay in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_b = "lora_B" in name or "lora_embedding_B" in name
            groups[(is_b, parameter.ndim >= 2)].append(parameter)
    return [
        {"params": params, "lr": lr * settings.lr_ratio if is_b else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_b, decay), params in groups.items()
    ]


# The paper lowers the base rate a little (about 2x) against plain LoRA when using the ratio.
register(
    MethodSpec(
        name="lora_plus", settings=LoraPlusSettings, apply=apply_lora, default_lr=1e-4,
        lr_range=(2e-5, 5e-4), saves="adapter",
        optimizer_groups=lora_plus_groups, save=save_lora,
    )
)
