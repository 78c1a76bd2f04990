"""Shared by the benchmarks: each tool runs in a subprocess of the same script, so its peak memory is
its own, and reports its figures on one `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def report(figures: dict) -> None:
    """Called in the worker: print the figures for the driver."""
    print("RESULT " + json.dumps(figures))


def run_worker(script: str, options: dict[str, object], threads: int | None = None) -> dict | None:
    """Run `script` with `--key value` options; the worker's figures, or None if it failed (e.g. OOM)."""
    command = [sys.executable, script]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def status_mb(field: str) -> float:
    """A memory field of this process's /proc/self/status (VmRSS, VmHWM: the peak since the last reset,
    RssAnon: its private memory, RssFile: mapped files' pages), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def first_records(path: Path, count: int) -> list[dict]:
    """The first `count` records of a JSON-lines file, read in place."""
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count), strict=False)]


def step_timer():
    """A transformers TrainerCallback whose `seconds` sums the time of each optimiser step (for trl's trainers:
    the step's generation, if any, its micro-batches' forward and backward, and the update)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.started = 0.0

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds += time.perf_counter() - self.started

    return StepTimer()


def loop_micro_batches(config, count: int) -> tuple[list[list[dict]], object]:
    """The examples of the first `count` micro-batches tunesmith's loop trains `config` on, in its order (its own
    `micro_batch_stream`, one process), and the tokenizer: a peer fed these trains on exactly the same batches."""
    from types import SimpleNamespace

    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.training.distributed import ProcessGroup
    from tunesmith.training.loop import micro_batch_stream

    tokenizer = load_tokenizer(config.model)
    examples = prepare_data(config, tokenizer).train
    one_process = ProcessGroup(SimpleNamespace(process_index=0, num_processes=1, is_main_process=True))
    stream = micro_batch_stream([len(example["input_ids"]) for example in examples], config, 0, one_process)
    return [[examples[index] for index in next(stream).indices] for _ in range(count)], tokenizer


def run_tools(script: str, args, shared: tuple[str, ...]) -> dict[str, dict]:
    """Each tool of `args.tools` (comma-separated) run as a worker of `script` with the options named in `shared`
    copied from `args`; its figures by tool. Exits naming the tool that failed."""
    figures = {}
    for tool in (tool for tool in args.tools.split(",") if tool):
        figures[tool] = run_worker(script, {"worker": tool} | {name: getattr(args, name) for name in shared},
                                   args.threads)
        if figures[tool] is None:
            raise SystemExit(f"{tool} failed (its stderr is above)")
    return figures


def write_figures(args, figures: dict) -> None:
    """With `--json PATH`: the job (every option but the driver's own) and the figures, as one JSON object."""
    if args.json:
        job = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
               if key not in ("worker", "json", "tools")}
        args.json.write_text(json.dumps({"job": job, **figures}, indent=2))


def pair_worker(workers: dict, args) -> None:
    """A preference benchmark's worker: `workers[args.worker](args)` at `args.threads`, reported with its pairs/s
    (pairs over the summed step time) and peak memory."""
    import torch

    from tunesmith.training.metrics import peak_memory_mb

    torch.set_num_threads(args.threads)
    figures = workers[args.worker](args)
    figures["pairs_per_s"] = figures["pairs"] / figures["train_seconds"]
    figures["peak_memory_mb"] = peak_memory_mb()
    report(figures)


def print_pair_figures(figures: dict[str, dict]) -> None:
    """A preference benchmark's table: each tool's pairs, seconds, pairs/s and peak memory, then per step each
    tool's loss, reward accuracy and reward margin."""
    print(f"{'tool':<10} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'peak MB':>8}")
    for tool, row in figures.items():
        print(f"{tool:<10} {row['pairs']:>6} {row['train_seconds']:>8.1f} {row['pairs_per_s']:>8.3f} "
              f"{row['peak_memory_mb']:>8.0f}")
    print("\nper step: " + "  ".join(f"{tool} loss / reward accuracy / margin" for tool in figures))
    for step in range(max(len(row["losses"]) for row in figures.values())):
        cells = [f"{row['losses'][step]:.4f} / {row['reward_accuracy'][step]:.2f} / {row['reward_margin'][step]:+.4f}"
                 if step < len(row["losses"]) else "-" for row in figures.values()]
        print(f"{step + 1:>4}  " + "    ".join(f"{cell:<28}" for cell in cells))


PRECISIONS = ("auto", "fp32", "bf16", "amp")
PRECISION_HELP = ("bf16: every tool loads the model in bfloat16 and trains under bf16 autocast (LoRA weights stay "
                  "float32); amp: float32 weights under bf16 autocast (Trainer's bf16=True over a model loaded in "
                  "float32); auto: bf16 on a GPU that has it, else fp32 (tunesmith's default)")


def trains_in_bf16(precision: str) -> bool:
    """Whether a benchmark job in `precision` (PRECISIONS) has bf16 weights: `auto` does where tunesmith's `auto`
    does, on a CUDA device with bf16 (weights in bf16, bf16 autocast)."""
    import torch

    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def weights_dtype(precision: str) -> str:
    return "bfloat16" if trains_in_bf16(precision) else "float32"


def under_autocast(precision: str) -> bool:
    """bf16 autocast: over bf16 weights, or over float32 ones (amp)."""
    return precision == "amp" or trains_in_bf16(precision)


def train_pairs(config_at) -> dict:
    """A preference job trained by tunesmith, `config_at(output_dir)` its run config (a pair task: dpo, reward,
    whose loss units are pairs): the pairs trained, the usable pairs, the summed step time and per step the loss,
    reward accuracy and reward margin from its metrics."""
    import tempfile

    from tunesmith.training import train

    with tempfile.TemporaryDirectory() as folder:
        result = train(config_at(Path(folder) / "run"))
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    return {
        "pairs": sum(row["loss_tokens"] for row in steps),
        "pairs_in_data": result.summary["data"]["used_train"],  # after skipping pairs truncated to nothing
        "train_seconds": result.summary["train_seconds"],
        "losses": [row["loss"] for row in steps],
        "reward_accuracy": [row["reward_accuracy"] for row in steps],
        "reward_margin": [row["reward_margin"] for row in steps],
    }
