"""Largest micro-batch that fits in a memory budget: tunesmith vs trl SFTTrainer vs Trainer + peft, same job.

For each tool the micro-batch doubles (gradient accumulation 1) from --start until a run fails (out of
memory) or its peak memory passes --budget-mb (RSS on CPU; on CUDA, max allocated, and the budget is also
imposed with torch.cuda.set_per_process_memory_fraction, so a run that needs more fails as on a smaller
card). Every run is bench/train_throughput.py's worker for that tool, in its own process: the same model,
data, LoRA or full fine-tuning, sequence length, precision and seed. Prints each batch tried with its peak
memory and tokens/s, the largest batch each tool fits, and tunesmith's against each peer's.

    python bench/max_batch.py --budget-mb 6000                      # the default LoRA job on this CPU
    python bench/max_batch.py --precision bf16 --method full --max-length 2048 --budget-mb 80000 --limit 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from train_throughput import TOOLS, write_job_data
from workers import run_worker

THROUGHPUT = str(Path(__file__).with_name("train_throughput.py"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=200, help="records drawn from GSM8K + dpo_en_demo chats")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--budget-mb", type=float, required=True, help="memory each tool may use")
    parser.add_argument("--start", type=int, default=1, help="the first micro-batch tried")
    parser.add_argument("--limit", type=int, default=32, help="the largest micro-batch tried")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def try_batch(args: argparse.Namespace, tool: str, batch: int, data: Path) -> dict:
    """One run of `tool` at micro-batch `batch`: its figures and whether it fit (None figures: it failed)."""
    options = {"worker": tool, "data": data, "model": args.model, "max_length": args.max_length,
               "batch_size": batch, "grad_accum": 1, "steps": args.steps, "method": args.method,
               "precision": args.precision, "threads": args.threads, "memory_budget_mb": args.budget_mb}
    figures = run_worker(THROUGHPUT, options, args.threads)
    fits = figures is not None and figures["peak_memory_mb"] <= args.budget_mb
    return {"batch": batch, "fits": fits, "peak_memory_mb": figures and figures["peak_memory_mb"],
            "tokens_per_s": figures and figures["tokens_per_s"]}


def described(row: dict, budget_mb: float) -> str:
    if row["peak_memory_mb"] is None:
        return "failed (its error is above: out of memory, on a GPU)"
    over = "" if row["fits"] else f", over the {budget_mb:,.0f} MB"
    return f"{row['peak_memory_mb']:,.0f} MB, {row['tokens_per_s']:,.1f} tokens/s{over}"


def main() -> None:
    args = parse_args()
    tools = [tool for tool in args.tools.split(",") if tool]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        data = write_job_data(Path(folder) / "job.jsonl", args.records)
        for tool in tools:
            results[tool], batch = [], args.start
            while batch <= args.limit:
                row = try_batch(args, tool, batch, data)
                results[tool].append(row)
                print(f"{tool:<10} batch {batch:>4}: {described(row, args.budget_mb)}", flush=True)
                if not row["fits"]:
                    break
                batch *= 2
    largest = {tool: max((row["batch"] for row in rows if row["fits"]), default=0) for tool, rows in results.items()}
    method = "LoRA r 16 all-linear" if args.method == "lora" else "full fine-tuning"
    print(f"\nlargest micro-batch in {args.budget_mb:,.0f} MB ({args.model}, {method}, {args.precision}, rows of "
          f"{args.max_length} tokens, tried {args.start}..{args.limit}):")
    for tool, batch in largest.items():
        fitting = [row for row in results[tool] if row["fits"]]
        detail = (f": {fitting[-1]['peak_memory_mb']:,.0f} MB, {fitting[-1]['tokens_per_s']:,.1f} tokens/s"
                  if fitting else "")
        capped = " (the limit tried)" if fitting and batch * 2 > args.limit else ""
        print(f"  {tool:<10} {batch}{capped}{detail}")
    ours = largest.get("tunesmith")
    for peer in (tool for tool in largest if tool != "tunesmith"):
        if ours and largest[peer]:
            print(f"tunesmith / {peer}: x{ours / largest[peer]:.2f} the batch")
    if args.json:
        args.json.write_text(json.dumps({"largest": largest, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
