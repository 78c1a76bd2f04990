"""Training under autocast (`train.mixed_precision: bf16` with float32 weights): the reference's outputs, the
rollouts and the evaluation run under the same autocast as the policy's loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import chat_records, preference_records, run_config, write_jsonl

from tunesmith.training import train


def first_step(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_dpo_and_grpo_start_from_zero_log_ratios(tiny_llama_dir, tmp_path):
    """Before the first update the policy IS the reference: dpo's implicit rewards are 0 and its loss ln 2, grpo's
    KL 0. With the reference run in float32 beside a bf16-autocast policy they were not (rewards ~1e-4, KL
    ~1e-7, reward_accuracy 1 at the start)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8))
    dpo = train(run_config(tiny_llama_dir, pairs, tmp_path / "dpo", task="dpo", method={"name": "lora", "r": 4},
                           train={"max_steps": 1, "batch_size": 2, "mixed_precision": "bf16"}))
    step = first_step(dpo.run_dir)
    assert (step["chosen_reward"], step["rejected_reward"], step["reward_accuracy"]) == (0.0, 0.0, 0.0)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-7)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"What is {index} plus {index}?",
                                                        "answer": f"#### {2 * index}"} for index in range(4)])
    grpo = train(run_config(
        tiny_llama_dir, prompts, tmp_path / "grpo", task="grpo", method={"name": "lora", "r": 4},
        objective={"rewards": ["length_penalty"], "group_size": 2, "max_new_tokens": 6},
        train={"max_steps": 1, "batch_size": 2, "mixed_precision": "bf16"},
    ))
    assert first_step(grpo.run_dir)["kl"] == 0.0


def test_evaluation_runs_under_the_training_autocast(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.training.loop as loop

    seen = []
    real = loop.evaluation_totals

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args)

    monkeypatch.setattr(loop, "evaluation_totals", spy)
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
    train(run_config(tiny_llama_dir, data, tmp_path / "run", data={"eval_split": 0.25},
                     train={"max_steps": 1, "eval_before": True, "mixed_precision": "bf16"}))
    assert seen == [True, True]  # before training and after the step


def test_one_process_trains_again_with_another_precision(tiny_llama_dir, tmp_path):
    """accelerate keeps one state per process and refused a second run's other precision (a notebook, an
    in-process search): `AcceleratorState has already been initialized and cannot be changed`."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    for index, precision in enumerate(("no", "bf16", "no")):
        result = train(run_config(tiny_llama_dir, data, tmp_path / f"{index}", train={
            "max_steps": 1, "mixed_precision": precision}))
        assert result.exit_code == 0


def test_auto_takes_bf16_autocast_for_bfloat16_weights_on_the_cpu(tiny_llama_dir, tmp_path, monkeypatch):
    """train.mixed_precision auto: none for float32 weights on the CPU, bf16 autocast for bfloat16 weights (else peft
    runs its float32 adapters on float32 copies of their inputs, at half the tokens/s); what is set is kept."""
    import tunesmith.training.loop as loop
    from tunesmith.plan import mixed_precision_of

    assert mixed_precision_of("auto", on_gpu=False, weights="float32") == "no"
    assert mixed_precision_of("auto", on_gpu=False, weights="auto") == "no"
    assert mixed_precision_of("auto", on_gpu=False, weights="bfloat16") == "bf16"
    assert mixed_precision_of("auto", on_gpu=True, weights="auto") == "bf16"
    assert mixed_precision_of("no", on_gpu=False, weights="bfloat16") == "no"

    precisions = []
    real = loop.run_accelerator
    monkeypatch.setattr(loop, "run_accelerator", lambda precision: precisions.append(precision) or real(precision))
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    for dtype in ("float32", "bfloat16"):
        train(run_config(tiny_llama_dir, data, tmp_path / dtype, method={"name": "lora", "r": 4},
                         model={"name": str(tiny_llama_dir), "dtype": dtype}, train={"max_steps": 1}))
    assert precisions == ["no", "bf16"]
