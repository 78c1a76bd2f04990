"""Export a run as one self-contained model folder that plain transformers loads.

An adapter run is merged into its base (W + BA, peft `merge_and_unload`) and saved in full; a
full run's `model/` folder is copied. Either way the folder holds safetensors weights, the
tokenizer with its chat template, and `labels.json` for a classifier.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.models import load_run, prompt_learning, read_run


def export_merged(run_dir: Path, out_dir: Path) -> Path:
    """Write the run's tuned model to `out_dir` (which must be empty or absent); return `out_dir`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"{out_dir}: already exists and is not empty; choose a new output folder")
    run = read_run(run_dir)
    if run.is_adapter:
        # Merge on CPU: merging is cheap, and the result is saved from CPU anyway.
        model, tokenizer = load_run(run_dir, device="cpu")
        if not is_mergeable(model):
            raise ModelError(
                f"{run_dir}: method {run.method!r} adds virtual tokens or modules that cannot be merged into "
                "the base weights; use the run's adapter/ folder with its base model instead"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        model.merge_and_unload().save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    else:
        shutil.copytree(run.weights_dir, out_dir, dirs_exist_ok=True)
    labels = run_dir / "labels.json"
    if labels.is_file():
        shutil.copy2(labels, out_dir / "labels.json")
    return out_dir


def is_mergeable(model) -> bool:
    """Weight-space adapters (LoRA, IA3, LoHa, LoKr) merge; prompt learning and bottleneck adapters do not."""
    return hasattr(model, "merge_and_unload") and not prompt_learning(model)
