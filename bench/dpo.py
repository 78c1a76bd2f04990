"""DPO: tunesmith vs trl's DPOTrainer, the same job on the same micro-batches.

The same model, preference pairs (dpo_en_demo.json, read in place and tokenised once by tunesmith's
data layer: identical token ids and response masks for both tools), LoRA config, beta, max length,
batch, accumulation, steps, constant learning rate, seed and threads. trl is fed tunesmith's
micro-batches in tunesmith's order (one dataset row per micro-batch, sequential sampling), so the
two loss and reward-accuracy curves are comparable step by step: with LoRA's B = 0 start, the policy
equals the reference at step 1, so both must log loss ln 2 and accuracy 0 there. Each tool runs in
its own subprocess so peak memory (RSS on CPU, max allocated on CUDA) is its own.

    python bench/dpo.py                          # the default, tiny job (a few minutes on a laptop CPU)
    python bench/dpo.py --pairs 256 --max-length 512 --steps 20 --json dpo.json

Figures: pairs/s (pairs trained over the summed optimiser-step time; tunesmith's step time includes
collation, trl's starts after its batches are collated), peak memory, and per step the loss, reward
accuracy and reward margin; then the ratios tunesmith / trl. On CPU, peak memory is peak RSS, which
also counts what glibc's heap keeps after tensors are freed (its mmap threshold grows to 32 MB after the
first large free, so later activations stay in a fragmenting heap); `MALLOC_MMAP_THRESHOLD_=1048576`
in the environment (both workers inherit it) makes RSS follow the tensors the tools hold. The script
exits 1 when the step-1 losses differ from ln 2 or the mean losses differ by more than --loss-tolerance
(relative).

Requires trl (`pip install trl`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import tempfile
from pathlib import Path

from workers import (
    PRECISION_HELP,
    PRECISIONS,
    loop_micro_batches,
    pair_worker,
    print_pair_figures,
    run_tools,
    step_timer,
    train_pairs,
    under_autocast,
    weights_dtype,
    write_figures,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preference" / "dpo_en_demo.json"
TOOLS = ("tunesmith", "trl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="preference data (any format tunesmith reads)")
    parser.add_argument("--pairs", type=int, default=32, help="records read from the data (pairs cut by truncation "
                                                               "to no response token are skipped)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=0,
                        help="1: both tools recompute activations in the backward pass (trl's default); 0: neither")
    parser.add_argument("--release-memory", type=int, choices=(0, 1), default=0,
                        help="1: tunesmith runs with train.release_memory (lower peak RSS on CPU, fewer tokens/s)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--loss-tolerance", type=float, default=0.05)
    parser.add_argument("--json", type=Path, help="also write the job and the figures here")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the shared job --------------------------------------------------------------------------


def job_config(args: argparse.Namespace, output_dir: Path):
    from tunesmith.config import build_config

    return build_config({
        "model": {"name": args.model, "dtype": weights_dtype(args.precision)},
        "data": {"train": str(args.data), "eval_split": 0.0, "max_length": args.max_length, "limit": args.pairs,
                 "on_error": "skip"},
        "task": "dpo",
        "objective": {"beta": args.beta, "loss": "sigmoid"},
        "method": {"name": "lora", "r": args.rank, "dropout": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "lr": args.lr, "warmup": 0, "scheduler": "constant", "seed": args.seed, "eval_before": False,
                  "log_every": 1, "gradient_checkpointing": bool(args.gradient_checkpointing),
                  "mixed_precision": "bf16" if under_autocast(args.precision) else "no",
                  "release_memory": bool(args.release_memory)},
        "output_dir": str(output_dir),
    })


def job_micro_batches(args: argparse.Namespace) -> tuple[list[list[dict]], object]:
    """The examples of every micro-batch tunesmith's loop trains on, in its order, and the tokenizer."""
    return loop_micro_batches(job_config(args, Path(tempfile.mkdtemp())), args.steps * args.grad_accum)


# --- workers: one tool each, in its own process ---------------------------------------------


def run_tunesmith(args: argparse.Namespace) -> dict:
    return train_pairs(functools.partial(job_config, args))


class MicroBatchCollator:
    """trl's batch format from one tunesmith micro-batch: tunesmith's own (2B, T) pair batch (chosen rows,
    then rejected rows, right-padded), with `completion_mask` marking the tokens tunesmith scores."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.pairs = 0

    def __call__(self, rows: list[list[dict]]) -> dict:
        import torch

        from tunesmith.data.collate import IGNORE_INDEX
        from tunesmith.objectives.preference import collate_pairs

        (examples,) = rows  # one dataset row is one whole micro-batch
        self.pairs += len(examples)
        batch = collate_pairs(examples, self.pad_id)
        # tunesmith's targets are shifted (targets[t] is the token at t + 1); trl marks the scored tokens themselves.
        completion_mask = torch.zeros_like(batch["input_ids"])  # (2B, T)
        completion_mask[:, 1:] = batch["targets"][:, :-1] != IGNORE_INDEX
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "completion_mask": completion_mask}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    batches, tokenizer = job_micro_batches(args)
    torch.manual_seed(args.seed)  # as tunesmith's loop seeds before it builds the model and its adapters
    base = load_model(ModelConfig(name=args.model, dtype=weights_dtype(args.precision)), "dpo")
    model = get_peft_model(base, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))

    timer = step_timer()
    collator = MicroBatchCollator(tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as folder:
        config = DPOConfig(
            output_dir=folder, use_cpu=not torch.cuda.is_available(),
            bf16=under_autocast(args.precision),
            per_device_train_batch_size=1, gradient_accumulation_steps=args.grad_accum, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
            gradient_checkpointing=bool(args.gradient_checkpointing), logging_steps=1, save_strategy="no",
            report_to=[], seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="sequential",
        )
        # trl tokenises the dataset it is built with; this placeholder is replaced by tunesmith's micro-batches
        # (already tokenised) before training, so the tokenisation of neither tool is timed.
        placeholder = Dataset.from_list([{"prompt": "hi", "chosen": " a", "rejected": " b"}])
        trainer = DPOTrainer(model=model, args=config, train_dataset=placeholder, processing_class=tokenizer,
                             data_collator=collator, callbacks=[timer])
        trainer.train_dataset = batches
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "pairs": collator.pairs,
        "train_seconds": timer.seconds,
        "losses": [entry["loss"] for entry in logs],
        "reward_accuracy": [entry["rewards/accuracies"] for entry in logs],
        "reward_margin": [entry["rewards/margins"] for entry in logs],
    }


WORKERS = {"tunesmith": run_tunesmith, "trl": run_trl}


# --- the driver --------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.worker:
        pair_worker(WORKERS, args)
        return
    figures = run_tools(__file__, args, ("model", "data", "pairs", "max_length", "batch_size", "grad_accum", "steps",
                                         "lr", "beta", "rank", "seed", "threads", "precision", "gradient_checkpointing",
                                         "release_memory"))
    usable = figures.get("tunesmith", {}).get("pairs_in_data", "?")

    print(f"\njob: {args.model}, DPO sigmoid beta={args.beta}, LoRA r={args.rank} all-linear, first {args.pairs} "
          f"records of {args.data.name} ({usable} usable pairs), max length {args.max_length}, batch "
          f"{args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps, constant lr {args.lr}, "
          f"seed {args.seed}, {args.threads} threads, {weights_dtype(args.precision)} weights"
          f"{' under bf16 autocast' if under_autocast(args.precision) else ''}\n")
    print_pair_figures(figures)
    agree = True
    for tool, row in figures.items():
        if row["losses"] and abs(row["losses"][0] - math.log(2)) > 1e-3:
            agree = False
            print(f"{tool}: step-1 loss {row['losses'][0]:.5f} is not ln 2 although policy == reference")
    ours, theirs = figures.get("tunesmith"), figures.get("trl")
    if ours and theirs:
        relative = abs(statistics.fmean(ours["losses"]) - statistics.fmean(theirs["losses"])) / statistics.fmean(
            theirs["losses"])
        agree &= relative <= args.loss_tolerance
        figures["ratios"] = {"pairs_per_s": ours["pairs_per_s"] / theirs["pairs_per_s"],
                             "peak_memory": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
                             "mean_loss_relative_difference": relative}
        print(f"tunesmith / trl: pairs/s x{figures['ratios']['pairs_per_s']:.2f}, peak memory "
              f"x{figures['ratios']['peak_memory']:.2f}, mean loss differs by {100 * relative:.2f}%")
    write_figures(args, figures)
    if not agree:
        raise SystemExit(f"loss curves disagree (step 1 must be ln 2; means within {100 * args.loss_tolerance:.0f}%)")


if __name__ == "__main__":
    main()
