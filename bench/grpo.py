"""GRPO: tunesmith vs trl's GRPOTrainer (without vLLM), the same job end to end: sampling, rewards, update.

The same model (LoRA r 16 all-linear, dropout 0), GSM8K prompts with examples/grpo-gsm8k-smollm2.yaml's
system prompt (the first --prompts questions of the train file, read in place), group size, completion length,
temperature, beta, clip range, learning rate, prompts per step, steps, seed and threads; the reward is
tunesmith's `gsm8k_correctness` function, which trl calls too. Sampling is random in both, so the completions
differ: the figures are seconds per step (sampling, scoring, the reference's log-probs and the update, each
tool's own step timing), peak memory (RSS on CPU, max allocated on CUDA), and the mean reward, KL and
completion length per step. Each tool runs in its own subprocess.

    python bench/grpo.py                       # 10 prompts, 5 a step x 8 completions of up to 48 tokens, 3 steps
    python bench/grpo.py --steps 4 --new-tokens 96 --json grpo.json

trl runs with loss_type "grpo" (each completion's token mean, then the mean over completions) and its default
group-std reward scaling, as tunesmith's grpo objective computes them. Requires trl (`pip install trl`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from workers import first_records, report, run_tools, step_timer, write_figures

from tunesmith.training.metrics import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sft" / "gsm8k_train.jsonl"
SYSTEM = "Solve the problem in a few short steps, then write: The answer is <number>."
TOOLS = ("tunesmith", "trl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=10, help="GSM8K questions, the first ones of the train file")
    parser.add_argument("--batch-size", type=int, default=5, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="longest completion")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=0,
                        help="1: both tools recompute activations in the backward pass (trl's default); 0: neither")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--json", type=Path, help="also write the job and the figures here")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_tunesmith(args: argparse.Namespace) -> dict:
    from tunesmith.config import build_config
    from tunesmith.training import train

    with tempfile.TemporaryDirectory() as folder:
        config = build_config({
            "model": {"name": args.model},
            "data": {"train": str(DATA), "limit": args.prompts, "eval_split": 0.0, "max_length": 256,
                     "system_prompt": SYSTEM},
            "task": "grpo",
            "objective": {"rewards": ["gsm8k_correctness"], "group_size": args.group,
                          "max_new_tokens": args.new_tokens, "temperature": args.temperature, "beta": args.beta},
            "method": {"name": "lora", "r": args.rank, "dropout": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "scheduler": "constant",
                      "warmup": 0, "seed": args.seed, "eval_before": False, "log_every": 1,
                      "gradient_checkpointing": bool(args.gradient_checkpointing)},
            "output_dir": str(Path(folder) / "run"),
        })
        result = train(config)
        steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "loss" in step]
    return {
        "train_seconds": result.summary["train_seconds"],
        "reward": [step["reward"] for step in steps],
        "kl": [step["kl"] for step in steps],
        "completion_length": [step["completion_length"] for step in steps],
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives.rl import REWARD_FUNCTIONS

    model_config = ModelConfig(name=args.model)
    tokenizer = load_tokenizer(model_config)
    torch.manual_seed(args.seed)
    model = get_peft_model(load_model(model_config, "grpo"), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    dataset = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": record["question"]}],
         "answer": record["answer"]}
        for record in first_records(DATA, args.prompts)
    ])
    correctness = REWARD_FUNCTIONS.get("gsm8k_correctness")

    def gsm8k_correctness(prompts, completions, answer, **_) -> list[float]:
        return correctness(prompts, [completion[0]["content"] for completion in completions], answer)

    timer = step_timer()
    with tempfile.TemporaryDirectory() as folder:
        config = GRPOConfig(
            output_dir=folder, use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # tunesmith's `auto` precision
            per_device_train_batch_size=args.batch_size * args.group, gradient_accumulation_steps=1,
            num_generations=args.group, max_completion_length=args.new_tokens, temperature=args.temperature,
            beta=args.beta, epsilon=0.2, loss_type="grpo", max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
            report_to=[], seed=args.seed, dataloader_num_workers=0,
            gradient_checkpointing=bool(args.gradient_checkpointing),
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[gsm8k_correctness], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {
        "train_seconds": timer.seconds,
        "reward": [entry["reward"] for entry in logs],
        "kl": [entry.get("kl", 0.0) for entry in logs],
        "completion_length": [entry["completions/mean_length"] for entry in logs],
    }


WORKERS = {"tunesmith": run_tunesmith, "trl": run_trl}


def main() -> None:
    args = parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        figures = WORKERS[args.worker](args)
        figures["seconds_per_step"] = figures["train_seconds"] / args.steps
        figures["peak_memory_mb"] = peak_memory_mb()
        report(figures)
        return
    figures = run_tools(__file__, args, ("model", "prompts", "batch_size", "group", "new_tokens", "temperature",
                                         "beta", "steps", "lr", "rank", "seed", "threads", "gradient_checkpointing"))
    print(f"\njob: {args.model}, GRPO on the first {args.prompts} GSM8K questions, {args.batch_size} prompts x "
          f"{args.group} completions of up to {args.new_tokens} tokens a step, temperature {args.temperature}, beta "
          f"{args.beta}, LoRA r={args.rank}, {args.steps} steps, lr {args.lr}, seed {args.seed}, "
          f"{args.threads} threads\n")
    print(f"{'tool':<10} {'s/step':>7} {'peak MB':>8}   per step: reward / KL / completion length")
    for tool, row in figures.items():
        steps = "  ".join(f"{reward:.3f} / {kl:.4f} / {length:.1f}" for reward, kl, length in
                          zip(row["reward"], row["kl"], row["completion_length"], strict=False))
        print(f"{tool:<10} {row['seconds_per_step']:>7.1f} {row['peak_memory_mb']:>8.0f}   {steps}")
    ours, theirs = figures.get("tunesmith"), figures.get("trl")
    if ours and theirs:
        figures["ratios"] = {"speed": theirs["seconds_per_step"] / ours["seconds_per_step"],
                             "peak_memory": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
                             "mean_reward": (statistics.fmean(ours["reward"]), statistics.fmean(theirs["reward"]))}
        print(f"tunesmith / trl: x{figures['ratios']['speed']:.2f} faster a step, peak memory "
              f"x{figures['ratios']['peak_memory']:.2f}")
    write_figures(args, figures)


if __name__ == "__main__":
    main()
