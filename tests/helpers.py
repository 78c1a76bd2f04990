"""Small builders shared by the tests: data files and run configs on the tiny models."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunesmith.config import build_config, merge

MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)


class LogitRows(TorchDispatchMode):
    """The most positions any matmul with a vocabulary-wide output (logits) computed at once, under this mode."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS and out.shape[-1] == self.vocab:
            self.most = max(self.most, out.numel() // self.vocab)
        return out


def prompt_examples(tokenizer, questions: list[str], answers: list[str | None] | None = None,
                    task: str = "grpo") -> list[dict]:
    """One tokenised prompt example (online RL: a user turn, no response) per question, with its reference answer."""
    from tunesmith.data.preference import tokenize_preference_record

    answers = answers or [None] * len(questions)
    return [tokenize_preference_record({"prompt": [{"role": "user", "content": question}], "answer": answer},
                                       task, tokenizer, 64)[0]
            for question, answer in zip(questions, answers, strict=True)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def chat_records(count: int) -> list[dict]:
    """Short, distinct multi-turn chats: easy to memorise, cheap to train."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {index} plus {index}?"},
                {"role": "assistant", "content": f"{index} plus {index} is {2 * index}."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": f"You are welcome, number {index}."},
            ]
        }
        for index in range(count)
    ]


def preference_records(count: int) -> list[dict]:
    return [
        {"prompt": f"What is {index} plus {index}?", "chosen": f"{index} plus {index} is {2 * index}.",
         "rejected": f"No idea, maybe {3 * index + 1}."}
        for index in range(count)
    ]


def classification_records(count: int) -> list[dict]:
    words = {"positive": "great lovely wonderful", "negative": "awful boring terrible"}
    return [
        {"text": f"this film was {words[label].split()[index % 3]} number {index}", "label": label}
        for index in range(count)
        for label in ("positive", "negative")
    ]


def run_config(model_dir: Path, train_file: Path, output_dir: Path, **sections: Any):
    """A RunConfig for a tiny model; keyword sections (data=..., train=..., method=...) override defaults."""
    base = {
        "model": {"name": str(model_dir)},
        # No prepared-data cache: tests that patch the data layer must see it run (test_data_cache.py tests the cache).
        "data": {"train": str(train_file), "eval_split": 0.0, "max_length": 128, "cache": False},
        "task": "sft",
        "method": {"name": "full"},
        "train": {"batch_size": 4, "max_steps": 4, "lr": 1e-3, "warmup": 0, "eval_before": False, "seed": 0},
        "output_dir": str(output_dir),
    }
    return build_config(merge(base, sections))


def train_online_rl(model_dir: Path, tmp_path: Path, task: str, rewards: list[str]):
    """Two LoRA steps of an online RL task (grpo, ppo) through the loop on four GSM8K-style prompts,
    evaluated on the same prompts; returns the TrainResult."""
    from tunesmith.training import train

    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"question": f"What is {index} plus {index}?", "answer": f"#### {2 * index}"}
                        for index in range(4)])
    return train(run_config(
        model_dir, data, tmp_path / "run", task=task, method={"name": "lora", "r": 4}, data={"eval": str(data)},
        objective={"rewards": rewards, "group_size": 2, "max_new_tokens": 6}, train={"max_steps": 2, "batch_size": 2},
    ))


def assert_same_weights(expected_file: Path, actual_file: Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every tensor of the safetensors file `expected_file` is in `actual_file`, equal to tolerance (a folder
    stands for all its safetensors files: a model saved in several)."""
    import torch
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        return {name: tensor for file in files for name, tensor in load_file(file).items()}

    expected, actual = tensors(expected_file), tensors(actual_file)
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=rtol, atol=atol, msg=name)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the real `tunesmith` entry point in-process (seconds instead of a subprocess): (code, out, err)."""
    import sys

    import tunesmith.cli as tunesmith_cli

    old_argv = sys.argv
    sys.argv = ["tunesmith", *map(str, args)]
    try:
        tunesmith_cli.main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record_kept_casts(monkeypatch) -> list[list[torch.Tensor]]:
    """Each training run (training/loop.py `train`) from now on appends the weight casts it kept, as its
    `cached_weight_casts` block ends (training/weight_casts.py)."""
    import tunesmith.training.loop as loop
    from tunesmith.training import weight_casts

    kept: list[list[torch.Tensor]] = []

    @contextmanager
    def recorded():
        with weight_casts.cached_weight_casts():
            yield
            kept.append([cast for *_, cast in weight_casts._casts.values()])

    monkeypatch.setattr(loop, "cached_weight_casts", recorded)
    return kept
