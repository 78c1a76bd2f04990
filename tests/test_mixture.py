"""Multi-task data (`data.mixture`): sampling shares, one task per micro-batch, per-task logging."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers import chat_records, run_config, write_jsonl

from tunesmith.data.collate import task_batch_order
from tunesmith.data.mixture import draw_counts, draw_examples, mixture_probabilities
from tunesmith.errors import ConfigError
from tunesmith.training.distributed import ProcessGroup
from tunesmith.training.loop import micro_batch_stream, train


def instruction_records(count: int) -> list[dict]:
    return [{"prompt": f"Spell {index} backwards.", "response": f"{str(index)[::-1]} reversed"}
            for index in range(count)]


def test_probabilities_follow_weight_to_the_one_over_temperature():
    assert mixture_probabilities([300, 100], 1.0) == pytest.approx([0.75, 0.25])
    # T = 2: p ~ sqrt(n), flatter than by size; T -> infinity approaches uniform.
    assert mixture_probabilities([400, 100], 2.0) == pytest.approx([2 / 3, 1 / 3])
    assert mixture_probabilities([1000, 1], 1000.0) == pytest.approx([0.5, 0.5], abs=0.01)


def test_counts_sum_to_the_epoch_and_oversampling_repeats_every_record_first():
    counts = draw_counts([0.5, 0.3, 0.2], 7)
    assert sum(counts) == 7 and counts == [4, 2, 1]
    examples = [{"id": index} for index in range(3)]
    drawn = draw_examples(examples, 7, torch.Generator().manual_seed(0))
    assert len(drawn) == 7
    assert all(count >= 2 for count in Counter(example["id"] for example in drawn).values())


def test_task_batch_order_gives_one_task_per_batch_and_every_item_once():
    tasks = ["a"] * 9 + ["b"] * 5 + ["c"] * 2
    lengths = list(range(len(tasks)))
    order = task_batch_order(lengths, tasks, batch_size=4, seed=1, epoch=0, group_by_length=True)
    assert all(len({tasks[index] for index in batch}) == 1 for batch in order)
    assert sorted(index for batch in order for index in batch) == list(range(len(tasks)))
    assert order != task_batch_order(lengths, tasks, batch_size=4, seed=1, epoch=1, group_by_length=True)
    assert order == task_batch_order(lengths, tasks, batch_size=4, seed=1, epoch=0, group_by_length=True)


def test_every_global_batch_is_trained_and_an_empty_share_runs_a_stand_in(tiny_llama_dir, tmp_path):
    # 3 processes x batch 2: task a's batches hold 6 and 3 items, b's 5, c's 2 (one process gets none).
    tasks = ["a"] * 9 + ["b"] * 5 + ["c"] * 2
    lengths = [10 + index for index in range(len(tasks))]
    config = run_config(tiny_llama_dir, write_jsonl(tmp_path / "chats.jsonl", chat_records(2)), tmp_path / "run",
                        data={"group_by_length": True}, train={"batch_size": 2, "seed": 1})
    groups = [ProcessGroup(SimpleNamespace(process_index=rank, num_processes=3, is_main_process=rank == 0))
              for rank in range(3)]
    per_epoch = 4
    streams = [micro_batch_stream(lengths, config, 0, group, tasks) for group in groups]
    shares = [[next(stream) for _ in range(3 * per_epoch)] for stream in streams]
    for epoch in range(2):
        epoch_shares = [share for rank_shares in shares for share in rank_shares[epoch * per_epoch:][:per_epoch]]
        trained = [index for share in epoch_shares if not share.stand_in for index in share.indices]
        assert sorted(trained) == list(range(len(tasks)))  # every item once an epoch, none skipped
        stand_ins = [share for share in epoch_shares if share.stand_in]
        assert len(stand_ins) == 1 and [tasks[index] for index in stand_ins[0].indices] == ["c"]
    # Every process advances one share per global batch, so a resumed stream continues where it stopped.
    for start in (1, per_epoch, per_epoch + 2):
        resumed = micro_batch_stream(lengths, config, start, groups[2], tasks)
        assert [next(resumed) for _ in range(3)] == shares[2][start:start + 3]


def test_mixture_trains_with_per_task_losses_and_eval_metrics(tiny_llama_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    spelling = write_jsonl(tmp_path / "spell.jsonl", instruction_records(36))
    config = run_config(
        tiny_llama_dir, chats, tmp_path / "run",
        data={"train": None, "eval_split": 0.25, "mixture": [
            {"name": "chat", "train": str(chats), "weight": 1},
            {"name": "spell", "train": str(spelling), "weight": 1},
        ]},
        train={"max_steps": 6, "batch_size": 2, "grad_accum": 2},
    )
    result = train(config)
    stats = result.summary["data"]
    # Equal weights: each task gets half of the epoch whatever its size (the chats are oversampled).
    assert stats["tasks"]["chat"]["examples_per_epoch"] == stats["tasks"]["spell"]["examples_per_epoch"]
    assert stats["read"] == stats["used_train"] + stats["used_eval"] + stats["rejected"]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert any("chat/loss" in row for row in steps) and any("spell/loss" in row for row in steps)
    for row in steps:  # the step loss is the token-weighted mean of its tasks' losses
        task_losses = [row[key] for key in row if key.endswith("/loss")]
        assert min(task_losses) - 1e-5 <= row["loss"] <= max(task_losses) + 1e-5
    evaluation = result.summary["eval"]
    assert {"eval_loss", "chat/eval_loss", "spell/eval_loss"} <= set(evaluation)
    assert evaluation["chat/eval_loss"] != evaluation["spell/eval_loss"]


def test_mixture_config_errors_name_the_key(tiny_llama_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    with pytest.raises(ConfigError, match="data: give either `train`"):
        run_config(tiny_llama_dir, chats, tmp_path / "run",
                   data={"mixture": [{"name": "a", "train": str(chats)}]})
    with pytest.raises(ConfigError, match="task names must be unique"):
        run_config(tiny_llama_dir, chats, tmp_path / "run", data={"train": None, "mixture": [
            {"name": "a", "train": str(chats)}, {"name": "a", "train": str(chats)}]})
    with pytest.raises(ConfigError, match=r"data.mixture.0.train: .*file not found"):
        run_config(tiny_llama_dir, chats, tmp_path / "run", data={"train": None, "mixture": [
            {"name": "a", "train": str(tmp_path / "missing.jsonl")}]})


def random_records(count: int, vocab: int, seed: int, task: str, labelled: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(count):
        input_ids = torch.randint(5, vocab, (4 + index % 5,), generator=generator).tolist()
        extra = {"label": index % 3} if labelled else {"labels": [-100] * 2 + input_ids[2:]}
        records.append({"input_ids": input_ids, "task": task, **extra})
    return records


def evaluation_setup(task: str):
    """A tiny model for `task` (sft or classify), 12 eval records of two tasks in mixed order, the objective."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from tunesmith.objectives import OBJECTIVES

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    labelled = task == "classify"
    model = (LlamaForSequenceClassification if labelled else LlamaForCausalLM)(config).eval()
    records = random_records(7, 50, 1, "chat", labelled) + random_records(5, 50, 2, "spell", labelled)
    return model, [records[index] for index in torch.randperm(len(records)).tolist()], OBJECTIVES.get(task)


def counting_rows(model) -> list[int]:
    """The batch sizes the model's embeddings see from now on."""
    rows: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: rows.append(len(args[0])))
    return rows


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_mixture_evaluation_runs_each_record_once_and_equals_each_set_alone(task):
    """A data mixture's metrics, overall and per task, come from ONE pass over the eval records (it ran them twice:
    the whole set, then each task's) and equal evaluating each set on its own, f1_macro included (a metric that
    is not a mean of batch values)."""
    from tunesmith.training.loop import evaluate

    model, records, objective = evaluation_setup(task)
    settings = objective.settings()
    rows = counting_rows(model)
    metrics = evaluate(model, objective, settings, records, 0, 4, "cpu", task_names=["chat", "spell"])
    assert sum(rows) == len(records)
    whole = evaluate(model, objective, settings, records, 0, 4, "cpu")
    assert set(whole) < set(metrics)
    for name, value in whole.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6), name
    for name in ("chat", "spell"):
        alone = evaluate(model, objective, settings, [r for r in records if r["task"] == name], 0, 4, "cpu")
        for key, value in alone.items():
            assert metrics[f"{name}/{key}"] == pytest.approx(value, rel=1e-6), f"{name}/{key}"
    if task == "classify":  # macro F1 is not a mean of the tasks' F1: the predictions are pooled
        assert metrics["f1_macro"] != pytest.approx((metrics["chat/f1_macro"] + metrics["spell/f1_macro"]) / 2)


class OneOfTwo:
    """A stand-in ProcessGroup of 2 processes, as seen by `rank`: `gather` pairs this process's value with
    `other` (the other process's; None: empty totals for each task)."""

    def __init__(self, rank: int, other: dict | None = None):
        self.rank, self.world, self.other, self.sent = rank, 2, other, None

    def gather(self, value: dict) -> list[dict]:
        self.sent = value
        other = self.other if self.other is not None else {task: {} for task in value}
        return [value, other] if self.rank == 0 else [other, value]


@pytest.mark.parametrize("task", ["sft", "classify"])
@pytest.mark.parametrize("sharded", [False, True])
def test_processes_split_the_evaluation_and_add_their_totals(task, sharded):
    """With 2 processes each evaluates every other batch (it evaluated all of them), and the totals added across
    them give one process's metrics. Sharded, whose forwards are collective, the process with a batch fewer runs
    one more whose totals it drops: 12 records at batch 4, one task: 3 batches, 2 + 1 (+ 1)."""
    from tunesmith.training.loop import evaluate

    model, records, objective = evaluation_setup(task)
    settings = objective.settings()
    names = [] if sharded else ["chat", "spell"]  # a mixture: each task's batches split between the processes
    one_process = evaluate(model, objective, settings, records, 0, 4, "cpu", task_names=names)
    rows = counting_rows(model)
    first = OneOfTwo(0)
    evaluate(model, objective, settings, records, 0, 4, "cpu", task_names=names, group=first, sharded=sharded)
    first_rows, rows[:] = sum(rows), []
    second = evaluate(model, objective, settings, records, 0, 4, "cpu", task_names=names,
                      group=OneOfTwo(1, first.sent), sharded=sharded)
    if sharded:
        assert (first_rows, sum(rows)) == (8, 4 + 4)  # the second process's spare batch: the first one again
    else:
        assert first_rows + sum(rows) == len(records) and 0 < sum(rows) < len(records)
    assert set(second) == set(one_process)
    for name, value in one_process.items():
        assert second[name] == pytest.approx(value, rel=1e-6), name
