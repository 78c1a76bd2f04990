"""LoRA through peft (Hu et al. 2021), with rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024),
PiSSA / OLoRA initialisation, and QLoRA's 4-bit base (Dettmers et al. 2023).

Defaults follow current practice: all linear layers (QLoRA, sec. 4), alpha = 2r, and a learning
rate about 10x full fine-tuning's (Biderman et al. 2024).

PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) are `init` options, not methods of their
own: they change only where A and B start, and keep every other LoRA setting and the adapter
format. They start A, B from the top singular vectors (PiSSA) or a QR factor (OLoRA) of W and
leave W_res = W - BA in the base, so the trained A, B apply to W_res, not to the base on disk.
`save_lora` therefore writes the equivalent plain LoRA of rank 2r, [A | A0] and [B | -B0]
(delta W = BA - B0A0), which plain peft applies to the ORIGINAL base (peft's own conversion,
`path_initial_model_for_weight_conversion`, drops a classifier head's weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model_state_dict
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from tunesmith.errors import ConfigError
from tunesmith.methods.base import (
    MethodSettings,
    MethodSpec,
    classification_head_names,
    creates_head,
    peft_model,
    peft_task_type,
    register,
)
from tunesmith.methods.lora_forward import use_fast_lora_forward
from tunesmith.training.keyed_dropout import use_keyed_dropout

INITIAL_STATE = "tunesmith_initial_lora_state"
"""Attribute of a PiSSA/OLoRA PeftModel holding A0, B0 (keys as in the saved adapter) for `save_lora`."""


class LoraSettings(MethodSettings):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; default 2r.")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA input. On a CPU its masks come from a seed per micro-batch part, so a run repeats "
        "with its rows in parallel threads (train.parallel_rows)."))
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' or a list of module names / suffixes."
    )
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="Where A and B start: default (B = 0, A Kaiming-uniform), gaussian (A normal), "
        "pissa (principal singular vectors of W), olora (QR of W).",
    )
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter."
    )

    @model_validator(mode="after")
    def _default_alpha(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        return self

    @model_validator(mode="after")
    def _compatible_options(self):
        if self.init in ("pissa", "olora") and self.dora:
            raise ValueError(f"init: {self.init} cannot be combined with dora (its saved form has no magnitude)")
        if self.init in ("pissa", "olora") and self.quantize:
            raise ValueError(f"init: {self.init} cannot be combined with quantize (it rewrites the base weights)")
        return self


def apply_lora(model, settings: LoraSettings, task: str):
    if settings.quantize == "4bit":
        model = quantize_4bit(model)
    modules_to_save = list(settings.modules_to_save)
    if creates_head(task):
        # The classification head is new, random and small: train it in full (peft SEQ_CLS does the same).
        modules_to_save += [name for name in classification_head_names(model) if name not in modules_to_save]
    peft_config = LoraConfig(
        task_type=peft_task_type(task),
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        init_lora_weights=True if settings.init == "default" else settings.init,
        modules_to_save=modules_to_save or None,
    )
    model = peft_model(model, peft_config)
    use_fast_lora_forward(model)
    use_keyed_dropout(model)  # masks that a CPU run's parallel rows draw the same every run
    if settings.init in ("pissa", "olora"):
        initial = get_peft_model_state_dict(model)
        setattr(model, INITIAL_STATE, {key: value.detach().clone() for key, value in initial.items() if "lora_" in key})
    return model


def save_lora(model, folder: Path) -> None:
    """peft's save_pretrained; for PiSSA/OLoRA, then rewrite the adapter as plain LoRA of the original base."""
    model.save_pretrained(folder)
    initial = getattr(model, INITIAL_STATE, None)
    if initial is None:
        return
    weights_path = Path(folder) / "adapter_model.safetensors"
    trained = load_file(weights_path)
    converted = {}
    for key, tensor in trained.items():
        if "lora_A" in key:  # (r, in) -> (2r, in)
            converted[key] = torch.cat([tensor, initial[key].to(tensor)], dim=0)
        elif "lora_B" in key:  # (out, r) -> (out, 2r)
            converted[key] = torch.cat([tensor, -initial[key].to(tensor)], dim=1)
        else:
            converted[key] = tensor
    save_file({key: value.contiguous() for key, value in converted.items()}, weights_path, metadata={"format": "pt"})
    config_path = Path(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Twice the rank at the same scale: alpha/r is kept (alpha/sqrt(r) under rsLoRA).
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2
    config["r"] *= 2
    config["init_lora_weights"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def quantize_4bit(model):
    """The base's linear layers (not the output head) as bitsandbytes NF4 layers on the GPU (QLoRA).

    NOT exercised by the test suite (no CUDA there). Proper home: loading with transformers'
    BitsAndBytesConfig in models.load_model; done here because the method alone knows it wants 4-bit.
    """
    if not torch.cuda.is_available():
        raise ConfigError(
            "method.quantize: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; none is available here. "
            "Remove method.quantize to train plain LoRA on this machine"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "method.quantize: 4bit needs bitsandbytes; install it with `pip install bitsandbytes`"
        ) from None
    from peft import prepare_model_for_kbit_training

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, quantized)
    model.to("cuda")  # Params4bit quantizes when moved to the GPU
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


register(
    MethodSpec(
        name="lora", settings=LoraSettings, apply=apply_lora, default_lr=2e-4,
        lr_range=(5e-5, 1e-3), saves="adapter", save=save_lora
    )
)
