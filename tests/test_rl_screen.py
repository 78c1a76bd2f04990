"""Screening prompts by pass rate: `pass_rates` on the tiny model, and examples/screen_gsm8k_prompts.py end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml
from helpers import prompt_examples, write_jsonl

from tunesmith.config import ModelConfig
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives.rl import GRPOSettings, collate_prompts, pass_rates, register_reward

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "screen_gsm8k_prompts.py"


@register_reward("test_pass_by_answer")
def pass_by_answer(prompts, completions, answers) -> list[float]:
    """Whatever is sampled: 1 for answers naming `all`, 0 for `none`, and for `half` 1 on every other completion
    (each prompt's G completions are contiguous, so an even G passes exactly half of them)."""
    return [1.0 if "all" in answer else float(index % 2 == 0) if "half" in answer else 0.0
            for index, answer in enumerate(answers)]


def test_pass_rates_are_each_prompts_mean_over_its_group(tiny_llama_dir):
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    examples = prompt_examples(tokenizer, [f"Question {index}" for index in range(3)],
                               ["#### all", "#### half", "#### none"])
    batches = [collate_prompts(part, tokenizer.pad_token_id) for part in (examples[:2], examples[2:])]
    model = load_model(model_config, "grpo").train()
    settings = GRPOSettings(rewards=["test_pass_by_answer"], group_size=4, max_new_tokens=4)
    assert pass_rates(model, batches, settings) == [1.0, 0.5, 0.0]
    assert model.training  # sampling puts it back in training mode


def test_screen_script_keeps_the_original_lines_of_prompts_with_signal(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    records = [
        {"question": "Ann has 3 apples. How many?", "answer": "step one\nstep two\n#### half"},
        {"question": "Bo has 4.", "answer": "step one\n#### all"},
        {"question": "Cy has 5 pears and 6 figs. How many?", "answer": "step\n#### half"},
        {"question": "Di has 7.", "answer": "one\ntwo\nthree\n#### half"},  # 3 steps: not a candidate
        {"question": "Ed has 8.", "answer": "one\n#### none"},
    ]
    source = write_jsonl(tmp_path / "gsm8k.jsonl", records)
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama_dir)}, "data": {"train": str(source), "eval_split": 0.0},
        "task": "grpo", "objective": {"max_new_tokens": 4}, "output_dir": str(tmp_path / "run"),
    }), encoding="utf-8")
    output = tmp_path / "kept.jsonl"
    spec = importlib.util.spec_from_file_location("screen_gsm8k_prompts", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["screen", str(config), "--output", str(output), "--reward",
                                      "test_pass_by_answer", "--group-size", "2", "--max-steps", "2"])
    script.main()
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    assert output.read_text(encoding="utf-8") == lines[0] + lines[2]  # unchanged, in file order
    assert [json.loads(line) for line in output.read_text().splitlines()] == [records[0], records[2]]
    assert "4 questions x 2 samples" in capsys.readouterr().out
