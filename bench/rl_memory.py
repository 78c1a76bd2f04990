"""Memory and time of one grpo update, three ways: `whole`, the (BG, C, V) logits at once and every copy of a
prompt run through the model (tunesmith before 2026-11-23, and what trl's GRPOTrainer does); `chunked`, the
completion tokens' log-probs over chunks of positions (each chunk recomputed in the backward pass); `shared`,
chunked and each prompt run once for its G completions, which continue from its KV cache (tunesmith since
2026-11-24), or with `--recompute 1` (every decoder layer checkpointed, where transformers drops the cache) each
group as one row, its prompt and then each completion under a mask (objectives/branched_rows.py).

    python bench/rl_memory.py                      # SmolLM2-135M, float32, 16 completions of 256 tokens, G 4
    python bench/rl_memory.py --completions 40 --group 8 --prompt-length 100 --completion-length 48
    python bench/rl_memory.py --completions 40 --group 8 --prompt-length 100 --completion-length 48 --recompute 1

Each way runs in its own process on the same sampled-like sequences (random tokens, a group's rows sharing
their prompt: memory and time do not depend on the tokens) and prints how far resident memory rose over the
loaded model's during grpo's loss and its backward pass (the kernel's peak, VmHWM, reset before it), the
seconds it took, and the gradient's norm (which must be the same; the loss itself is 0 at a policy ratio of
1, as group advantages sum to 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from workers import report, run_worker, status_mb

WAYS = ("whole", "chunked", "shared")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--completions", type=int, default=16, help="B x G sequences in the update")
    parser.add_argument("--group", type=int, default=4, help="G completions per prompt")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512, help="objective.loss_chunk_tokens but the whole way's")
    parser.add_argument("--recompute", type=int, choices=(0, 1), default=0, help="1: checkpoint every decoder layer")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model
    from tunesmith.objectives import rl
    from tunesmith.training.recompute import enable_recompute

    if args.way != "shared":
        rl.shares_prompts = lambda model, group: False
        rl.group_row_hidden = lambda model, samples: None
    model = load_model(ModelConfig(name=args.model), "grpo").train()
    if args.recompute:
        enable_recompute(model)
    generator = torch.Generator().manual_seed(0)
    rows, prompts = args.completions, args.completions // args.group
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (prompts, args.prompt_length), generator=generator)
    completion_ids = torch.randint(0, vocab, (rows, args.completion_length), generator=generator)
    length = args.prompt_length + args.completion_length
    samples = {
        "sequences": torch.cat([prompt_ids.repeat_interleave(args.group, 0), completion_ids], dim=1),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": torch.ones(rows, args.completion_length, dtype=torch.long),
        "group": args.group,
    }
    batch = {"samples": samples, "rewards": torch.randn(rows, generator=generator), "reward_parts": {},
             "reference_logps": None, "prompts": [""] * prompts, "num_loss_tokens": prompts}
    settings = rl.GRPOSettings(loss_chunk_tokens=None if args.way == "whole" else args.chunk)
    loaded = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    start = time.perf_counter()
    output = rl.grpo_loss(model, batch, settings)
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
    if args.completions % args.group:
        sys.exit(f"--completions {args.completions} is not a whole number of groups of {args.group}")
    options = {"model": args.model, "completions": args.completions, "group": args.group,
               "prompt_length": args.prompt_length, "completion_length": args.completion_length, "chunk": args.chunk,
               "recompute": args.recompute}
    results = [run_worker(__file__, {"way": way, **options}) for way in WAYS]
    if None in results:
        sys.exit("a worker failed (its error is above)")
    print(f"{args.model}, grpo, {args.completions} completions ({args.group} a prompt) of {args.completion_length} "
          f"tokens after {args.prompt_length}-token prompts, float32, chunks of {args.chunk} positions"
          + (", every layer recomputed" if args.recompute else ""))
    print(f"{'way':10} {'memory rise MB':>15} {'seconds':>8} {'gradient norm':>14}")
    for result in results:
        print(f"{result['way']:10} {result['rise_mb']:15,.0f} {result['seconds']:8.2f} {result['gradient_norm']:14.6f}")
    whole = results[0]
    for result in results[1:]:
        print(f"{result['way']} / whole: memory x{result['rise_mb'] / whole['rise_mb']:.2f}, "
              f"time x{result['seconds'] / whole['seconds']:.2f}")


if __name__ == "__main__":
    main()
