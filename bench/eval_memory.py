"""Evaluation's memory and time: the loss over chunks of loss positions (as training holds it) against the
whole (N, V) logits at once (tunesmith before 2026-11-23, and what a hand-written eval loop does).

    python bench/eval_memory.py                     # SmolLM2-135M, bf16, 64 records, eval batch 16
    python bench/eval_memory.py --precision fp32 --batch-size 8

Each way runs in its own process on the same records and prints how far its resident memory rose over the
loaded model's during evaluation (the kernel's peak, VmHWM, reset before it), its seconds per batch and the
metrics (which must be the same).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from workers import report, run_worker, status_mb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    parser.add_argument("--way", choices=("chunked", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


@torch.no_grad()
def evaluate_whole(model, batches) -> dict[str, float]:
    """The whole (N, V) logits of each batch in float32, as the loop evaluated before."""
    from tunesmith.objectives.causal_lm import loss_position_logits

    total_loss, correct, tokens = 0.0, 0, 0
    for batch in batches:
        logits, targets = loss_position_logits(model, batch)  # (N, V) float32
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        tokens += batch["num_loss_tokens"]
    return {"eval_loss": total_loss / tokens, "perplexity": math.exp(total_loss / tokens),
            "token_accuracy": correct / tokens, "eval_tokens": tokens}


def worker(args: argparse.Namespace) -> None:
    from tunesmith.config import build_config
    from tunesmith.data import prepare_data
    from tunesmith.data.collate import collate_padded, eval_batches
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives import OBJECTIVES
    from tunesmith.objectives.base import evaluate
    from tunesmith.objectives.causal_lm import CausalLMSettings

    config = build_config({
        "model": {"name": args.model, "dtype": "bfloat16" if args.precision == "bf16" else "float32"},
        "data": {"train": str(args.data), "eval_split": 0.0, "max_length": args.max_length, "on_error": "skip"},
        "task": "sft", "output_dir": tempfile.mkdtemp(),
    })
    tokenizer = load_tokenizer(config.model)
    examples = prepare_data(config, tokenizer).train
    model = load_model(config.model, "sft").eval()
    lengths = [len(example["input_ids"]) for example in examples]
    batches = [collate_padded([examples[index] for index in indices], tokenizer.pad_token_id)
               for indices in eval_batches(lengths, args.batch_size)]
    loaded = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        if args.way == "chunked":
            settings = CausalLMSettings(loss_chunk_tokens=args.loss_chunk_tokens)
            metrics = evaluate(OBJECTIVES.get("sft"), model, batches, settings)
        else:
            metrics = evaluate_whole(model, batches)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    report({"way": args.way, "peak_over_model_mb": peak - loaded, "peak_mb": peak,
            "seconds_per_batch": seconds / len(batches), "batches": len(batches), **metrics})


def main() -> None:
    args = parse_args()
    if args.way:
        worker(args)
        return
    from train_throughput import write_job_data

    with tempfile.TemporaryDirectory() as folder:
        data = write_job_data(Path(folder) / "eval.jsonl", args.records)
        options = {"data": data, "model": args.model, "records": args.records, "max_length": args.max_length,
                   "batch_size": args.batch_size, "precision": args.precision,
                   "loss_chunk_tokens": args.loss_chunk_tokens}
        results = [run_worker(__file__, {"way": way, **options}) for way in ("whole", "chunked")]
    if None in results:
        sys.exit("a worker failed (its error is above)")
    print(f"{args.model}, {args.precision}, {args.records} records, eval batch {args.batch_size}, max length "
          f"{args.max_length}, loss_chunk_tokens {args.loss_chunk_tokens}")
    print(f"{'way':10} {'peak over model MB':>19} {'s/batch':>8} {'eval_loss':>10} {'token_acc':>10}")
    for result in results:
        print(f"{result['way']:10} {result['peak_over_model_mb']:19,.0f} {result['seconds_per_batch']:8.2f} "
              f"{result['eval_loss']:10.5f} {result['token_accuracy']:10.5f}")
    whole, chunked = results
    print(f"chunked / whole: memory x{chunked['peak_over_model_mb'] / whole['peak_over_model_mb']:.2f}, "
          f"time x{chunked['seconds_per_batch'] / whole['seconds_per_batch']:.2f}")


if __name__ == "__main__":
    main()
