"""train.parallel_rows: a micro-batch's rows in parallel threads give the sequential step's gradient (to
rounding), the same one every run, and training with them resumes to the same weights."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import (
    assert_same_weights,
    chat_records,
    classification_records,
    preference_records,
    run_config,
    write_jsonl,
)

from tunesmith.config import ModelConfig
from tunesmith.data.collate import collate_padded
from tunesmith.errors import ConfigError
from tunesmith.models import load_model
from tunesmith.objectives import OBJECTIVES
from tunesmith.training import EXIT_INTERRUPTED, train
from tunesmith.training.loop import accumulate_gradients, run_accelerator
from tunesmith.training.parallel_rows import (
    RowThreads,
    active_dropout,
    balanced_parts,
    parallel_rows_choice,
    swapped_weights,
)


@pytest.fixture
def two_threads():
    """Two op-threads, whatever the machine's core count (the suite may run on one core)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_balanced_parts_split_by_length_and_keep_order():
    items = ["a", "b", "c", "d", "e"]
    parts = balanced_parts(items, [10, 60, 20, 30, 40], 2)
    assert parts == [["b", "c"], ["a", "d", "e"]]  # 60 + 20 against 10 + 30 + 40, each in its original order
    assert balanced_parts(items[:1], [5], 2) == [["a"]]  # never an empty part
    assert balanced_parts(items, [1] * 5, 1) == [items]


def test_rows_in_threads_give_the_sequential_gradient_every_run_the_same(tiny_llama_dir, two_threads):
    objective = OBJECTIVES.get("sft")
    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    examples = [
        {"input_ids": list(range(5, 5 + length)), "labels": [-100] * 2 + list(range(7, 5 + length))}
        for length in (4, 9, 17, 30, 6, 12, 25, 8)
    ]
    lengths = [len(example["input_ids"]) for example in examples]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    threads_seen: set[str] = set()
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: threads_seen.add(threading.current_thread().name)
    )

    def step(micro_batches: list[list[dict]], rows: RowThreads | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss, *_ = accumulate_gradients(
            model, objective, None, micro_batches, run_accelerator("no"), rows=rows, trainable=trainable
        )
        return loss, torch.cat([parameter.grad.flatten() for parameter in trainable])

    starts = (0, 4)
    loss, gradient = step([[collate_padded(examples[start : start + 4], 0)] for start in starts])
    split = [
        [collate_padded(part, 0) for part in balanced_parts(examples[start : start + 4], lengths[start : start + 4], 2)]
        for start in starts
    ]
    threads_seen.clear()
    with RowThreads(2, 2) as rows:
        parallel_loss, parallel_gradient = step(split, rows)
        _, again = step(split, rows)
    assert len(threads_seen) == 2  # the parts really ran in two threads
    assert torch.get_num_threads() == 2  # the op-thread count is back after each micro-batch
    torch.testing.assert_close(parallel_loss, loss)
    torch.testing.assert_close(parallel_gradient, gradient, rtol=1e-4, atol=1e-7)
    assert torch.equal(again, parallel_gradient)  # summed in part order: no race decides the rounding


def test_parts_share_out_the_op_threads():
    """Fewer parts than threads (a micro-batch of 2 rows on 4 cores): 2 op-threads each, and restored after."""
    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    def part_loss(part: torch.Tensor) -> tuple[torch.Tensor, None]:
        seen.append(torch.get_num_threads())
        return (weight * part).sum(), None

    saved = torch.get_num_threads()
    with RowThreads(2, 4) as rows:
        rows.backward(part_loss, [torch.ones(3), torch.full((3,), 2.0)], [weight], [None, None])
    assert seen == [2, 2] and torch.get_num_threads() == saved
    assert weight.grad.tolist() == [3.0, 3.0, 3.0]


def test_an_error_in_a_part_reaches_the_caller_after_every_part_finished():
    weight = torch.nn.Parameter(torch.ones(3))
    finished = []

    def part_loss(part: torch.Tensor) -> tuple[torch.Tensor, None]:
        if part.sum() > 5:
            raise ValueError("a bad part")
        finished.append(threading.current_thread().name)
        return (weight * part).sum(), None

    saved = torch.get_num_threads()
    with RowThreads(2, 2) as rows, pytest.raises(ValueError, match="a bad part"):
        rows.backward(part_loss, [torch.ones(3), torch.full((3,), 2.0)], [weight], [None, None])
    assert finished == [threading.main_thread().name] and torch.get_num_threads() == saved
    assert weight.grad.tolist() == [1.0, 1.0, 1.0]  # the finished part's gradient only: the step is abandoned


def choice(model, **changes) -> int:
    settings = {
        "device": torch.device("cpu"), "processes": 1, "compiled": False, "mixed_precision": "no",
        "rows_independent": True, "reference_per_batch": False, "batch_size": 4, "dropout": active_dropout(model),
        "trainable_share": 0.01, "swapped": swapped_weights(model),
    }
    return parallel_rows_choice(changes.pop("setting", None), **{**settings, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"device": torch.device("cuda")}, "for CPU runs"),
        ({"processes": 2}, "one process"),
        ({"compiled": True}, "train.compile"),
        ({"mixed_precision": "fp16"}, "fp16"),
        ({"rows_independent": False}, "per-record terms"),
        ({"reference_per_batch": True}, "train.cache_reference: true"),
        ({"batch_size": 1}, "train.batch_size is 1"),
    ],
)
def test_parallel_rows_says_why_it_cannot_apply(changes, reason, two_threads):
    model = torch.nn.Linear(2, 2)
    assert choice(model) == 2
    assert choice(model, **changes) == 1  # auto: sequential
    with pytest.raises(ConfigError, match=f"train.parallel_rows: .*{reason}"):
        choice(model, setting=True, **changes)


def test_parallel_rows_stays_off_for_dropout_and_for_full_fine_tuning_unless_asked(two_threads):
    with_dropout = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    with pytest.raises(ConfigError, match=r"dropout is active \(1 \(p=0.1\)\)"):
        choice(with_dropout, setting=True)
    no_dropout = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))
    no_dropout.config = type("Config", (), {})()
    no_dropout.config.attention_dropout = 0.1  # transformers' attention draws its own masks
    assert choice(no_dropout) == 1
    with pytest.raises(ConfigError, match="config attention_dropout=0.1"):
        choice(no_dropout, setting=True)
    plain = torch.nn.Linear(2, 2)
    assert choice(plain, trainable_share=1.0) == 1  # auto: each thread would hold a copy of every gradient
    assert choice(plain, trainable_share=1.0, setting=True) == 2
    assert choice(plain, setting=False) == 1


def test_lora_on_expert_weights_runs_its_rows_in_sequence(tiny_moe_dirs, tmp_path, two_threads):
    """peft's LoRA on a mixture of experts' 3-D weights (all-linear reaches them) registers W + BA on the experts
    module for each forward, in torch's one process-wide parametrization cache: two threads would run each
    other's merged weights and backpropagate through each other's graphs (seen: "Trying to backward through the
    graph a second time" in 2 of 3 runs). So auto runs such a model's rows in sequence and True says why not;
    LoRA on the linears alone still splits them. Training with auto repeats the sequential run exactly."""
    from tunesmith.methods import METHODS
    from tunesmith.methods.lora import LoraSettings

    folder = tiny_moe_dirs["qwen3_moe"]
    lora = METHODS.get("lora")
    on_experts = lora.apply(load_model(ModelConfig(name=str(folder)), "sft"), LoraSettings(r=4), "sft")
    assert swapped_weights(on_experts) == "base_model.model.model.layers.0.mlp.experts"
    assert choice(on_experts) == 1
    with pytest.raises(ConfigError, match="train.parallel_rows: .*experts swaps a LoRA-merged weight into the module"):
        choice(on_experts, setting=True)
    on_linears = lora.apply(load_model(ModelConfig(name=str(folder)), "sft"),
                            LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), "sft")
    assert swapped_weights(on_linears) is None and choice(on_linears) == 2

    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(24))
    adapters = {}
    for name, parallel_rows in [("auto", None), ("sequential", False)]:
        config = run_config(folder, chats, tmp_path / name, method={"name": "lora", "r": 4},
                            train={"max_steps": 3, "batch_size": 4, "parallel_rows": parallel_rows})
        result = train(config)
        assert result.exit_code == 0
        adapters[name] = result.run_dir / "adapter" / "adapter_model.safetensors"
    assert_same_weights(adapters["sequential"], adapters["auto"], rtol=0, atol=0)


def test_auto_keeps_the_gradient_copies_small(monkeypatch):
    """On many cores auto runs as many parts as keep the extra gradient copies within 10% of the model."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    plain = torch.nn.Linear(2, 2)
    assert choice(plain, trainable_share=0.035, batch_size=16) == 3  # 2 copies: 7% of the model
    assert choice(plain, trainable_share=0.001, batch_size=16) == 16
    assert choice(plain, trainable_share=0.11, batch_size=16) == 1
    assert choice(plain, trainable_share=0.11, batch_size=16, setting=True) == 16


@pytest.mark.parametrize("recompute", [False, True])
def test_packed_lora_training_with_parallel_rows_matches_and_resumes(tiny_llama_dir, tmp_path, two_threads, recompute):
    """Packed rows (per-thread record lengths in the attention), with and without recomputed layers."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(24))
    sections = {
        "data": {"packing": True, "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "train": {"max_steps": 6, "batch_size": 4, "save_every": 3, "max_grad_norm": None,
                  "gradient_checkpointing": recompute},
    }

    def config(name: str, parallel_rows: bool):
        return run_config(tiny_llama_dir, data, tmp_path / name, **{
            **sections, "train": {**sections["train"], "parallel_rows": parallel_rows}
        })

    sequential = train(config("sequential", False))
    parallel = train(config("parallel", True))
    assert (sequential.summary["row_threads"], parallel.summary["row_threads"]) == (1, 2)
    assert_same_weights(sequential.run_dir / "adapter" / "adapter_model.safetensors",
                        parallel.run_dir / "adapter" / "adapter_model.safetensors", rtol=1e-4, atol=1e-5)

    resumable = config("resumed", True)
    assert train(resumable, should_stop=lambda step: step == 3).exit_code == EXIT_INTERRUPTED
    resumed = train(resumable, resume=True)
    assert resumed.summary["steps"] == 6
    assert_same_weights(parallel.run_dir / "adapter" / "adapter_model.safetensors",
                        resumed.run_dir / "adapter" / "adapter_model.safetensors", rtol=0, atol=0)


def test_classification_with_parallel_rows_matches_sequential(tiny_llama_dir, tmp_path, two_threads):
    """A sequence classifier (the tiny Llama with a new head: no dropout) pools each row's last token: rows
    split into parts, each padded to its own longest row, pool the same tokens."""
    data = write_jsonl(tmp_path / "data.jsonl", classification_records(16))

    def run(name: str, parallel_rows: bool):
        return train(run_config(tiny_llama_dir, data, tmp_path / name, task="classify", method={"name": "lora", "r": 4},
                                train={"max_steps": 3, "batch_size": 4, "parallel_rows": parallel_rows}))

    sequential, parallel = run("sequential", False), run("parallel", True)
    assert parallel.summary["row_threads"] == 2
    assert_same_weights(sequential.run_dir / "adapter" / "adapter_model.safetensors",
                        parallel.run_dir / "adapter" / "adapter_model.safetensors", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("task", "train_settings"),
    [("simpo", {}), ("orpo", {}), ("reward", {}), ("dpo", {"cache_reference": True})],
)
def test_pairwise_tasks_with_parallel_rows_match_sequential(task, train_settings, tiny_llama_dir, tmp_path,
                                                            two_threads):
    """Pairs split into parts keep each pair whole (chosen and rejected rows collated together); dpo with its
    reference outputs stored on the records needs no reference model per batch."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(12))

    def run(name: str, parallel_rows: bool):
        return train(run_config(tiny_llama_dir, pairs, tmp_path / name, task=task, method={"name": "lora", "r": 4},
                                train={"max_steps": 3, "batch_size": 4, "parallel_rows": parallel_rows,
                                       **train_settings}))

    sequential, parallel = run("sequential", False), run("parallel", True)
    assert parallel.summary["row_threads"] == 2
    assert_same_weights(sequential.run_dir / "adapter" / "adapter_model.safetensors",
                        parallel.run_dir / "adapter" / "adapter_model.safetensors", rtol=1e-4, atol=1e-5)


def test_dpo_with_a_reference_model_per_batch_stays_sequential(tiny_llama_dir, tmp_path, two_threads):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8))
    config = run_config(tiny_llama_dir, pairs, tmp_path / "run", task="dpo", method={"name": "lora", "r": 4},
                        train={"max_steps": 1, "batch_size": 4})
    assert train(config).summary["row_threads"] == 1
    with pytest.raises(ConfigError, match="train.parallel_rows: a reference model runs per batch"):
        train(config.model_copy(update={"train": config.train.model_copy(update={"parallel_rows": True})}),
              overwrite=True)


def test_distillation_from_stored_teacher_outputs_with_parallel_rows_matches_sequential(
    tiny_llama_dir, teacher_dir, tmp_path, monkeypatch, two_threads
):
    """With train.cache_reference the teacher's top-k log-probs are stored on each record: the parts need no
    teacher, and the per-token terms split with the rows."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))

    def run(name: str, parallel_rows: bool):
        return train(run_config(
            tiny_llama_dir, chats, tmp_path / name, task="distill", method={"name": "lora", "r": 4},
            objective={"teacher": str(teacher_dir), "teacher_top_k": 8, "alpha": 0.5},
            train={"max_steps": 3, "batch_size": 4, "cache_reference": True, "parallel_rows": parallel_rows},
        ))

    sequential, parallel = run("sequential", False), run("parallel", True)
    assert parallel.summary["row_threads"] == 2
    assert_same_weights(sequential.run_dir / "adapter" / "adapter_model.safetensors",
                        parallel.run_dir / "adapter" / "adapter_model.safetensors", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_lora_dropout_with_parallel_rows_repeats_resumes_and_recomputes_its_masks(tiny_llama_dir, tmp_path,
                                                                                   two_threads, mixed_precision):
    """LoRA's dropout draws from each part's seed (training/keyed_dropout.py): two runs give the same weights bit
    for bit, so does a resumed one, and recomputed layers draw the forward's masks again in the backward (the same
    weights to rounding); the masks are real (dropout 0 trains to other weights). Under bf16 autocast the mask is
    applied to the bits and made again in the backward (`DropBits`)."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(24))

    def config(name: str, dropout: float = 0.2, **train_settings):
        return run_config(tiny_llama_dir, data, tmp_path / name, data={"packing": True, "max_length": 64},
                          method={"name": "lora", "r": 4, "dropout": dropout},
                          train={"max_steps": 6, "batch_size": 4, "save_every": 3, "max_grad_norm": None, "lr": 1e-2,
                                 "parallel_rows": True, "mixed_precision": mixed_precision, **train_settings})

    def adapter(result):
        return result.run_dir / "adapter" / "adapter_model.safetensors"

    first = train(config("first"))
    assert first.summary["row_threads"] == 2
    assert_same_weights(adapter(first), adapter(train(config("again"))), rtol=0, atol=0)
    resumable = config("resumed")
    assert train(resumable, should_stop=lambda step: step == 3).exit_code == EXIT_INTERRUPTED
    assert_same_weights(adapter(first), adapter(train(resumable, resume=True)), rtol=0, atol=0)
    recomputed = train(config("recomputed", gradient_checkpointing=True))
    assert_same_weights(adapter(first), adapter(recomputed), rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError):
        assert_same_weights(adapter(first), adapter(train(config("no-dropout", dropout=0.0))), rtol=1e-3, atol=1e-4)
