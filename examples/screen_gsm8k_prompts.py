"""Screen GSM8K questions for the ones a model SOMETIMES answers correctly: where GRPO's correctness reward
has a signal (a group whose completions all score the same has zero advantages; see `pass_rates`).

Each candidate question is prompted exactly as `tunesmith train CONFIG` prompts it (the config's model,
data.system_prompt, chat template, data.max_length) and G completions are sampled with the config's
objective settings (max_new_tokens, temperature, top_p); the pass rate is the fraction scored correct by
`gsm8k_correctness`. Questions with 0 < rate < 1 are written to OUTPUT as their original JSONL lines,
unchanged, for the config to train on:

    OMP_NUM_THREADS=1 .venv/bin/python examples/screen_gsm8k_prompts.py examples/grpo-gsm8k-smollm2.yaml \\
        --output runs/grpo-gsm8k-screened.jsonl

With --run, a finished run's model is measured instead of the config's base model, e.g. on the screened
questions after GRPO (`--source runs/grpo-gsm8k-screened.jsonl --run runs/grpo-gsm8k-smollm2`).

Candidates are the questions whose reference solution takes at most --max-steps lines of working, shortest
question first: the easiest GSM8K problems, where a small model's rate is least likely to be 0. The reference
answer is used only to score completions, never shown to the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.data.preference import to_preference_canonical, tokenize_preference_record
from tunesmith.data.templates import ensure_chat_template
from tunesmith.models import load_model, load_run, load_tokenizer
from tunesmith.objectives.rl import collate_prompts, pass_rates


def solution_steps(answer: str) -> int:
    """Lines of working in a GSM8K reference answer (the lines before `#### <number>`)."""
    working = answer.split("####")[0]
    return sum(1 for line in working.splitlines() if line.strip())


def read_candidates(path: Path, count: int, max_steps: int) -> list[tuple[int, str, dict]]:
    """(line number, line, record) of the `count` shortest questions with at most `max_steps` steps."""
    candidates = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if solution_steps(record["answer"]) <= max_steps:
                candidates.append((number, line.rstrip("\n"), record))
    candidates.sort(key=lambda candidate: (len(candidate[2]["question"]), candidate[0]))
    return candidates[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="The GRPO run config (model, data.system_prompt, objective).")
    parser.add_argument("--source", type=Path, help="GSM8K JSONL to screen; default the config's data.train.")
    parser.add_argument("--output", type=Path, help="Where the kept records go (0 < pass rate < 1).")
    parser.add_argument("--run", type=Path, help="Measure this finished run's model instead of the base model.")
    parser.add_argument("--candidates", type=int, default=48, help="How many questions to screen.")
    parser.add_argument("--max-steps", type=int, default=2, help="Most lines of working in the reference answer.")
    parser.add_argument("--group-size", type=int, default=8, help="Completions sampled per question.")
    parser.add_argument("--batch-size", type=int, default=4, help="Questions per generate call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    parser.add_argument("--reward", default="gsm8k_correctness", help="The 0/1 reward that decides a pass.")
    args = parser.parse_args()

    config = load_config(args.config)
    # Only the pass/fail reward decides a pass, whatever else the config's rewards add (e.g. a length penalty).
    settings = config.objective.model_copy(
        update={"rewards": [args.reward], "reward_weights": None, "reward_run": None, "group_size": args.group_size}
    )
    candidates = read_candidates(args.source or config.data.train, args.candidates, args.max_steps)
    if args.run is not None:
        model, tokenizer = load_run(args.run, device="cpu")
    else:
        tokenizer = load_tokenizer(config.model)
        model = load_model(config.model, config.task)
    ensure_chat_template(tokenizer)
    examples = []
    for _, _, record in candidates:
        canonical = to_preference_canonical(record, "prompt", config.data.columns, config.data.system_prompt)
        examples += tokenize_preference_record(canonical, config.task, tokenizer, config.data.max_length)
    batches = [collate_prompts(examples[start:start + args.batch_size], tokenizer.pad_token_id)
               for start in range(0, len(examples), args.batch_size)]

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    rates = pass_rates(model, batches, settings)
    seconds = time.perf_counter() - started

    kept = sorted(candidate for candidate, rate in zip(candidates, rates, strict=True) if 0 < rate < 1)
    for (number, _, record), rate in zip(candidates, rates, strict=True):
        if rate > 0:
            print(f"line {number:>5}  pass rate {rate:.3f}  {record['question'][:90]}")
    mean = sum(rates) / max(len(rates), 1)
    print(f"{len(rates)} questions x {args.group_size} samples in {seconds:.0f} s: mean pass rate {mean:.3f}, "
          f"{sum(rate > 0 for rate in rates)} with any correct, {len(kept)} with 0 < rate < 1")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(line + "\n" for _, line, _ in kept), encoding="utf-8")  # file order
        print(f"kept {len(kept)} records -> {args.output}")


if __name__ == "__main__":
    main()
