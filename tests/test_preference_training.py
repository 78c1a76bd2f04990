"""Preference objectives through the one loop on the tiny Llama: they learn the preference, train exactly
the parameters the method makes trainable, use the base as the LoRA reference, and count pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import preference_records, run_config, write_jsonl
from safetensors.torch import load_file

from tunesmith.config import ModelConfig
from tunesmith.data.preference import tokenize_preference_record
from tunesmith.methods import METHODS
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.preference import cache_reference_outputs, collate_pairs, pair_logps, reference_pair_logps
from tunesmith.training import train
from tunesmith.training.reference import ReferenceModel, add_reference_outputs


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", preference_records(8))


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["dpo", "simpo", "orpo", "kto"])
def test_learns_the_preference_and_trains_exactly_the_trainable_parameters(task, tiny_llama_dir, pairs_file, tmp_path):
    method = {"name": "freeze", "layers": 1}
    config = run_config(
        tiny_llama_dir, pairs_file, tmp_path / "run", task=task, method=method, data={"eval": str(pairs_file)},
        train={"max_steps": 6, "batch_size": 8, "lr": 5e-3, "scheduler": "constant"},
    )
    base = load_model(config.model, task)
    expected = {
        name for name, parameter in METHODS.get("freeze").apply(load_model(config.model, task), config.method, task)
        .named_parameters() if parameter.requires_grad
    }
    result = train(config)

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["eval"]["reward_accuracy"] > 0.9, summary["eval"]
    assert "reward_margin" in summary["eval"] and summary["eval"]["reward_margin"] > 0
    step_rows = [row for row in metric_rows(result.run_dir) if "loss" in row]
    assert "reward_accuracy" in step_rows[-1]  # the objective's metrics are logged every step
    after = load_file(result.run_dir / "model" / "model.safetensors")
    before = {name: parameter.detach() for name, parameter in base.named_parameters()}
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    assert expected and changed == expected


def test_lora_reference_is_the_base_model(tiny_llama_dir, tmp_path):
    """With adapters disabled, the reference log-probs equal a plain load of the base; the policy's differ."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    examples = [
        example
        for record in preference_records(3)
        for example in tokenize_preference_record(
            {"prompt": [{"role": "user", "content": record["prompt"]}],
             "chosen": [{"role": "assistant", "content": record["chosen"]}],
             "rejected": [{"role": "assistant", "content": record["rejected"]}]},
            "dpo", tokenizer, 128,
        )
    ]
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    settings = METHODS.get("lora").settings(r=4)
    policy = METHODS.get("lora").apply(load_model(model_config, "dpo"), settings, "dpo")
    with torch.no_grad():  # move the adapters off their zero start, as training would
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    reference = ReferenceModel(policy)
    assert reference.frozen_copy is None  # no second copy in memory
    with reference.active(policy) as reference_model:
        from_reference = reference_pair_logps(reference_model, batch, None)
    with torch.no_grad():
        from_base = pair_logps(load_model(model_config, "dpo").eval(), batch)
        from_policy = pair_logps(policy.eval(), batch)
    torch.testing.assert_close(from_reference["reference_chosen_logps"], from_base["policy_chosen_logps"])
    torch.testing.assert_close(from_reference["reference_rejected_logps"], from_base["policy_rejected_logps"])
    assert not torch.allclose(from_policy["policy_chosen_logps"], from_base["policy_chosen_logps"])


def test_dpo_batch8_equals_batch2_times_accumulation4(tiny_llama_dir, pairs_file, tmp_path):
    """Pairs are counted: 8 pairs x 1 and 2 pairs x 4 micro-batches give the same steps."""
    common = {"max_steps": 2, "max_grad_norm": None, "seed": 5}
    data = {"group_by_length": False}
    runs = [
        train(run_config(tiny_llama_dir, pairs_file, tmp_path / name, task="dpo", data=data,
                         train={**common, "batch_size": batch, "grad_accum": accumulation}))
        for name, batch, accumulation in (("a", 8, 1), ("b", 2, 4))
    ]
    one, four = ([row["loss"] for row in metric_rows(run.run_dir) if "loss" in row] for run in runs)
    assert one == pytest.approx(four, rel=1e-5)
    weights_one = load_file(runs[0].run_dir / "model" / "model.safetensors")
    weights_four = load_file(runs[1].run_dir / "model" / "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_four[name], tensor, rtol=1e-4, atol=1e-5)


def test_reward_model_learns_preference_accuracy_and_scores(tiny_llama_dir, pairs_file, tmp_path):
    from tunesmith.models import load_run
    from tunesmith.objectives.reward import score_conversations

    config = run_config(
        tiny_llama_dir, pairs_file, tmp_path / "run", task="reward", data={"eval": str(pairs_file)},
        train={"max_steps": 8, "batch_size": 8, "lr": 2e-3, "scheduler": "constant"},
    )
    result = train(config)
    assert result.summary["eval"]["reward_accuracy"] > 0.9, result.summary["eval"]
    assert json.loads((result.run_dir / "labels.json").read_text()) == ["reward"]

    model, tokenizer = load_run(result.run_dir, device="cpu")
    assert model.config.num_labels == 1
    record = preference_records(1)[0]
    prompt = [{"role": "user", "content": record["prompt"]}]
    good, bad = score_conversations(model, tokenizer, [
        [*prompt, {"role": "assistant", "content": record["chosen"]}],
        [*prompt, {"role": "assistant", "content": record["rejected"]}],
    ])
    assert good > bad


@pytest.mark.parametrize(("task", "method"), [("dpo", "full"), ("kto", "full"), ("dpo", "lora")])
def test_reference_cached_in_one_pass_equals_the_live_reference(task, method, tiny_llama_dir):
    """Reference outputs cached per example before training give the batches (and the loss) that the live
    reference gives (a frozen copy for full fine-tuning, disabled adapters for LoRA), in other batches."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    examples = [
        example
        for record in preference_records(6)
        for example in tokenize_preference_record(
            {"prompt": [{"role": "user", "content": record["prompt"]}],
             "chosen": [{"role": "assistant", "content": record["chosen"]}],
             "rejected": [{"role": "assistant", "content": record["rejected"]}]},
            task, tokenizer, 128,
        )
    ]
    objective, pad_id = OBJECTIVES.get(task), tokenizer.pad_token_id
    settings = objective.settings()
    spec = METHODS.get(method)
    policy = spec.apply(load_model(model_config, task), spec.settings(**({"r": 4} if method == "lora" else {})), task)
    torch.manual_seed(0)

    def move_trainable_parameters():  # as training moves them; LoRA's B leaves zero, so adapters matter
        with torch.no_grad():
            for parameter in policy.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn_like(parameter))

    if method == "lora":
        move_trainable_parameters()  # the cache must still see the base, as `ReferenceModel` does
    reference = ReferenceModel(policy)
    assert (reference.frozen_copy is None) == (method == "lora")  # full: the copy that the cache replaces
    cached = [dict(example) for example in examples]
    cache_reference_outputs(objective, policy, cached, settings, pad_id, batch_size=4)
    move_trainable_parameters()
    for start in (0, 3):
        live = add_reference_outputs(objective, reference, policy, objective.collate(examples[start:start + 3], pad_id),
                                     settings)
        from_cache = objective.collate(cached[start:start + 3], pad_id)
        names = [name for name in live if name.startswith("reference_")]
        assert names and sorted(names) == sorted(name for name in from_cache if name.startswith("reference_"))
        for name in names:
            torch.testing.assert_close(from_cache[name], live[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(objective.loss(policy, from_cache, settings).loss_sum,
                                   objective.loss(policy, live, settings).loss_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_cache_reference_trains_from_the_stored_reference(task, tiny_llama_dir, pairs_file, tmp_path):
    """train.cache_reference with full fine-tuning: the reference log-probs are stored in one pass (no frozen
    copy), so step 1, where policy == reference, has DPO's ln 2 loss, and the preference is still learned."""
    config = run_config(
        tiny_llama_dir, pairs_file, tmp_path / "run", task=task, method={"name": "full"},
        data={"eval": str(pairs_file)},
        train={"max_steps": 6, "batch_size": 8, "lr": 5e-3, "scheduler": "constant", "cache_reference": True},
    )
    result = train(config)
    step_rows = [row for row in metric_rows(result.run_dir) if "loss" in row]
    if task == "dpo":
        assert step_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.summary["eval"]["reward_accuracy"] > 0.9, result.summary["eval"]
