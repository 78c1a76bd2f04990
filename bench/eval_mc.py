"""MMLU multiple-choice scoring: tunesmith vs lm-evaluation-harness's HF backend, same items, same model.

The same MMLU subset (subjects x first N test items, first K dev items as few-shot, read in place
from ../shared/data/benchmark/mmlu) is scored twice in one process: by tunesmith's `mmlu` task
pipeline (`mmlu_items` -> `score_continuations` -> `choice_metrics`) and by lm-eval's `hf` model
on a task defined here, offline (`dataset_path: csv` over the same CSVs, lm-eval's mmlu prompt:
description, first-n few-shot from dev, "Answer:", choices " A".." D"). It prints acc and acc_norm
of both, checks that both built the same prompt and picked the same choice for every item (exit 1
if not), and prints both scoring times and the speed ratio. Model loading is timed apart and not
in the ratio; each side first scores one item per subject as a warm-up. Besides wall-clock time it
prints each side's process CPU time, which varies less than wall time on a machine shared with
other work (the headline ratio is wall time, measured on a quiet machine).

    python bench/eval_mc.py                                  # 2 subjects x 20 items, 5-shot (standard MMLU)
    python bench/eval_mc.py --subjects anatomy,astronomy,marketing --limit 50 --shots 5 --json out.json
    python bench/eval_mc.py --threads 1                      # on a busy machine

Needs `pip install lm-eval` (not a tunesmith dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Everything is local: the model folder and the CSVs. Set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "benchmark" / "mmlu"
LETTERS = ["A", "B", "C", "D"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Built-in alias or model folder.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="Folder with dev/ and test/ CSVs.")
    parser.add_argument("--subjects", default="anatomy,marketing", help="Comma-separated subjects.")
    parser.add_argument("--limit", type=int, default=20, help="First N test items per subject.")
    parser.add_argument("--shots", type=int, default=5, help="Few-shot examples (first N of dev); 5 is MMLU's.")
    parser.add_argument("--batch-size", type=int, default=8, help="Same batch size for both.")
    parser.add_argument("--threads", type=int, help="torch CPU threads for both (default torch's own). On a machine "
                        "shared with other work, 1 keeps threads from waiting on each other at every operation.")
    parser.add_argument("--json", type=Path, help="Write the figures and per-item disagreements here.")
    return parser.parse_args()


def lm_eval_task(subject: str, data_dir: Path, shots: int) -> dict:
    """lm-eval's mmlu `_default_template_yaml` + per-subject description, over the local CSVs."""
    from datasets import Features, Value

    columns = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    return {
        "task": f"tunesmith_mmlu_{subject}",
        "dataset_path": "csv",
        "dataset_kwargs": {
            "data_files": {"test": str(data_dir / "test" / f"{subject}_test.csv"),
                           "dev": str(data_dir / "dev" / f"{subject}_dev.csv")},
            # Every column as the text in the file: no number parsing ("1.50" stays "1.50"), no NA
            # ("None" stays "None"), as tunesmith's csv.DictReader reads it.
            "features": Features({column: Value("string") for column in columns}),
            "keep_default_na": False,
        },
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": shots,
        "output_type": "multiple_choice",
        "description": f"The following are multiple choice questions (with answers) about "
                       f"{subject.replace('_', ' ')}.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\nD. {{choice3}}\nAnswer:",
        "doc_to_choice": LETTERS,
        "doc_to_target": "{{answer}}",  # "3" -> index 3 (lm-eval reads a digit string as a choice index)
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _sample_context_and_logliks(sample: dict) -> tuple[str, list[float]]:
    """(context, [loglik per choice]) from one lm-eval logged sample (list or dict argument layouts)."""
    first = sample["arguments"][0]
    context = first[0] if isinstance(first, (list, tuple)) else first["arg_0"]
    logliks = []
    for response in sample["filtered_resps"]:
        value = response[0] if isinstance(response, (list, tuple)) else response
        logliks.append(float(value))
    return context, logliks


def run_tunesmith(args, subjects: list[str]) -> dict:
    from tunesmith.evaluate.config import MmluTask
    from tunesmith.evaluate.run import load_system
    from tunesmith.evaluate.scoring import score_continuations
    from tunesmith.evaluate.tasks import choice_metrics, mmlu_items

    started = time.perf_counter()
    system = load_system(args.model)
    load_seconds = time.perf_counter() - started

    def score(limit: int):
        cfg = MmluTask(name="mmlu", type="mmlu", data_dir=args.data_dir, subjects=subjects, shots=args.shots,
                       limit=limit, batch_size=args.batch_size)
        items = mmlu_items(cfg)
        scores = score_continuations(system.model, system.tokenizer,
                                     [(item.context, [" " + c for c in item.choices]) for item in items],
                                     cfg.batch_size)
        return items, scores, choice_metrics(items, scores)[0]

    score(1)  # warm-up: one item per subject
    started, cpu_started = time.perf_counter(), time.process_time()
    items, scores, metrics = score(args.limit)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"acc": metrics["acc"].value(), "acc_norm": metrics["acc_norm"].value(), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "load_seconds": load_seconds, "items": items, "scores": scores}


def run_lm_eval(args, subjects: list[str], folder: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size)
    load_seconds = time.perf_counter() - started
    task_manager = TaskManager(include_defaults=False)  # only the tasks defined here; indexing all is slow
    tasks = [lm_eval_task(subject, args.data_dir.resolve(), args.shots) for subject in subjects]

    def score(limit: int) -> dict:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=args.shots, limit=limit,
                               log_samples=True, bootstrap_iters=0, batch_size=args.batch_size)

    score(1)  # warm-up: one item per subject; also builds the datasets cache of the CSVs
    started, cpu_started = time.perf_counter(), time.process_time()
    results = score(args.limit)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    samples = []
    for subject in subjects:
        samples += sorted(results["samples"][f"tunesmith_mmlu_{subject}"], key=lambda sample: sample["doc_id"])
    acc = sum(float(sample["acc"]) for sample in samples) / len(samples)
    acc_norm = sum(float(sample["acc_norm"]) for sample in samples) / len(samples)
    return {"acc": acc, "acc_norm": acc_norm, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "load_seconds": load_seconds, "samples": samples}


def compare_items(ours: dict, theirs: dict) -> tuple[list[dict], int, float]:
    """Items where the two disagree on the prompt, the acc pick or the acc_norm pick; prompt mismatches;
    the largest log-likelihood difference."""
    import numpy as np

    if len(ours["items"]) != len(theirs["samples"]):
        raise SystemExit(f"different item counts: tunesmith {len(ours['items'])}, lm-eval {len(theirs['samples'])}")
    disagreements, prompt_mismatches, largest = [], 0, 0.0
    for index, (item, row, sample) in enumerate(zip(ours["items"], ours["scores"], theirs["samples"], strict=True)):
        context, logliks = _sample_context_and_logliks(sample)
        prompt_mismatches += context != item.context
        ours_logp, theirs_logp = np.asarray(row), np.asarray(logliks)
        largest = max(largest, float(np.max(np.abs(ours_logp - theirs_logp))))
        lengths = np.array([float(len(choice)) for choice in item.choices])
        picks = (int(np.argmax(ours_logp)), int(np.argmax(ours_logp / lengths)))
        their_picks = (int(np.argmax(theirs_logp)), int(np.argmax(theirs_logp / lengths)))
        their_correct = (float(sample["acc"]), float(sample["acc_norm"]))
        our_correct = (float(picks[0] == item.answer), float(picks[1] == item.answer))
        if picks != their_picks or our_correct != their_correct or context != item.context:
            disagreements.append({"index": index, "subject": item.group, "tunesmith_picks": picks,
                                  "lm_eval_picks": their_picks, "same_prompt": context == item.context,
                                  "tunesmith_logp": row, "lm_eval_logp": logliks})
    return disagreements, prompt_mismatches, largest


def main() -> None:
    args = parse_args()
    subjects = [subject.strip() for subject in args.subjects.split(",") if subject.strip()]
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        print(f"lm-evaluation-harness is not installed ({error}); run `pip install lm-eval`", file=sys.stderr)
        raise SystemExit(2) from None
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if Path(args.model).is_dir() else resolve_model(ModelConfig(name=args.model))
    print(f"model {args.model} ({folder}); {len(subjects)} subjects x {args.limit} items, {args.shots}-shot, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads", flush=True)
    ours = run_tunesmith(args, subjects)
    theirs = run_lm_eval(args, subjects, folder)
    disagreements, prompt_mismatches, largest = compare_items(ours, theirs)

    n_items = len(ours["items"])
    ratio = theirs["seconds"] / ours["seconds"] if ours["seconds"] else float("inf")
    cpu_ratio = theirs["cpu_seconds"] / ours["cpu_seconds"] if ours["cpu_seconds"] else float("inf")
    print(f"{'':>10} {'acc':>7} {'acc_norm':>9} {'scoring s':>10} {'cpu s':>7} {'load s':>7}")
    for name, figures in (("tunesmith", ours), ("lm-eval", theirs)):
        print(f"{name:>10} {figures['acc']:>7.4f} {figures['acc_norm']:>9.4f} {figures['seconds']:>10.2f} "
              f"{figures['cpu_seconds']:>7.2f} {figures['load_seconds']:>7.2f}")
    print(f"items: {n_items}; disagreeing items: {len(disagreements)}; prompts that differ: {prompt_mismatches}; "
          f"largest |log-likelihood difference|: {largest:.2e}")
    print(f"speed: tunesmith is {ratio:.2f}x lm-eval's HF backend (scoring time, same items; {cpu_ratio:.2f}x "
          "in CPU time)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "subjects": subjects, "limit": args.limit, "shots": args.shots,
            "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "items": n_items,
            "tunesmith": {key: ours[key] for key in ("acc", "acc_norm", "seconds", "cpu_seconds", "load_seconds")},
            "lm_eval": {key: theirs[key] for key in ("acc", "acc_norm", "seconds", "cpu_seconds", "load_seconds")},
            "lm_eval_version": _version("lm-eval"), "speed_ratio": ratio, "cpu_speed_ratio": cpu_ratio,
            "disagreeing_items": len(disagreements),
            "prompt_mismatches": prompt_mismatches, "max_abs_loglik_difference": largest,
            "disagreements": disagreements,
        }, indent=2), encoding="utf-8")
    if disagreements:
        raise SystemExit(1)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
