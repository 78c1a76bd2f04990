"""Memory per process with FSDP sharding vs full replicas: the same full fine-tuning run, launched on N
processes through `tunesmith train` (torchrun), once per variant: `none` (train.sharding: none), `fsdp`
(train.sharding: fsdp) and, with --variants, `fsdp-reduce-once` (fsdp with train.reduce_each_micro_batch:
false: gradients reduce-scattered after a step's last micro-batch only; use --grad-accum > 1). Prints
each run's peak memory per process (rank 0's summary: RSS on CPU, max allocated on CUDA), its final loss
(they must agree: none of this changes the maths), tokens/s and the ratios to the first variant, next to
`tunesmith plan`'s estimate for each.

    python bench/fsdp_memory.py                      # SmolLM2-135M, full, 2 processes (CPU: gloo)
    python bench/fsdp_memory.py --release-memory     # CPU: peak RSS closer to the live tensors
    python bench/fsdp_memory.py --processes 4 --json out.json
    python bench/fsdp_memory.py --grad-accum 4 --variants fsdp,fsdp-reduce-once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "sft" / "gsm8k_train.jsonl"
VARIANTS = {
    "none": {"sharding": "none"},
    "fsdp": {"sharding": "fsdp"},
    "fsdp-reduce-once": {"sharding": "fsdp", "reduce_each_micro_batch": False},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="full")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="Per process.")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--variants", default="none,fsdp", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--release-memory", action="store_true",
                        help="train.release_memory in both runs (CPU: freed buffers go back to the system)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def run_config(args: argparse.Namespace, variant: str, output_dir: Path) -> dict:
    return {
        "model": {"name": args.model},
        "data": {"train": str(GSM8K), "limit": 64 * args.processes * args.grad_accum, "eval_split": 0.0,
                 "max_length": args.max_length},
        "method": {"name": args.method},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": 1e-5,
                  "warmup": 0, "seed": 0, "eval_before": False, "release_memory": args.release_memory,
                  **VARIANTS[variant]},
        "output_dir": str(output_dir),
    }


def launch(args: argparse.Namespace, variant: str, folder: Path) -> dict:
    config_file = folder / f"{variant}.json"  # JSON is YAML
    config_file.write_text(json.dumps(run_config(args, variant, folder / variant)))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(
        [torchrun, "--nproc_per_node", str(args.processes), "--master_port", "29577", "-m", "tunesmith.cli",
         "train", str(config_file), "--overwrite"], capture_output=True, text=True, env=environment,
    )
    if completed.returncode != 0:
        sys.exit(f"{variant} run failed:\n{completed.stderr[-3000:]}")
    summary = json.loads((folder / variant / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (folder / variant / "metrics.jsonl").read_text().splitlines()]
    return {"peak_memory_mb": summary["peak_memory_mb"], "tokens_per_s": summary["tokens_per_s"],
            "final_loss": losses[-1], "sharding": summary["sharding"]}


def planned_gib(args: argparse.Namespace, variant: str, folder: Path) -> float:
    from tunesmith.config import RunConfig
    from tunesmith.plan import plan_memory

    config = RunConfig.model_validate(run_config(args, variant, folder / "plan"))
    return plan_memory(config, on_gpu=False, processes=args.processes).total_gib


def main() -> None:
    args = parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            sys.exit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        results = {variant: launch(args, variant, folder) for variant in variants}
        for variant, result in results.items():
            result["planned_gib"] = round(planned_gib(args, variant, folder), 2)
    print(f"{args.model}, {args.method}, {args.processes} processes, batch {args.batch_size} per process x "
          f"accumulation {args.grad_accum}, max length {args.max_length}, {args.steps} steps, "
          f"release_memory {args.release_memory}")
    print(f"{'variant':<18}{'peak MB/process':>17}{'plan GiB':>10}{'tokens/s':>10}{'final loss':>12}")
    for variant, result in results.items():
        print(f"{variant:<18}{result['peak_memory_mb']:>17,.0f}{result['planned_gib']:>10.2f}"
              f"{result['tokens_per_s']:>10.1f}{result['final_loss']:>12.4f}")
    first, *others = variants
    base = results[first]
    for variant in others:
        result = results[variant]
        print(f"{variant} / {first}: memory x{result['peak_memory_mb'] / base['peak_memory_mb']:.2f}, "
              f"speed x{result['tokens_per_s'] / base['tokens_per_s']:.2f}, loss difference "
              f"{abs(result['final_loss'] - base['final_loss']) / base['final_loss']:.2e} (relative)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
