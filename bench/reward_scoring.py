"""grpo / ppo with `objective.reward_run`: scoring each rollout's completions with a reward model, tunesmith's
`reward_model_scores` against the whole conversations, as trl's GRPOTrainer scores them.

    python bench/reward_scoring.py                   # SmolLM2-135M as the reward model, 8 GSM8K prompts x 8
    python bench/reward_scoring.py --group 16 --completion-tokens 256 --rounds 2

The reward model is the built-in model with a new one-output head (the speed does not depend on its training).
Each prompt's G completions are its GSM8K answer cut at G lengths up to `--completion-tokens`, like sampled
completions of different lengths. Two ways, alternated round by round, on the same conversations:
- `tunesmith`: each group's common tokens run once, its endings continue from their KV cache
  (objectives/rl.py `reward_model_scores`);
- `whole conversations`: every conversation rendered, tokenised and run whole in batches, as trl's
  GRPOTrainer runs a reward model (`score_conversations`; tunesmith before 2026-11-24).
Prints the seconds per round, the medians and their ratio, and the largest score difference (exit 1 over 1e-3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from workers import first_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "gsm8k_train.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8, help="GSM8K questions, the first ones of the train file")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (objective.group_size)")
    parser.add_argument("--completion-tokens", type=int, default=128, help="the longest completion, in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per forward, both ways")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def main() -> int:
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives.reward import score_conversations
    from tunesmith.objectives.rl import reward_model_scores

    args = parse_args()
    model_config = ModelConfig(name=args.model)
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, "reward", label_names=["reward"]).eval().requires_grad_(False)
    records = first_records(DATA, args.prompts)
    conversations = []
    for record in records:
        answer = tokenizer(record["answer"] + " " + record["answer"], add_special_tokens=False)["input_ids"]
        for index in range(args.group):
            length = args.completion_tokens * (index + 1) // args.group
            conversations.append([{"role": "user", "content": record["question"]},
                                  {"role": "assistant", "content": tokenizer.decode(answer[:length])}])

    ways = {
        "tunesmith": lambda: reward_model_scores(model, tokenizer, conversations, args.group, args.batch_size),
        "whole conversations": lambda: score_conversations(model, tokenizer, conversations, args.batch_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    scores: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            scores[name] = way()
            seconds[name].append(time.perf_counter() - start)
    difference = max(abs(a - b) for a, b in zip(scores["tunesmith"], scores["whole conversations"], strict=True))
    print(f"{len(conversations)} conversations ({args.prompts} prompts x {args.group}), threads "
          f"{torch.get_num_threads()}")
    for name, values in seconds.items():
        rounds = ', '.join(f'{value:.2f}' for value in values)
        print(f"{name:>20}: {rounds} s; median {statistics.median(values):.2f} s")
    ratio = statistics.median(seconds["whole conversations"]) / statistics.median(seconds["tunesmith"])
    print(f"tunesmith / whole conversations: x{ratio:.2f} faster; largest score difference {difference:.2e}")
    return 0 if difference <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
