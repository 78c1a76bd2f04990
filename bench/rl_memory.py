"""Memory of one grpo update's log-probs: the completion tokens' log-probs over chunks of positions (each chunk
recomputed in the backward pass) against the whole (BG, C, V) logits at once (tunesmith before 2026-11-23, and
what trl's GRPOTrainer holds).

    python bench/rl_memory.py                      # SmolLM2-135M, float32, 16 completions of 256 tokens
    python bench/rl_memory.py --completions 32 --completion-length 128

Each way runs in its own process on the same sampled-like sequences (random tokens: memory and time do not
depend on them) and prints how far resident memory rose over the loaded model's during grpo's loss and its
backward pass (the kernel's peak, VmHWM, reset before it), the seconds it took, and the gradient's norm (which
must be the same; the loss itself is 0 at a policy ratio of 1, as group advantages sum to 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from workers import report, run_worker, status_mb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--completions", type=int, default=16, help="B x G sequences in the update")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512, help="objective.loss_chunk_tokens of the chunked way")
    parser.add_argument("--way", choices=("whole", "chunked"), help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model
    from tunesmith.objectives.rl import GRPOSettings, grpo_loss

    model = load_model(ModelConfig(name=args.model), "grpo").train()
    generator = torch.Generator().manual_seed(0)
    rows, length = args.completions, args.prompt_length + args.completion_length
    samples = {
        "sequences": torch.randint(0, model.config.vocab_size, (rows, length), generator=generator),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": torch.ones(rows, args.completion_length, dtype=torch.long),
        "group": 4,
    }
    batch = {"samples": samples, "rewards": torch.randn(rows, generator=generator), "reward_parts": {},
             "reference_logps": None, "prompts": [""] * (rows // 4), "num_loss_tokens": rows // 4}
    settings = GRPOSettings(loss_chunk_tokens=args.chunk if args.way == "chunked" else None)
    loaded = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    start = time.perf_counter()
    output = grpo_loss(model, batch, settings)
    output.loss_sum.backward()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    report({"way": args.way, "rise_mb": peak - loaded, "seconds": seconds,
            "gradient_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])))})


def main() -> None:
    args = parse_args()
    if args.way:
        worker(args)
        return
    options = {"model": args.model, "completions": args.completions, "prompt_length": args.prompt_length,
               "completion_length": args.completion_length, "chunk": args.chunk}
    results = [run_worker(__file__, {"way": way, **options}) for way in ("whole", "chunked")]
    if None in results:
        sys.exit("a worker failed (its error is above)")
    print(f"{args.model}, grpo, {args.completions} completions of {args.completion_length} tokens after "
          f"{args.prompt_length}-token prompts, float32, chunks of {args.chunk} positions")
    print(f"{'way':10} {'memory rise MB':>15} {'seconds':>8} {'gradient norm':>14}")
    for result in results:
        print(f"{result['way']:10} {result['rise_mb']:15,.0f} {result['seconds']:8.2f} {result['gradient_norm']:14.6f}")
    whole, chunked = results
    print(f"chunked / whole: memory x{chunked['rise_mb'] / whole['rise_mb']:.2f}, "
          f"time x{chunked['seconds'] / whole['seconds']:.2f}")


if __name__ == "__main__":
    main()
