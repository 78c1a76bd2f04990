"""grpo / ppo sampling: each prompt's KV cache computed once for its group of G completions (tunesmith since
2026-11-23) against every copy of the prompt prefilled (tunesmith before, and `generate` on repeated prompts, as
trl's GRPOTrainer calls it without vLLM).

    python bench/rl_sampling.py                     # SmolLM2-135M + LoRA r 16, 5 GSM8K prompts x 8, 48 tokens
    python bench/rl_sampling.py --prompts 8 --group 16 --new-tokens 128 --rounds 2

The same model and prompts, both ways alternated round by round, each round with its own seed: prints the
seconds per round and their medians, the ratio, and whether both ways sampled the same completions (they
must: the cache holds the same keys and values; exit 1 if not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "gsm8k_train.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=5, help="GSM8K questions, the first ones of the train file")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (objective.group_size)")
    parser.add_argument("--new-tokens", type=int, default=48, help="objective.max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def main() -> int:
    from tunesmith.config import ModelConfig
    from tunesmith.data.preference import tokenize_preference_record
    from tunesmith.methods import METHODS
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives import rl

    args = parse_args()
    model_config = ModelConfig(name=args.model)
    tokenizer = load_tokenizer(model_config)
    with DATA.open(encoding="utf-8") as lines:
        records = [json.loads(line) for line, _ in zip(lines, range(args.prompts), strict=False)]
    examples = [tokenize_preference_record({"prompt": [{"role": "user", "content": record["question"]}],
                                            "answer": record["answer"]}, "grpo", tokenizer, 512)[0]
                for record in records]
    batch = rl.collate_prompts(examples, tokenizer.pad_token_id)
    lora = METHODS.get("lora")
    model = lora.apply(load_model(model_config, "grpo"), lora.settings(r=16, dropout=0.0), "grpo")
    settings = rl.GRPOSettings(rewards=["gsm8k_correctness"], group_size=args.group, max_new_tokens=args.new_tokens,
                               temperature=args.temperature)
    shared_cache = rl.sampling_cache
    seconds: dict[str, list[float]] = {"shared": [], "every copy": []}
    same = True
    for seed in range(args.rounds):
        sequences = {}
        for way in seconds:
            rl.sampling_cache = shared_cache if way == "shared" else (lambda *unused: None)
            torch.manual_seed(seed)
            start = time.perf_counter()
            sequences[way] = rl.sample_groups(model, batch, settings)["sequences"]
            seconds[way].append(time.perf_counter() - start)
        same = same and torch.equal(*sequences.values())
    rl.sampling_cache = shared_cache
    print(f"{args.model} + LoRA r 16, {args.prompts} prompts ({batch['input_ids'].shape[1]} tokens padded) x "
          f"{args.group} completions of up to {args.new_tokens} tokens, {torch.get_num_threads()} threads\n")
    print("| prompt prefill | seconds per round | median |\n| --- | --- | ---: |")
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    for way, values in seconds.items():
        print(f"| {way} | {', '.join(f'{value:.2f}' for value in values)} | {medians[way]:.2f} |")
    print(f"\nshared / every copy: x{medians['every copy'] / medians['shared']:.2f} faster; "
          f"the same completions: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
