"""Longest trainable sequence in a fixed memory budget: tunesmith vs the plain transformers + peft step.

For each sequence length (doubling), one LoRA training step (forward + backward, batch 1, every
token trained) runs in a fresh subprocess and reports its peak memory (RSS on CPU, max allocated
on CUDA). The plain stack is what Trainer does by default: `model(input_ids, labels=labels)`
(full (T, V) float32 logits, no activation checkpointing), with glibc's malloc as it comes. tunesmith runs its own
loss path: logits only at loss positions, chunked loss, and gradient checkpointing; and it keeps freed buffers for
reuse up to a resident-memory limit, as `tunesmith train` does on a CPU: by default the limit it sets on a machine
with the budget's memory available (training/memory.py: 80% of it); `--kept-limit-mb` sets another (0: no limit,
as `train.release_memory: false`).

    python bench/max_context.py --budget-mb 4000
    python bench/max_context.py --lengths 512,1024,2048 --json out.json

`--recompute-sweep 0,8,15,22,29,30` instead runs tunesmith alone at each length with that many decoder layers
recomputed (`train.checkpoint_layers`; 0: none), the trade the plain stack's all-or-nothing
`gradient_checkpointing` does not offer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workers import report, run_worker

from tunesmith.training.memory import LIMIT_SHARE
from tunesmith.training.metrics import peak_memory_mb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--budget-mb", type=float, default=4000.0)
    parser.add_argument("--kept-limit-mb", type=float,
                        help="tunesmith keeps freed buffers up to this resident memory (default: 80%% of the budget)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("tunesmith", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--recompute-sweep", help="comma-separated counts of recomputed layers (tunesmith only)")
    parser.add_argument("--checkpoint-layers", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    import torch

    from tunesmith.training.memory import kept_freed_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker == "tunesmith" and device == "cpu":
        with kept_freed_memory(args.kept_limit_mb or None):
            step(args, device)
    else:
        step(args, device)


def step(args: argparse.Namespace, device: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model
    from tunesmith.objectives.causal_lm import CausalLMSettings, causal_lm_loss
    from tunesmith.training.recompute import enable_recompute

    model = load_model(ModelConfig(name=args.model), "sft")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).to(device)
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, model.config.vocab_size, (1, args.length), generator=generator).to(device)
    started = time.perf_counter()
    if args.worker == "plain":
        loss = model(input_ids=input_ids, labels=input_ids).loss
    else:
        if args.checkpoint_layers != 0:  # None: every layer
            enable_recompute(model, args.checkpoint_layers)
        targets = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100, device=device)], dim=1)  # (1, T)
        batch = {"input_ids": input_ids, "targets": targets, "num_loss_tokens": args.length - 1}
        output = causal_lm_loss(model, batch, CausalLMSettings())
        loss = output.loss_sum / output.num_loss_tokens
    loss.backward()
    report({"peak_memory_mb": peak_memory_mb(), "seconds": time.perf_counter() - started, "loss": loss.item()})


def measure(tool: str, length: int, args: argparse.Namespace, checkpoint_layers: int | None = None) -> dict | None:
    """None when the step failed (out of memory): treated as "does not fit"."""
    options = {"worker": tool, "length": length, "model": args.model, "rank": args.rank,
               "kept_limit_mb": LIMIT_SHARE * args.budget_mb if args.kept_limit_mb is None else args.kept_limit_mb}
    if checkpoint_layers is not None:
        options["checkpoint_layers"] = checkpoint_layers
    return run_worker(__file__, options)


def recompute_sweep(args: argparse.Namespace) -> None:
    counts = [int(value) for value in args.recompute_sweep.split(",")]
    print(f"{'length':>7} {'recomputed':>10} {'peak MB':>8} {'s':>6}")
    figures = {}
    for length in [int(value) for value in args.lengths.split(",")]:
        for count in counts:
            result = measure("tunesmith", length, args, count)
            figures[f"{length}/{count}"] = result
            cells = (f"{result['peak_memory_mb']:>8.0f} {result['seconds']:>6.1f}" if result else f"{'failed':>8}")
            print(f"{length:>7} {count:>10} {cells}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.recompute_sweep:
        recompute_sweep(args)
        return
    lengths = [int(value) for value in args.lengths.split(",")]
    figures: dict[str, dict] = {"tunesmith": {}, "plain": {}}
    print(f"{'length':>7} {'tunesmith MB':>13} {'plain MB':>9} {'tunesmith s':>12} {'plain s':>8}")
    for length in lengths:
        row = {tool: measure(tool, length, args) for tool in figures}
        for tool, result in row.items():
            figures[tool][length] = result
        cells = [f"{row[t]['peak_memory_mb']:>.0f}" if row[t] else "failed" for t in ("tunesmith", "plain")]
        times = [f"{row[t]['seconds']:.1f}" if row[t] else "-" for t in ("tunesmith", "plain")]
        print(f"{length:>7} {cells[0]:>13} {cells[1]:>9} {times[0]:>12} {times[1]:>8}")

    def longest(tool: str) -> int:
        fitting = [length for length, result in figures[tool].items()
                   if result and result["peak_memory_mb"] <= args.budget_mb]
        return max(fitting, default=0)

    ours, theirs = longest("tunesmith"), longest("plain")
    ratio = ours / theirs if theirs else float("inf")
    print(f"\nlongest length within {args.budget_mb:.0f} MB: tunesmith {ours}, plain {theirs} (x{ratio:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"budget_mb": args.budget_mb, "longest": {"tunesmith": ours, "plain": theirs},
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
