"""Export a model whose decoder layers are FSDP-sharded, one tensor at a time.

`save_pretrained` needs the whole state dict in one process's memory, so exporting a sharded model
that way first gathers every layer to the main process: host memory for the whole model (140 GB for
a 70B model in bf16) on top of what training left there. `save_sharded_model` writes the same folder
(`model.safetensors`, or `model-0000k-of-0000n.safetensors` files plus `model.safetensors.index.json`,
with config.json and generation_config.json) while the main process holds one gathered tensor at a
time. Everything but the values is known from the shapes: the tensors save_pretrained writes and their
order (transformers' own tied-weight removal and key order), the split into files (huggingface_hub's,
at `max_shard_size`) and so each file's safetensors header. So each file is opened with its header
written, and each tensor is gathered (a collective every process joins, in the same order) and
appended by the main process, then freed. (safetensors' own writer takes a whole file's tensors at
once; the format is an 8-byte header length, the JSON header, then the tensors' bytes back to back.)

A model whose saved names come from a weight conversion that combines tensors (transformers 5
re-splits some fused MoE experts on save) is exported the gathered way: its conversion needs the
whole state dict at once. `streamable` says which.
"""

from __future__ import annotations

import json
import struct
from contextlib import nullcontext
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from tunesmith.training.dtensors import full_tensor

try:  # save_pretrained's own steps (transformers 5.x module functions), run here on shapes
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
except ImportError:  # a transformers without them: every model takes the gathered save_pretrained
    revert_weight_conversion = remove_tied_weights_from_state_dict = None


def saved_shapes(model: PreTrainedModel) -> dict[str, torch.Tensor] | None:
    """The tensors save_pretrained would write, as meta tensors (name -> shape and dtype) in its order;
    None when its weight conversion renames or combines tensors (then only save_pretrained writes it)."""
    if remove_tied_weights_from_state_dict is None or revert_weight_conversion is None:
        return None
    if getattr(model, "hf_quantizer", None) is not None:  # quantized weights save through their quantizer
        return None
    shapes = {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
              for name, tensor in model.state_dict().items()}  # a DTensor's shape is the whole tensor's
    untied = remove_tied_weights_from_state_dict(shapes, model)  # meta: ties found by parameter identity
    converted = revert_weight_conversion(model, dict(untied))
    if set(converted) != set(untied):
        return None
    return converted


def streamable(model: torch.nn.Module) -> bool:
    return isinstance(model, PreTrainedModel) and saved_shapes(model) is not None


# torch dtype -> its name in a safetensors header (the format's dtypes a model's weights can have)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_header(shapes: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The start of a safetensors file holding `shapes`' tensors back to back in this order: the JSON
    header's length (8 bytes, little-endian), then the header, padded with spaces to a multiple of 8."""
    entries: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in shapes.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype {tensor.dtype}")
        end = offset + tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, end]}
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


@torch.no_grad()
def save_sharded_model(model: PreTrainedModel, folder: Path, is_main: bool, max_shard_size: int | str) -> None:
    """Write `model` (decoder layers sharded across processes) as save_pretrained would, into `folder` on
    the main process; every process must call it. The main process holds one gathered tensor at a time."""
    shapes = saved_shapes(model)
    if shapes is None:
        raise ValueError(f"{type(model).__name__} converts weights on save; export it with save_pretrained")
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(shapes, filename_pattern=pattern, max_shard_size=max_shard_size)
    tensors = model.state_dict()
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("model*.safetensors*"):  # a previous export's files
            stale.unlink()
    for filename, names in split.filename_to_tensors.items():
        with open(folder / filename, "wb") if is_main else nullcontext() as file:
            if is_main:
                file.write(safetensors_header({name: shapes[name] for name in names}, {"format": "pt"}))
            for name in names:
                whole = full_tensor(tensors[name])  # every process joins the gather
                if is_main:
                    if whole.shape != shapes[name].shape or whole.dtype != shapes[name].dtype:
                        raise RuntimeError(f"{name}: gathered {whole.dtype} {tuple(whole.shape)}, planned "
                                           f"{shapes[name].dtype} {tuple(shapes[name].shape)}")
                    file.write(whole.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
                del whole
    if not is_main:
        return
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", "utf-8")
    # The config as save_pretrained records it: the weights' dtype and the class that reads them.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
