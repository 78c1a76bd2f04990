"""Reptile meta-learning (training/meta.py): the outer update, adapter init, and faster few-shot adaptation.

The task family: each task adds its own offset modulo M to a token, x -> (x + offset) mod M, shown as
the three tokens [BOS, x, y] with the loss on y only. No task can be solved from the context; a model
must adapt its weights to the offset, which is what a meta-learned initialisation should make quick.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from helpers import run_cli, run_config, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS
from tunesmith.objectives import OBJECTIVES
from tunesmith.training.loop import run_accelerator
from tunesmith.training.meta import (
    MetaConfig,
    adaptation_loss,
    meta_train,
    meta_train_run,
    reptile_step,
    split_tasks,
    trainable_parameters,
)

MODULUS = 16
FIRST_INPUT = 20  # input tokens are FIRST_INPUT .. FIRST_INPUT + M - 1, outputs the next M ids
SFT = OBJECTIVES.get("sft")


def offset_task(offset: int, count: int, rng: random.Random) -> list[dict]:
    """`count` examples of x -> (x + offset) mod M as causal-LM examples with the loss on the answer only."""
    examples = []
    for _ in range(count):
        value = rng.randrange(MODULUS)
        answer = FIRST_INPUT + MODULUS + (value + offset) % MODULUS
        examples.append({"input_ids": [1, FIRST_INPUT + value, answer], "labels": [-100, -100, answer]})
    return examples


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def held_out_losses() -> dict[str, float]:
    """Mean held-out-task eval loss after k = 5 adaptation steps from three inits built with the same budget:
    the plain init, Reptile's init, and joint training on the union of the meta-training tasks."""
    rng = random.Random(0)
    offsets = rng.sample(range(MODULUS), MODULUS)
    train_tasks = {f"offset_{offset}": offset_task(offset, 40, rng) for offset in offsets[:12]}
    held_out = [(offset_task(offset, 20, rng), offset_task(offset, 40, rng)) for offset in offsets[12:]]
    meta = MetaConfig(meta_steps=40, tasks_per_step=2, inner_steps=5, inner_batch_size=10, inner_lr=3e-3, seed=0)
    accelerator = run_accelerator("no")

    def mean_after_adaptation(model) -> float:
        losses = [adaptation_loss(model, support, query, meta, SFT, SFT.settings(), 0, accelerator)
                  for support, query in held_out]
        return sum(loss["after"] for loss in losses) / len(losses)

    plain = tiny_llama()
    reptile = tiny_llama()
    meta_train(reptile, train_tasks, SFT, SFT.settings(), meta, pad_id=0, accelerator=accelerator)
    # Joint training: the same number of inner-optimiser steps, on batches of the union of the tasks.
    joint = tiny_llama()
    union = [example for examples in train_tasks.values() for example in examples]
    steps = meta.meta_steps * meta.tasks_per_step * meta.inner_steps
    one_long_run = meta.model_copy(update={"meta_steps": 1, "tasks_per_step": 1, "inner_steps": steps})
    meta_train(joint, {"union": union}, SFT, SFT.settings(), one_long_run, pad_id=0, accelerator=accelerator)
    return {"plain": mean_after_adaptation(plain), "reptile": mean_after_adaptation(reptile),
            "joint": mean_after_adaptation(joint)}


def test_reptile_init_adapts_faster_than_the_plain_init_on_held_out_tasks(held_out_losses):
    # Measured: plain 5.21, Reptile 2.02 (ln 16 = 2.77 is knowing the answer range and nothing more).
    assert held_out_losses["reptile"] < held_out_losses["plain"] - 1.0


def test_reptile_init_adapts_faster_than_joint_training_on_the_same_tasks(held_out_losses):
    # Joint training learns the average task; Reptile learns a point a few steps from every task's
    # solutions (Nichol et al. 2018, "Finding a Point Near All Solution Manifolds"). Measured: joint 2.97,
    # Reptile 2.02.
    assert held_out_losses["reptile"] < held_out_losses["joint"] - 0.3


def sgd_fine_tune(model: torch.nn.Module, batches: list[dict], lr: float) -> list[torch.Tensor]:
    """φ computed by hand: plain SGD on the mean token loss, independent of meta.py and the loop."""
    for batch in batches:
        output = SFT.loss(model, batch, SFT.settings())
        (output.loss_sum / output.num_loss_tokens).backward()
        with torch.no_grad():
            for parameter in trainable_parameters(model):
                parameter -= lr * parameter.grad
                parameter.grad = None
    return [parameter.detach().clone() for parameter in trainable_parameters(model)]


def test_reptile_step_moves_towards_the_mean_of_the_adapted_weights():
    rng = random.Random(1)
    meta = MetaConfig(inner_steps=3, inner_optimizer="sgd", inner_lr=0.1)
    task_batches = [[SFT.collate(offset_task(offset, 6, rng), 0) for _ in range(meta.inner_steps)]
                    for offset in (3, 11)]
    model = tiny_llama()
    theta = [parameter.detach().clone() for parameter in trainable_parameters(model)]
    adapted = [sgd_fine_tune(copy.deepcopy(model), batches, meta.inner_lr) for batches in task_batches]

    losses = reptile_step(model, trainable_parameters(model), [iter(batches) for batches in task_batches],
                          0.5, meta, SFT, SFT.settings(), run_accelerator("no"))

    assert [len(task_losses) for task_losses in losses] == [3, 3]
    for parameter, start, first, second in zip(trainable_parameters(model), theta, *adapted, strict=True):
        expected = start + 0.5 * ((first + second) / 2 - start)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-6)
    parameters = trainable_parameters(model)
    assert any(not torch.equal(parameter, start) for parameter, start in zip(parameters, theta, strict=True))


def test_lora_meta_learns_an_adapter_init_and_leaves_the_base_frozen():
    rng = random.Random(2)
    tasks = {f"offset_{offset}": offset_task(offset, 8, rng) for offset in (1, 5, 9)}
    lora = METHODS.get("lora")
    model = lora.apply(tiny_llama(), lora.settings(r=4), "sft")
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    meta = MetaConfig(meta_steps=2, tasks_per_step=2, inner_steps=2, inner_batch_size=4, inner_lr=1e-2)

    history = meta_train(model, tasks, SFT, SFT.settings(), meta, pad_id=0)

    assert [record["step"] for record in history] == [1, 2]
    assert history[0]["outer_lr"] == 1.0 and history[1]["outer_lr"] == 0.5  # annealed linearly towards 0
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == ("lora_" in name), name


def test_tasks_come_from_the_mixture_and_held_out_tasks_are_checked():
    def examples(task: str, count: int) -> list[dict]:
        return [{"input_ids": [1, 2], "labels": [1, 2], "task": task} for _ in range(count)]

    tasks = split_tasks(examples("a", 3) + examples("b", 2), examples("b", 1), MetaConfig(held_out_tasks=["b"]))
    assert {name: len(items) for name, items in tasks.train.items()} == {"a": 3}
    assert [len(part) for part in tasks.held_out["b"]] == [2, 1]

    with pytest.raises(ConfigError, match=r"meta.held_out_tasks: 'bb' is not a data.mixture task \(did you mean"):
        split_tasks(examples("a", 1) + examples("b", 1), [], MetaConfig(held_out_tasks=["bb"]))
    with pytest.raises(ConfigError, match="meta.held_out_tasks: task 'a' has no eval examples"):
        split_tasks(examples("a", 1) + examples("b", 1), examples("b", 1), MetaConfig(held_out_tasks=["a"]))
    with pytest.raises(ConfigError, match="leave at least one to meta-train on"):
        split_tasks(examples("a", 1), examples("a", 1), MetaConfig(held_out_tasks=["a"]))
    with pytest.raises(ConfigError, match="data.mixture: meta-train learns across tasks"):
        split_tasks([{"input_ids": [1], "labels": [1]}], [], MetaConfig())


def offset_records(offset: int, count: int) -> list[dict]:
    """The offset family as instruction records, for runs that read files."""
    return [{"prompt": f"shift {value}", "response": str((value + offset) % MODULUS)} for value in range(count)]


def mixture_config(tiny_llama_dir, tmp_path, meta: dict | None = None):
    files = {offset: write_jsonl(tmp_path / f"offset_{offset}.jsonl", offset_records(offset, 12))
             for offset in (2, 7, 13)}
    mixture = [{"name": f"offset_{offset}", "train": str(path)} for offset, path in files.items()]
    extra = {"meta": meta} if meta is not None else {}
    return run_config(
        tiny_llama_dir, files[2], tmp_path / "run",
        data={"train": None, "eval_split": 0.25, "mixture": mixture}, method={"name": "lora", "r": 4},
        **extra,
    )


def test_meta_train_run_writes_an_adapter_and_a_summary(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = mixture_config(tiny_llama_dir, tmp_path)
    meta = MetaConfig(meta_steps=3, tasks_per_step=2, inner_steps=2, inner_batch_size=4, inner_lr=1e-2,
                      held_out_tasks=["offset_13"])

    result = meta_train_run(config, meta)

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert set(summary["tasks"]) == {"offset_2", "offset_7"}
    losses = summary["held_out"]["offset_13"]
    assert losses["base"]["before"] != losses["meta"]["before"]  # meta-training moved the adapter
    assert losses["base"]["after"] < losses["base"]["before"]  # adaptation is measured after real steps
    rows = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = PeftModel.from_pretrained(base, result.run_dir / "adapter")  # plain peft reads the adapter init
    assert any("lora_B" in name and parameter.abs().sum() > 0 for name, parameter in tuned.named_parameters())


def test_meta_train_run_refuses_what_it_cannot_do(tiny_llama_dir, tmp_path):
    single = run_config(tiny_llama_dir, write_jsonl(tmp_path / "one.jsonl", offset_records(1, 4)), tmp_path / "r")
    with pytest.raises(ConfigError, match="data.mixture: meta-train learns across tasks"):
        meta_train_run(single, MetaConfig(meta_steps=1))
    preference = single.model_copy(update={"task": "dpo"})
    with pytest.raises(ConfigError, match="task: meta-train supports objectives .* dpo needs a reference model"):
        meta_train_run(preference, MetaConfig(meta_steps=1))


def cli_is_wired() -> bool:
    import tunesmith.cli
    from tunesmith.config import RunConfig

    return "meta" in RunConfig.model_fields and "tunesmith.training.meta" in tunesmith.cli.STAGE_COMMANDS


@pytest.mark.skipif(not cli_is_wired(), reason="needs `meta:` in RunConfig and the command in cli.STAGE_COMMANDS")
def test_meta_train_command(tiny_llama_dir, tmp_path, capsys):
    import yaml

    config = mixture_config(tiny_llama_dir, tmp_path, meta={
        "meta_steps": 2, "tasks_per_step": 2, "inner_steps": 2, "inner_batch_size": 4, "inner_lr": 1e-2,
        "held_out_tasks": ["offset_13"]})
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")

    code, out, err = run_cli(capsys, "meta-train", path)
    assert code == 0, err
    assert "offset_13" in out and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()

    code, _, err = run_cli(capsys, "meta-train", path, "--set", "meta.held_out_tasks=[nope]", "--overwrite")
    assert code == 2 and "meta.held_out_tasks: 'nope' is not a data.mixture task" in err
