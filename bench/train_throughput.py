"""Training throughput: tunesmith vs transformers Trainer + peft vs trl SFTTrainer, same job, one run.

The same model, data (tokenised once, identical token ids and loss masks for every tool), LoRA
config, max length, effective batch, steps, learning-rate schedule, seed and threads. Each tool
runs in its own subprocess so peak memory (RSS on CPU, max allocated on CUDA) is its own.

    python bench/train_throughput.py                       # the default job (see --help)
    python bench/train_throughput.py --steps 4 --json out.json

Figures: trained (non-pad) tokens/s, padding fraction (share of processed positions that were
padding), peak memory, final loss (mean of the last half of the logged steps), and the ratios
tunesmith / each peer. Loss agreement: tunesmith and trl both pack rows of max length, so their
steps see about the same amount of the same data (in different orders and packings): their mean
loss over the last half of the run must agree within --loss-tolerance (relative), or the script
says so and exits 1. The plain Trainer does not pack, so its steps see fewer records; its loss is
printed for information only.

Requires trl (`pip install trl`); the other tools are tunesmith's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from workers import report, run_worker, under_autocast, weights_dtype

from tunesmith.training.metrics import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOOLS = ("tunesmith", "trl", "trainer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=96, help="records drawn from GSM8K + dpo_en_demo chats")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch (packed rows if packing)")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--method", choices=("lora", "full"), default="lora",
                        help="lora (r --rank, all-linear) or full fine-tuning, the same for every tool")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout, the same for every tool (peft's examples use 0.05 or 0.1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--release-memory", type=int, choices=(0, 1), default=0,
                        help="1: tunesmith runs with train.release_memory (lower peak RSS on CPU, fewer tokens/s)")
    parser.add_argument("--compile", type=int, choices=(0, 1), default=0,
                        help="1: tunesmith runs with train.compile (each decoder layer and the loss compiled; its "
                        "first steps compile, so use enough --steps); the peers run eager unless --peer-compile 1")
    parser.add_argument("--compile-mode", default="default",
                        help="tunesmith's train.compile_mode under --compile 1 (reduce-overhead: CUDA graphs)")
    parser.add_argument("--peer-compile", type=int, choices=(0, 1), default=0,
                        help="1: the peers run with torch_compile=True (transformers compiles the whole model)")
    parser.add_argument("--parallel-rows", choices=("auto", "on", "off"), default="auto",
                        help="tunesmith's train.parallel_rows (auto: each micro-batch's rows in parallel threads on "
                        "CPU where that is exact)")
    parser.add_argument("--loss-chunk-tokens", type=int,
                        help="tunesmith's objective.loss_chunk_tokens (default: the config's, 1024)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "amp"), default="fp32",
                        help="bf16: every tool loads the model in bfloat16 and trains under bf16 autocast (LoRA "
                        "weights stay float32), the usual recipe on GPUs and on CPUs with AMX / AVX512-BF16; amp: "
                        "float32 weights under bf16 autocast (Trainer's bf16=True over a model loaded in float32)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every tool this many times, interleaved, and report each tool's median run")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--loss-tolerance", type=float, default=0.15)
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense TFLOP/s at this precision, for MFU; default: known GPUs in bf16")
    parser.add_argument("--json", type=Path, help="also write the figures here, one object per tool")
    parser.add_argument("--memory-budget-mb", type=float,
                        help="on CUDA, cap each tool's memory at this many MB (torch.cuda."
                        "set_per_process_memory_fraction): a run that needs more fails as on a smaller card")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the shared job --------------------------------------------------------------------------


def write_job_data(path: Path, count: int, seed: int = 0) -> Path:
    """Real, variable-length chat records: GSM8K Q/A pairs and dpo_en_demo conversations + chosen reply."""
    records = []
    with open(SHARED_DATA / "sft" / "gsm8k_train.jsonl", encoding="utf-8") as handle:
        for _, line in zip(range(count), handle, strict=False):
            row = json.loads(line)
            records.append({"messages": [{"role": "user", "content": row["question"]},
                                         {"role": "assistant", "content": row["answer"]}]})
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for row in json.loads((SHARED_DATA / "preference" / "dpo_en_demo.json").read_text())[:count]:
        turns = row["conversations"] + [row["chosen"]]
        records.append({"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in turns]})
    random.Random(seed).shuffle(records)
    path.write_text("".join(json.dumps(record) + "\n" for record in records[:count]), encoding="utf-8")
    return path


def job_config(args: argparse.Namespace, output_dir: Path, packing: bool):
    from tunesmith.config import build_config

    return build_config({
        "model": {"name": args.model, "dtype": weights_dtype(args.precision)},
        "data": {"train": str(args.data), "eval_split": 0.0, "max_length": args.max_length, "packing": packing,
                 "on_error": "skip"},
        "task": "sft",
        "method": ({"name": "lora", "r": args.rank, "dropout": args.dropout} if args.method == "lora"
                   else {"name": "full"}),
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "lr": args.lr, "warmup": 1, "scheduler": "cosine", "seed": 0, "eval_before": False,
                  "log_every": 1, "release_memory": bool(args.release_memory), "compile": bool(args.compile),
                  "compile_mode": args.compile_mode,
                  "mixed_precision": "bf16" if under_autocast(args.precision) else "no",
                  "parallel_rows": {"auto": None, "on": True, "off": False}[args.parallel_rows]},
        "objective": {} if args.loss_chunk_tokens is None else {"loss_chunk_tokens": args.loss_chunk_tokens},
        "output_dir": str(output_dir),
    })


def tokenised_examples(args: argparse.Namespace) -> tuple[list[dict], object]:
    """The job's records tokenised once by tunesmith's data layer: the same ids and masks for every tool."""
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer

    config = job_config(args, Path(tempfile.mkdtemp()), packing=False)
    tokenizer = load_tokenizer(config.model)
    return prepare_data(config, tokenizer).train, tokenizer


# --- workers: one tool each, in its own process ---------------------------------------------


WARMUP_STEPS_COMPILED = 3


def run_tunesmith(args: argparse.Namespace) -> dict:
    from tunesmith.training import train

    with tempfile.TemporaryDirectory() as folder:
        result = train(job_config(args, Path(folder) / "run", packing=True))
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = result.summary
    # The steady speed, without the warm-up steps: the first step's one-off work, and under --compile the
    # compiling (forward at step 1, backward at step 2) and CUDA-graph recording (steps 2-3). Measured on
    # an H100, reduce-overhead, batch 8 x 2048: steps 1-3 took 4.2, 5.7 and 0.18 s (warm compile cache), later
    # ones 0.10-0.14 s, so in a 20-step run the warm-up is most of the time.
    warmup = WARMUP_STEPS_COMPILED if args.compile else 1
    later = [step for step in steps if step["step"] > warmup]
    later_seconds = sum(step["tokens"] / step["tokens_per_s"] for step in later)
    return {"tokens_per_s": summary["tokens_per_s"], "padding_fraction": summary["padding_fraction"],
            "train_seconds": summary["train_seconds"], "losses": [step["loss"] for step in steps],
            "warmup_steps": warmup,
            "tokens_per_s_after_warmup": sum(step["tokens"] for step in later) / later_seconds if later else None}


class CountingCollator:
    """Wraps a peer's collator to count real tokens and processed positions exactly."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0
        self.positions = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += sum(len(feature["input_ids"]) for feature in features)
        self.positions += batch["input_ids"].numel()
        return batch


def peer_model(args: argparse.Namespace):
    """The model the peers train: the same weights, with peft's LoRA for --method lora."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    model = load_model(ModelConfig(name=args.model, dtype=weights_dtype(args.precision)), "sft")
    if args.method == "full":
        return model
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def timed_train(trainer, collator: CountingCollator) -> dict:
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"tokens_per_s": collator.tokens / seconds, "padding_fraction": 1 - collator.tokens / collator.positions,
            "train_seconds": seconds, "losses": losses}


def peer_arguments(args: argparse.Namespace, output_dir: str, arguments_class, **extra):
    import torch

    return arguments_class(
        bf16=under_autocast(args.precision), use_cpu=not torch.cuda.is_available(),
        output_dir=output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[],
        gradient_checkpointing=False,  # trl turns it on by default; every tool runs without it here
        seed=0, dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0,
        torch_compile=bool(args.peer_compile), **extra,
    )


def run_trainer(args: argparse.Namespace) -> dict:
    """The plain stack: Trainer + peft, dynamic padding, no packing, no length grouping."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    examples, tokenizer = tokenised_examples(args)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model=peer_model(args), args=peer_arguments(args, folder, TrainingArguments),
                          train_dataset=dataset, data_collator=collator)
        return timed_train(trainer, collator)


def run_trl(args: argparse.Namespace) -> dict:
    """trl's best settings: BFD packing with padding-free batches, loss on the same tokens as ours."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples, tokenizer = tokenised_examples(args)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    with tempfile.TemporaryDirectory() as folder:
        config = peer_arguments(args, folder, SFTConfig, packing=True, packing_strategy="bfd", padding_free=True,
                                max_length=args.max_length)
        trainer = SFTTrainer(model=peer_model(args), args=config, train_dataset=dataset,
                             processing_class=tokenizer)
        # trl refuses a custom collator with padding-free batches; wrap the one it built instead.
        collator = CountingCollator(trainer.data_collator)
        trainer.data_collator = collator
        return timed_train(trainer, collator)


WORKERS = {"tunesmith": run_tunesmith, "trainer": run_trainer, "trl": run_trl}


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_budget_mb and torch.cuda.is_available():
        card = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_budget_mb * 2**20 / card))
    figures = WORKERS[args.worker](args)
    figures["peak_memory_mb"] = peak_memory_mb()
    losses = figures["losses"]
    figures["final_loss"] = statistics.fmean(losses[len(losses) // 2 :]) if losses else float("nan")
    report(figures)


# --- the driver --------------------------------------------------------------------------------


def run_tool(tool: str, args: argparse.Namespace, data: Path) -> dict:
    options = {"worker": tool, "data": data}
    options |= {name: getattr(args, name) for name in
                ("model", "max_length", "batch_size", "grad_accum", "steps", "lr", "method", "rank", "dropout",
                 "threads", "release_memory", "precision", "compile", "compile_mode", "peer_compile", "parallel_rows",
                 "loss_chunk_tokens", "memory_budget_mb")
                if getattr(args, name) is not None}
    figures = run_worker(__file__, options, args.threads)
    if figures is None:
        raise SystemExit(f"{tool} failed (its stderr is above)")
    return figures


# Dense bf16 tensor-core peaks (vendor data sheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(args: argparse.Namespace) -> float | None:
    import torch

    if args.peak_tflops or not torch.cuda.is_available() or not under_autocast(args.precision):
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def job_flops_per_token(args: argparse.Namespace, data: Path) -> float:
    """Model FLOPs of one trained token of this job (tunesmith.plan's accounting), at its mean record length."""
    from tunesmith.plan import model_flops_per_token

    args.data = data
    examples, _ = tokenised_examples(args)
    mean_length = statistics.mean(len(example["input_ids"]) for example in examples)
    return model_flops_per_token(job_config(args, Path(tempfile.mkdtemp()), packing=True), mean_length)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count), with every run's figure."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "tokens_per_s_runs": [run["tokens_per_s"] for run in runs]}


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    tools = [tool for tool in args.tools.split(",") if tool]
    with tempfile.TemporaryDirectory() as folder:
        data = write_job_data(Path(folder) / "job.jsonl", args.records)
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every tool
            for tool in tools:
                runs[tool].append(run_tool(tool, args, data))
        flops_per_token = job_flops_per_token(args, data)
    figures = {tool: median_run(tool_runs) for tool, tool_runs in runs.items()}
    peak = peak_tflops(args)
    for row in figures.values():  # every tool trains the same tokens: the same model FLOPs per token
        row["model_tflops_per_s"] = row["tokens_per_s"] * flops_per_token / 1e12
        row["mfu"] = row["model_tflops_per_s"] / peak if peak else None

    method = f"LoRA r={args.rank} all-linear, dropout {args.dropout}" if args.method == "lora" else "full fine-tuning"
    print(f"\njob: {args.model}, {method}, {args.records} real chat records, max length "
          f"{args.max_length}, batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps, "
          f"{args.threads} threads, {args.precision}, median of {args.repeats} run(s) per tool\n")
    print(f"{'tool':<10} {'tokens/s':>10} {'padding':>8} {'peak MB':>9} {'final loss':>11} {'TFLOP/s':>8} {'MFU':>6}")
    for tool, row in figures.items():
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{tool:<10} {row['tokens_per_s']:>10.1f} {row['padding_fraction']:>8.3f} "
              f"{row['peak_memory_mb']:>9.0f} {row['final_loss']:>11.4f} {row['model_tflops_per_s']:>8.3f} {mfu:>6}")
    print(f"model FLOPs per trained token: {flops_per_token / 1e9:.3f} GFLOP (tunesmith.plan.model_flops_per_token); "
          + (f"MFU against a peak of {peak:.0f} TFLOP/s" if peak else
             "MFU needs the device's peak: known GPUs in bf16, or --peak-tflops"))
    ours = figures.get("tunesmith")
    if ours and ours.get("tokens_per_s_after_warmup"):
        steady = ours["tokens_per_s_after_warmup"]
        steady_tflops = steady * flops_per_token / 1e12
        print(f"tunesmith after its {ours['warmup_steps']} warm-up step(s): {steady:.1f} tokens/s, "
              f"{steady_tflops:.3f} TFLOP/s" + (f", MFU {100 * steady_tflops / peak:.1f}%" if peak else ""))
    agree = True
    if ours:
        for peer in (tool for tool in figures if tool != "tunesmith"):
            theirs = figures[peer]
            relative = abs(ours["final_loss"] - theirs["final_loss"]) / abs(theirs["final_loss"])
            # Only trl packs like we do, so only its steps see the same amount of data; the plain
            # Trainer's steps hold fewer records, and its loss is shown for information.
            if peer == "trl":
                agree &= relative <= args.loss_tolerance
            print(f"tunesmith / {peer}: tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                  f"peak memory x{ours['peak_memory_mb'] / theirs['peak_memory_mb']:.2f}, "
                  f"final loss differs by {100 * relative:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not agree:
        raise SystemExit(f"loss curves disagree by more than {100 * args.loss_tolerance:.0f}%")


if __name__ == "__main__":
    main()
