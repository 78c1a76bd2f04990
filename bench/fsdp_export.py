"""Host memory of exporting a model whose decoder layers are FSDP-sharded, on the main process.

Each variant runs on N processes (torchrun; gloo on CPU, NCCL on GPUs) that load the model, shard its
layers as `tunesmith train` does (train.sharding: fsdp), then export it to a Hugging Face folder:

- `accelerate`: what a user of the plain stack runs (accelerate's `get_state_dict` under FSDP2, as
  Trainer's save does): torch's `get_model_state_dict(full_state_dict=True, cpu_offload=True)`, the whole
  model gathered into the main process's memory, then `save_pretrained(state_dict=...)`.
- `gathered`: tunesmith before the streamed export: each sharded tensor gathered to the main process
  one at a time, then `save_pretrained` (the whole model in host memory once).
- `streamed`: tunesmith now (training/sharded_export.py): the file split planned from shapes, each file's
  tensors gathered and written, then freed; the main process holds one file's tensors at a time.

Prints, for the main process, its resident memory before the export, the peak during it (VmHWM, reset
just before), the difference, and the seconds; and checks that every variant wrote the same tensors.

    python bench/fsdp_export.py                          # SmolLM2-135M float32, 2 processes, 100MB files
    python bench/fsdp_export.py --shard-size 50MB --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import status_mb

VARIANTS = ("accelerate", "gathered", "streamed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--shard-size", default="100MB", help="train.export_shard_size (and save_pretrained's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace, variant: str, folder: Path) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.models import resolve_model
    from tunesmith.training.sharded_export import save_sharded_model
    from tunesmith.training.sharding import gather_for_export, shard_layers

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    is_main = dist.get_rank() == 0
    model = AutoModelForCausalLM.from_pretrained(resolve_model(ModelConfig(name=args.model)), dtype=torch.float32)
    model.to("cuda" if cuda else "cpu")
    for parameter in model.parameters():  # weights in the process's own memory, as after training (not the
        parameter.data = parameter.data.clone()  # loaded file's mapped pages, counted only once read)
    shard_layers(model, reshard_after_forward=True)
    gc.collect()
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    started = time.perf_counter()
    if variant == "accelerate":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main:
            model.save_pretrained(folder, state_dict=state, max_shard_size=args.shard_size)
    elif variant == "gathered":
        gather_for_export(model, is_main)
        if is_main:
            model.save_pretrained(folder, max_shard_size=args.shard_size)
    else:
        save_sharded_model(model, folder, is_main, args.shard_size)
    dist.barrier()
    if is_main:
        peak = status_mb("VmHWM")
        print(json.dumps({"before_mb": round(before), "peak_mb": round(peak), "added_mb": round(peak - before),
                          "seconds": round(time.perf_counter() - started, 2),
                          "files": len(list(folder.glob("*.safetensors")))}))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, variant: str, folder: Path) -> dict:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(
        [torchrun, "--nproc_per_node", str(args.processes), "--master_port", "29578", __file__,
         "--model", args.model, "--shard-size", args.shard_size, "--worker", variant, str(folder / variant)],
        capture_output=True, text=True, env=environment,
    )
    if completed.returncode != 0:
        sys.exit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def saved_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args, args.worker[0], Path(args.worker[1]))
        return
    import torch

    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        results = {variant: launch(args, variant, folder) for variant in variants}
        reference = saved_tensors(folder / variants[0])
        for variant in variants[1:]:
            tensors = saved_tensors(folder / variant)
            assert tensors.keys() == reference.keys(), f"{variant} wrote other tensors than {variants[0]}"
            assert all(torch.equal(tensors[name], reference[name]) for name in reference), f"{variant} differs"
    print(f"{args.model}, {args.processes} processes, files of at most {args.shard_size}; the main process:")
    print(f"{'variant':<12}{'RSS before MB':>15}{'peak MB':>10}{'added MB':>10}{'seconds':>9}{'files':>7}")
    for variant, result in results.items():
        print(f"{variant:<12}{result['before_mb']:>15,}{result['peak_mb']:>10,}{result['added_mb']:>10,}"
              f"{result['seconds']:>9}{result['files']:>7}")
    first = variants[0]
    for variant in variants[1:]:
        print(f"{variant} / {first}: x{results[variant]['added_mb'] / max(results[first]['added_mb'], 1):.2f} "
              "added memory; same tensors")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
