"""`tunesmith distill-data` (sequence-level distillation, Kim & Rush 2016) on the tiny Llama: one sft record
per prompt, each the teacher's own greedy answer, a one-line error for a bad prompts file, and `tunesmith
train` learns from the output."""

from __future__ import annotations

import json
import re

import pytest
import typer
from helpers import run_cli, run_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunesmith.cli
from tunesmith.distill_data import register
from tunesmith.inference import stop_token_ids
from tunesmith.training import train

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "What is 7 plus 5?",
    "Weng earns $12 an hour for babysitting. How much did she earn for 50 minutes?",
    "Betty has half of the money she needs for a wallet.",
    "James writes a 3-page letter to 2 different friends twice a week.",
]


@pytest.fixture
def cli(monkeypatch):
    """The `tunesmith` entry point (its one-line error handling included) with the distill-data command."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def commands() -> None:
        """tunesmith with the distill-data stage command."""

    register(app)
    monkeypatch.setattr(tunesmith.cli, "app", app)
    return run_cli


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with an untied, random output head: the tied one greedily repeats the prompt's last
    token (a newline, stripped to nothing), this one answers with varied tokens."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("answering_teacher")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"question": question, "id": index}
                                                    for index, question in enumerate(QUESTIONS)])


def _greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """The teacher's own greedy answer with plain transformers: one prompt, no padding, no batching."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_one_record_per_prompt_each_the_teachers_greedy_answer(cli, capsys, teacher_dir, prompts_file, tmp_path):
    output = tmp_path / "out" / "answers.jsonl"
    code, out, err = cli(capsys, "distill-data", teacher_dir, "--prompts", prompts_file, "--output", output,
                         "--max-new-tokens", 12, "--batch-size", 2)
    assert code == 0, err
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(QUESTIONS)
    assert f"wrote {len(QUESTIONS)} records" in out
    assert not list(output.parent.glob(".*.tmp"))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    for line, (question, record) in enumerate(zip(QUESTIONS, records, strict=True), start=1):
        assert record["prompt"] == question
        assert record["source"] == f"{prompts_file}:{line}"
        assert record["teacher"] == str(teacher_dir)
        assert record["response"] == _greedy_answer(model, tokenizer, question, 12)
        assert record["response"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"prompts.jsonl: file not found"),
        ('{"question": "fine"}\n{"question": \n', r"prompts.jsonl:2: not valid JSON"),
        ('{"question": "fine"}\n\n{"text": "no prompt"}\n', r"prompts.jsonl:3: no prompt field \(prompt or question"),
        ('{"prompt": ""}\n', r"prompts.jsonl:1: field 'prompt' must be a non-empty string"),
    ],
    ids=["missing", "bad-json", "no-prompt-field", "empty-prompt"],
)
def test_bad_prompts_file_is_one_line_and_exit_2(cli, capsys, tiny_llama_dir, tmp_path, content, expected):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content, encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    code, _, err = cli(capsys, "distill-data", tiny_llama_dir, "--prompts", prompts, "--output", output)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and re.search(expected, err)
    assert not output.exists()


def test_a_teacher_that_cannot_be_loaded_names_the_argument(cli, capsys, prompts_file, tmp_path):
    code, _, err = cli(capsys, "distill-data", tmp_path / "no_such_model", "--prompts", prompts_file,
                       "--output", tmp_path / "answers.jsonl")
    assert code == 2
    assert err.startswith("error: TEACHER: ") and len(err.strip().splitlines()) == 1


def test_training_on_the_teachers_answers(cli, capsys, tiny_llama_dir, teacher_dir, prompts_file, tmp_path):
    output = tmp_path / "answers.jsonl"
    code, _, err = cli(capsys, "distill-data", teacher_dir, "--prompts", prompts_file, "--output", output,
                       "--max-new-tokens", 10, "--prompt-field", "question")
    assert code == 0, err
    config = run_config(tiny_llama_dir, output, tmp_path / "run", train={"max_steps": 6, "lr": 3e-3,
                                                                          "eval_before": True},
                        data={"eval": str(output)})
    result = train(config)
    assert result.summary["data"]["used_train"] == len(QUESTIONS)
    assert result.summary["data"]["rejected"] == 0
    assert result.summary["eval"]["eval_loss"] < result.summary["eval_before"]["eval_loss"]


def test_empty_answers_go_to_the_rejects_file(cli, capsys, tiny_llama_dir, prompts_file, tmp_path):
    """The tied tiny Llama answers every prompt with newlines only: nothing to train on, all accounted for."""
    output = tmp_path / "answers.jsonl"
    code, out, err = cli(capsys, "distill-data", tiny_llama_dir, "--prompts", prompts_file, "--output", output,
                         "--max-new-tokens", 4, "--limit", 3)
    assert code == 0, err
    assert output.read_text(encoding="utf-8") == ""
    rejects = [json.loads(line) for line in (tmp_path / "answers.rejects.jsonl").read_text().splitlines()]
    assert [reject["source"] for reject in rejects] == [f"{prompts_file}:{line}" for line in (1, 2, 3)]
    assert {reject["reason"] for reject in rejects} == {"the teacher's answer is empty"}
    assert "wrote 0 records" in out and "3 empty answers" in out


def test_the_sequence_level_example_trains_on_distill_data_output(monkeypatch, tmp_path):
    """examples/distill-sequence-*.yaml reads what `tunesmith distill-data` writes: with that file in place
    (here a stand-in with the same fields), the config validates as an sft run on {prompt, response} records."""
    from pathlib import Path

    from tunesmith.config import load_config
    from tunesmith.data.formats import detect_format

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    record = {"prompt": "q", "response": "a", "source": "prompts.jsonl:1", "teacher": "t"}
    answers = write_jsonl(tmp_path / "answers.jsonl", [record])
    examples = sorted((root / "examples").glob("distill-sequence-*.yaml"))
    assert examples
    for path in examples:
        config = load_config(path, [f"data.train={answers}"])
        assert config.task == "sft" and str(config.output_dir).startswith("runs/")
        assert "tunesmith distill-data" in path.read_text(encoding="utf-8")
    assert detect_format(record) == "instruction"
