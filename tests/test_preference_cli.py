"""`tunesmith score` on a tiny reward run and `tunesmith feedback` start-up errors, through the real entry point:
scores equal the library's, `-o` keeps the records, and every bad start is one line and exit code 2."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import run_cli, run_config, write_jsonl

from tunesmith.training import train

tunesmith = run_cli  # tunesmith(capsys, *args) -> (exit code, stdout, stderr)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


PAIRS = [
    {"prompt": f"What is {index} plus {index}?", "chosen": f"{index} plus {index} is {2 * index}.",
     "rejected": f"No idea, maybe {3 * index + 1}."}
    for index in range(8)
]


@pytest.fixture(scope="module")
def reward_run(tiny_llama_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reward")
    pairs = write_jsonl(folder / "pairs.jsonl", PAIRS)
    config = run_config(tiny_llama_dir, pairs, folder / "run", task="reward",
                        train={"max_steps": 8, "batch_size": 8, "lr": 2e-3, "scheduler": "constant"})
    return train(config).run_dir


@pytest.fixture(scope="module")
def sft_run(tiny_llama_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    chats = write_jsonl(folder / "chats.jsonl", [
        {"messages": [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["chosen"]}]}
        for pair in PAIRS
    ])
    return train(run_config(tiny_llama_dir, chats, folder / "run", train={"max_steps": 1})).run_dir


def test_score_prints_and_writes_the_reward_models_scores(reward_run, tmp_path, capsys):
    from tunesmith.models import load_run
    from tunesmith.objectives.reward import score_conversations

    records = []
    for pair in PAIRS[:3]:
        records.append({"prompt": pair["prompt"], "response": pair["chosen"], "side": "chosen"})
        records.append({"messages": [{"role": "user", "content": pair["prompt"]},
                                     {"role": "assistant", "content": pair["rejected"]}], "side": "rejected"})
    data = write_jsonl(tmp_path / "responses.jsonl", records)

    code, out, err = tunesmith(capsys, "score", reward_run, data)
    assert code == 0, err
    printed = [float(line) for line in out.split()]
    model, tokenizer = load_run(reward_run, device="cpu")
    expected = score_conversations(model, tokenizer, [
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if "prompt" in record else record["messages"] for record in records
    ])
    assert printed == pytest.approx(expected, abs=1e-4)
    assert all(chosen > rejected for chosen, rejected in zip(printed[::2], printed[1::2], strict=True)), printed

    written = tmp_path / "scored.jsonl"
    code, out, err = tunesmith(capsys, "score", reward_run, data, "-o", written)
    assert code == 0 and out == "", err
    scored = [json.loads(line) for line in written.read_text().splitlines()]
    assert [{key: value for key, value in row.items() if key != "score"} for row in scored] == records
    assert [row["score"] for row in scored] == pytest.approx(expected, abs=1e-5)


def test_rollout_scores_run_each_groups_prompt_once_and_equal_whole_conversations(reward_run, tmp_path):
    """grpo / ppo score G completions of each prompt with `objective.reward_run`: each group's common tokens run
    once and its endings continue from their KV cache; the scores equal scoring each conversation whole. One
    ending is another's prefix, one is empty, and the 3 prompts' groups of 3 split into batches of 2 groups."""
    from tunesmith.data.templates import render_chat
    from tunesmith.models import load_run
    from tunesmith.objectives.reward import score_conversations
    from tunesmith.objectives.rl import reward_model_scores

    model, tokenizer = load_run(reward_run, device="cpu")
    endings = [["4", "4 plus", "No idea at all, maybe 7."], ["It is 6.", "Six", "It is 6. Sure."], ["", "0", "zero"]]
    conversations = [[{"role": "user", "content": PAIRS[index]["prompt"]}, {"role": "assistant", "content": text}]
                     for index, texts in zip((2, 3, 0), endings, strict=True) for text in texts]
    positions: list[int] = []
    embeddings = model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, output: positions.append(args[0].numel()))
    try:
        grouped = reward_model_scores(model, tokenizer, conversations, group=3, batch_size=6)
    finally:
        hook.remove()
    whole = score_conversations(model, tokenizer, conversations)
    assert grouped == pytest.approx(whole, abs=1e-5)
    assert len(set(whole)) == len(whole)  # each conversation its own score
    tokens = sum(len(tokenizer(render_chat(messages, tokenizer), add_special_tokens=False)["input_ids"])
                 for messages in conversations)
    # 2 batches of 2 forwards (the prefixes, then the endings), padding included fewer positions than the whole
    assert len(positions) == 4 and sum(positions) < tokens, (positions, tokens)


def test_grpo_learns_from_a_reward_run(reward_run, tiny_llama_dir, tmp_path):
    """`objective.reward_run` through the loop: every rollout's completions are scored by the reward model, on
    the policy's device, and its scores are logged as their own reward part."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": pair["prompt"], "answer": "#### 0"} for pair in PAIRS])
    result = train(run_config(
        tiny_llama_dir, data, tmp_path / "run", task="grpo", method={"name": "lora", "r": 4}, data={"eval": str(data)},
        objective={"rewards": [], "reward_run": str(reward_run), "group_size": 3, "max_new_tokens": 6},
        train={"max_steps": 2, "batch_size": 2},
    ))
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(step["reward"] == step["reward_reward_model"] for step in steps if "loss" in step)
    assert result.summary["eval"]["reward_reward_model"] == result.summary["eval"]["reward"] != 0


def test_score_errors_are_one_line(reward_run, sft_run, tmp_path, capsys):
    good = json.dumps({"prompt": "hi", "response": "hello"})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(f"{good}\n{{oops\n")
    no_fields = write_jsonl(tmp_path / "fields.jsonl", [{"prompt": "hi"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")

    assert_one_line_error(*tunesmith(capsys, "score", sft_run, bad_json)[::2], "'sft' run", "task: reward")
    assert_one_line_error(*tunesmith(capsys, "score", reward_run, bad_json)[::2], f"{bad_json}:2:")
    assert_one_line_error(*tunesmith(capsys, "score", reward_run, no_fields)[::2], f"{no_fields}:1:", "response")
    assert_one_line_error(*tunesmith(capsys, "score", reward_run, empty)[::2], "no records")
    assert_one_line_error(*tunesmith(capsys, "score", reward_run, tmp_path / "missing.jsonl")[::2], "not found")
    assert_one_line_error(*tunesmith(capsys, "score", tmp_path, bad_json)[::2], "not a run directory")


def test_feedback_start_up_errors_are_one_line_and_come_before_generation(reward_run, sft_run, tmp_path, capsys,
                                                                          monkeypatch):
    import tunesmith.feedback.server as feedback_server

    def no_generation(*args, **kwargs):
        raise AssertionError("a start-up error must stop the command before any response is generated")

    monkeypatch.setattr(feedback_server, "load_or_generate_items", no_generation)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 2?\n")
    bad_jsonl = tmp_path / "prompts.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    missing_run = tmp_path / "no-such-run"

    def feedback(*args):
        return tunesmith(capsys, "feedback", *args)[::2]

    assert_one_line_error(*feedback(missing_run, "--prompts", prompts), "not a run directory")
    assert not missing_run.exists()  # nothing written for a run that is not there
    assert_one_line_error(*feedback(reward_run, "--prompts", prompts), "'reward' run", "does not generate")
    assert_one_line_error(*feedback(sft_run, "--prompts", tmp_path / "none.txt"), "none.txt: file not found")
    assert_one_line_error(*feedback(sft_run, "--prompts", blank), "no prompts")
    assert_one_line_error(*feedback(sft_run, "--prompts", bad_jsonl), f"{bad_jsonl}:2:")
    assert_one_line_error(*feedback(sft_run, "--prompts", prompts, "--out", tmp_path), "--out", "folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(*feedback(sft_run, "--prompts", prompts, "--port", port), "--port", str(port))
    assert not (sft_run / "feedback.jsonl").exists()


def test_feedback_usage_errors_are_one_line(sft_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 2?\n")
    assert_one_line_error(*tunesmith(capsys, "feedback", sft_run)[::2], "--prompts")
    assert_one_line_error(*tunesmith(capsys, "feedback", sft_run, "--prompts", prompts, "--port", "70000")[::2],
                          "--port")
