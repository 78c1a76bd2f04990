"""Private host memory of loading a model for a sharded run when `model.dtype` differs from the files'.

Each variant runs on N processes (torchrun; gloo on CPU) that load the model and shard its decoder layers as
`tunesmith train` does with `train.sharding: fsdp`:

- `converted`: what the plain stack does (and tunesmith did): `from_pretrained(dtype=...)` on every process, so
  each converts the whole model into memory of its own, then FSDP shards it and frees the layers.
- `as-stored`: tunesmith now: the weights loaded in the files' dtype (their mapped pages, shared by the node's
  processes), each layer converted just before it is sharded (`shard_layers(dtype=...)`, `place_unsharded`).

Prints, per process, the peak of its private resident memory (RssAnon, sampled every millisecond from
/proc/self/status) while loading and sharding, the private memory once sharded, the file-backed resident
memory then (the files' pages, shared), and the seconds; and checks that both variants hold the same shards.

    python bench/sharded_load.py                                       # SmolLM2-135M float32 files -> bfloat16
    python bench/sharded_load.py --stored-dtype bfloat16 --dtype float32  # bf16 files (as large models ship)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from workers import status_mb

VARIANTS = ("converted", "as-stored")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="model.dtype: what the run trains in")
    parser.add_argument("--stored-dtype", default="as-is", choices=["as-is", "float32", "bfloat16", "float16"],
                        help="save a copy of the model in this dtype first and load that (as-is: the model's files)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args()


class PeakSampler:
    """The largest RssAnon seen while running, read every millisecond on a thread of its own."""

    def __init__(self):
        self.peak, self.running = 0.0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_mb("RssAnon"))
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, status_mb("RssAnon"))


def worker(args: argparse.Namespace, variant: str, folder: Path) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.models import stored_dtype
    from tunesmith.training.sharding import place_unsharded, shard_layers

    dist.init_process_group("gloo")
    target = getattr(torch, args.dtype)
    gc.collect()
    private_before = status_mb("RssAnon")
    started = time.perf_counter()
    with PeakSampler() as sampler:
        if variant == "converted":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=target)
            shard_layers(model, reshard_after_forward=True)
            place_unsharded(model, torch.device("cpu"))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=stored_dtype(folder))
            shard_layers(model, reshard_after_forward=True, dtype=target)
            place_unsharded(model, torch.device("cpu"), target)
        gc.collect()
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():  # this process's rows of every sharded tensor
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        digest.update(name.encode() + str(local.dtype).encode() + local.detach().float().numpy().tobytes())
    figures = {"rank": dist.get_rank(), "private_before_mb": private_before, "private_peak_mb": sampler.peak,
               "private_after_mb": status_mb("RssAnon"), "file_backed_mb": status_mb("RssFile"), "seconds": seconds,
               "digest": digest.hexdigest()}
    print("FIGURES " + json.dumps(figures), flush=True)
    dist.destroy_process_group()


def model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models import resolve_model

    folder = resolve_model(ModelConfig(name=args.model))
    if args.stored_dtype == "as-is":
        return folder
    copy = scratch / f"stored-{args.stored_dtype}"
    AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.stored_dtype)).save_pretrained(copy)
    AutoTokenizer.from_pretrained(folder).save_pretrained(copy)
    return copy


def run_variant(args: argparse.Namespace, variant: str, folder: Path, port: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
               "--master_port", str(port), __file__, "--dtype", args.dtype, "--worker", variant, str(folder)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if completed.returncode != 0:
        sys.exit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    lines = [line.removeprefix("FIGURES ") for line in completed.stdout.splitlines() if line.startswith("FIGURES ")]
    return sorted((json.loads(line) for line in lines), key=lambda figures: figures["rank"])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args, args.worker[0], Path(args.worker[1]))
        return
    from tunesmith.models import stored_dtype

    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args, Path(scratch))
        print(f"{args.model}: files in {stored_dtype(folder)}, model.dtype {args.dtype}, {args.processes} processes")
        results = {variant: run_variant(args, variant, folder, 29620 + index)
                   for index, variant in enumerate(args.variants.split(","))}
    print(f"{'variant':<10} {'rank':>4} {'private peak MB':>16} {'added MB':>9} {'private after MB':>17} "
          f"{'file-backed MB':>15} {'s':>6}")
    for variant, ranks in results.items():
        for figures in ranks:
            added = figures["private_peak_mb"] - figures["private_before_mb"]
            print(f"{variant:<10} {figures['rank']:>4} {figures['private_peak_mb']:>16,.0f} {added:>9,.0f} "
                  f"{figures['private_after_mb']:>17,.0f} {figures['file_backed_mb']:>15,.0f} "
                  f"{figures['seconds']:>6.2f}")
    digests = {variant: [figures["digest"] for figures in ranks] for variant, ranks in results.items()}
    same = len({tuple(value) for value in digests.values()}) == 1
    print("every variant holds the same shards" if same else f"SHARDS DIFFER: {digests}")
    if {"converted", "as-stored"} <= results.keys():
        def added(variant: str) -> float:
            return max(figures["private_peak_mb"] - figures["private_before_mb"] for figures in results[variant])
        print(f"as-stored / converted, added private peak: x{added('as-stored') / added('converted'):.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
