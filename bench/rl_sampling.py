"""grpo / ppo sampling: tunesmith's `sample_groups` against `generate` as trl's GRPOTrainer calls it without vLLM.

    python bench/rl_sampling.py                     # SmolLM2-135M + LoRA r 16, 5 GSM8K prompts x 8, 48 tokens
    python bench/rl_sampling.py --prompts 8 --group 16 --new-tokens 128 --rounds 2

Three ways on the same model and prompts, alternated round by round, each round with its own seed:
- `tunesmith`: each prompt's KV cache computed once for its group, in a static cache written in place, and each
  token drawn by inverse transform (objectives/rl.py: `sampling_cache`, `CategoricalSample`);
- `tunesmith, generate's cache`: the same draws, `generate` making its own (dynamic) cache from every copy of
  the prompts: it must sample the same completions, but for a row whose draw falls within rounding of a token's
  boundary (the two caches add in different orders; the row then parts from there on, no other row does): exit
  1 if more than 5% of the rows differ;
- `generate`: the prompts repeated G times, `do_sample=True` (torch.multinomial) and its dynamic cache, as
  trl's GRPOTrainer samples without vLLM (tunesmith before 2026-11-23).
Prints the seconds per round, their medians and the ratios.
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
    parser.add_argument("--prompts", type=int, default=5, help="GSM8K questions, the first ones of the train file")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (objective.group_size)")
    parser.add_argument("--new-tokens", type=int, default=48, help="objective.max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def main() -> int:
    from tunesmith.config import ModelConfig
    from tunesmith.data.preference import tokenize_preference_record
    from tunesmith.inference import stop_token_ids
    from tunesmith.methods import METHODS
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives import rl

    args = parse_args()
    model_config = ModelConfig(name=args.model)
    tokenizer = load_tokenizer(model_config)
    records = first_records(DATA, args.prompts)
    examples = [tokenize_preference_record({"prompt": [{"role": "user", "content": record["question"]}],
                                            "answer": record["answer"]}, "grpo", tokenizer, 512)[0]
                for record in records]
    batch = rl.collate_prompts(examples, tokenizer.pad_token_id)
    lora = METHODS.get("lora")
    model = lora.apply(load_model(model_config, "grpo"), lora.settings(r=16, dropout=0.0), "grpo")
    settings = rl.GRPOSettings(rewards=["gsm8k_correctness"], group_size=args.group, max_new_tokens=args.new_tokens,
                               temperature=args.temperature)
    sampling_cache = rl.sampling_cache
    tokenizer_pad = tokenizer.pad_token_id
    stops = stop_token_ids(model.get_base_model(), tokenizer)

    def plain_generate() -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model.generate(
                input_ids=batch["input_ids"].repeat_interleave(args.group, 0),
                attention_mask=batch["attention_mask"].repeat_interleave(args.group, 0),
                max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=None,
                eos_token_id=stops, pad_token_id=tokenizer_pad)
        finally:
            model.train(was_training)

    ways = ("tunesmith", "tunesmith, generate's cache", "generate")
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    same_rows = rows = 0
    for seed in range(args.rounds):
        sequences = {}
        for way in ways:
            rl.sampling_cache = (lambda *unused: None) if way == "tunesmith, generate's cache" else sampling_cache
            torch.manual_seed(seed)
            start = time.perf_counter()
            sequences[way] = (plain_generate() if way == "generate"
                              else rl.sample_groups(model, batch, settings)["sequences"])
            seconds[way].append(time.perf_counter() - start)
        alike = (sequences["tunesmith"] == sequences["tunesmith, generate's cache"]).all(-1)  # (BG,)
        same_rows, rows = same_rows + int(alike.sum()), rows + len(alike)
    rl.sampling_cache = sampling_cache
    print(f"{args.model} + LoRA r 16, {args.prompts} prompts ({batch['input_ids'].shape[1]} tokens padded) x "
          f"{args.group} completions of up to {args.new_tokens} tokens, {torch.get_num_threads()} threads\n")
    print("| sampling | seconds per round | median |\n| --- | --- | ---: |")
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    for way, values in seconds.items():
        print(f"| {way} | {', '.join(f'{value:.2f}' for value in values)} | {medians[way]:.2f} |")
    print(f"\ntunesmith: x{medians['generate'] / medians['tunesmith']:.2f} faster than generate as trl calls it, "
          f"x{medians[ways[1]] / medians['tunesmith']:.2f} than its own draws from generate's cache; the same "
          f"completions with either cache: {same_rows} of {rows} rows")
    return 0 if same_rows >= 0.95 * rows else 1


if __name__ == "__main__":
    sys.exit(main())
