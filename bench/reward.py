"""Reward modelling: tunesmith vs trl's RewardTrainer, the same job on the same micro-batches.

The same model with a one-output head (SmolLM2 as a sequence classifier), preference pairs (dpo_en_demo.json,
read in place and tokenised once by tunesmith's data layer: identical token ids for both tools), LoRA config
(the new head trained in full, as peft's SEQ_CLS task does), max length, batch, accumulation, steps, constant
learning rate, seed and threads. Both models are built the same way from the same seed (the head's random
start and LoRA's A matrices alike), and trl is fed tunesmith's micro-batches in tunesmith's order (one dataset
row per micro-batch, sequential sampling), so the loss and accuracy curves must agree step by step: the
Bradley-Terry loss -log sigma(r(chosen) - r(rejected)) of the same functions. Each tool runs in its own
subprocess, so peak memory (RSS on CPU, max allocated on CUDA) is its own.

tunesmith scores each pair as one row, its prompt run once (`pair_row_hidden`); trl runs chosen and rejected as
two whole sequences. Both read the reward at each sequence's last real token: tunesmith from the attention mask;
transformers' pooling takes the last token that is not the pad token, and SmolLM2's pad token is its end-of-turn
token (which ends every reply), so trl's rows are padded with `<|endoftext|>` instead (trl's `pad_token`).

    python bench/reward.py                          # the default job (a few minutes on a laptop CPU)
    python bench/reward.py --pairs 128 --max-length 512 --steps 10 --json reward.json

Figures: pairs/s (pairs trained over the summed optimiser-step time; tunesmith's step time includes collation,
trl's starts after its batches are collated), peak memory, and per step the loss, accuracy and margin; then
the ratios tunesmith / trl. Exits 1 when a step's loss differs by more than --loss-tolerance (relative). The
comparison holds where a step's micro-batches hold equal numbers of pairs (every step of the default job): trl
logs the mean of its micro-batches' mean losses, tunesmith the mean over the step's pairs, so a step that takes an
epoch's smaller last micro-batch differs by construction (e.g. `--pairs 8`: 7 usable pairs, step 1 of 2 + 1).

Requires trl (`pip install trl`).
"""

from __future__ import annotations

import argparse
import functools
import os
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
PAD = "<|endoftext|>"  # trl's pad token: a token no reply ends with (see the module's text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="preference data (any format tunesmith reads)")
    parser.add_argument("--pairs", type=int, default=64, help="records read from the data (pairs cut by truncation "
                                                               "to no response token are skipped)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=0,
                        help="1: both tools recompute activations in the backward pass (trl's default); 0: neither")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--loss-tolerance", type=float,
                        help="the largest relative difference of a step's loss; default 1%% in fp32, 5%% in bf16 (the "
                        "tools round differently: pair rows against two rows, their attention kernels)")
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
        "task": "reward",
        "method": {"name": "lora", "r": args.rank, "dropout": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "lr": args.lr, "warmup": 0, "scheduler": "constant", "seed": args.seed, "eval_before": False,
                  "log_every": 1, "gradient_checkpointing": bool(args.gradient_checkpointing),
                  "mixed_precision": "bf16" if under_autocast(args.precision) else "no"},
        "output_dir": str(output_dir),
    })


# --- workers: one tool each, in its own process ---------------------------------------------


def run_tunesmith(args: argparse.Namespace) -> dict:
    return train_pairs(functools.partial(job_config, args))


class MicroBatchCollator:
    """trl's batch from one tunesmith micro-batch: chosen rows, then rejected rows, right-padded with `pad_id`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.pairs = 0

    def __call__(self, rows: list[list[dict]]) -> dict:
        from tunesmith.objectives.preference import collate_pairs

        (examples,) = rows  # one dataset row is one whole micro-batch
        self.pairs += len(examples)
        batch = collate_pairs(examples, self.pad_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import RewardConfig, RewardTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    batches, tokenizer = loop_micro_batches(job_config(args, Path(tempfile.mkdtemp())), args.steps * args.grad_accum)
    torch.manual_seed(args.seed)  # as tunesmith's loop seeds before it builds the model, its head and adapters
    base = load_model(ModelConfig(name=args.model, dtype=weights_dtype(args.precision)), "reward", ["reward"])
    model = get_peft_model(base, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"))

    timer = step_timer()
    collator = MicroBatchCollator(tokenizer.convert_tokens_to_ids(PAD))
    with tempfile.TemporaryDirectory() as folder:
        config = RewardConfig(
            output_dir=folder, use_cpu=not torch.cuda.is_available(),
            bf16=under_autocast(args.precision),
            per_device_train_batch_size=1, gradient_accumulation_steps=args.grad_accum, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            max_length=args.max_length, gradient_checkpointing=bool(args.gradient_checkpointing), pad_token=PAD,
            logging_steps=1, save_strategy="no", report_to=[],
            seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False, train_sampling_strategy="sequential",
        )
        # trl tokenises the dataset it is built with; this placeholder is replaced by tunesmith's micro-batches
        # (already tokenised) before training, so the tokenisation of neither tool is timed.
        placeholder = Dataset.from_list([{"chosen": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "a"}],
                                          "rejected": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "b"}]}])
        trainer = RewardTrainer(model=model, args=config, train_dataset=placeholder, processing_class=tokenizer,
                                data_collator=collator, callbacks=[timer])
        trainer.train_dataset = batches
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "pairs": collator.pairs,
        "train_seconds": timer.seconds,
        "losses": [entry["loss"] for entry in logs],
        "reward_accuracy": [entry["accuracy"] for entry in logs],
        "reward_margin": [entry["margin"] for entry in logs],
    }


WORKERS = {"tunesmith": run_tunesmith, "trl": run_trl}


# --- the driver --------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.worker:
        pair_worker(WORKERS, args)
        return
    figures = run_tools(__file__, args, ("model", "data", "pairs", "max_length", "batch_size", "grad_accum", "steps",
                                         "lr", "rank", "seed", "threads", "precision", "gradient_checkpointing"))
    usable = figures.get("tunesmith", {}).get("pairs_in_data", "?")

    print(f"\njob: {args.model} with a one-output head, Bradley-Terry loss, LoRA r={args.rank} all-linear + the head, "
          f"first {args.pairs} records of {args.data.name} ({usable} usable pairs), max length {args.max_length}, "
          f"batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps, constant lr {args.lr}, "
          f"seed {args.seed}, {args.threads} threads, {weights_dtype(args.precision)} weights"
          f"{' under bf16 autocast' if under_autocast(args.precision) else ''}\n")
    print_pair_figures(figures)
    agree = True
    tolerance = args.loss_tolerance or (0.05 if under_autocast(args.precision) else 0.01)
    ours, theirs = figures.get("tunesmith"), figures.get("trl")
    if ours and theirs:
        differences = [abs(mine - peer) / peer for mine, peer in zip(ours["losses"], theirs["losses"], strict=True)]
        agree = max(differences) <= tolerance
        figures["ratios"] = {"pairs_per_s": ours["pairs_per_s"] / theirs["pairs_per_s"],
                             "peak_memory": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
                             "largest_step_loss_relative_difference": max(differences)}
        print(f"tunesmith / trl: pairs/s x{figures['ratios']['pairs_per_s']:.2f}, peak memory "
              f"x{figures['ratios']['peak_memory']:.2f}, step losses differ by at most {100 * max(differences):.3f}%")
    write_figures(args, figures)
    if not agree:
        raise SystemExit(f"loss curves disagree (each step within {100 * tolerance:.1f}%)")


if __name__ == "__main__":
    main()
