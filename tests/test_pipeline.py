"""`tunesmith train` with `curate:` and `eval:` sections runs the whole loop: curate -> train -> eval."""

from __future__ import annotations

import json

from helpers import chat_records, run_config, write_jsonl

from tunesmith.pipeline import curate_once, curated_dir, run


def test_curate_then_train_then_evaluate(tiny_llama_dir, tmp_path):
    records = chat_records(8)
    records += records[:3]  # exact duplicates the curate step must remove
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"{i} plus {i} is {2 * i}."} for i in range(6)])
    config = run_config(
        tiny_llama_dir, data, tmp_path / "run",
        train={"max_steps": 2},
        curate={"steps": ["exact_dedup"]},
        eval={"tasks": [{"name": "ppl", "type": "perplexity", "data": str(texts), "role": "target"}]},
    )
    result = run(config)
    assert result.exit_code == 0
    curated = curated_dir(config)
    assert len((curated / "kept.jsonl").read_text().splitlines()) == 8
    assert len((curated / "rejected.jsonl").read_text().splitlines()) == 3
    assert result.summary["data"]["read"] == 8
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert "ppl" in json.dumps(results)
    assert (tmp_path / "run" / "eval" / "report.html").exists()


def test_the_processes_of_a_launch_curate_once(tiny_llama_dir, tmp_path, monkeypatch):
    """Under torchrun every process runs the pipeline: one curates, the others read its files (they all wrote
    kept.jsonl at once). A later launch curates again, as does one whose data changed; so does every run outside
    a launch."""
    from rich.console import Console

    import tunesmith.curate

    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(6))
    config = run_config(tiny_llama_dir, data, tmp_path / "run", curate={"steps": ["exact_dedup"]})
    calls = []
    real_curate = tunesmith.curate.curate
    monkeypatch.setattr(tunesmith.curate, "curate", lambda *args: calls.append(args) or real_curate(*args))
    console = Console(quiet=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for _ in range(2):  # the launch's two processes
        assert curate_once(config, console) == curated_dir(config)
    assert len(calls) == 1 and len((curated_dir(config) / "kept.jsonl").read_text().splitlines()) == 6
    monkeypatch.setenv("MASTER_PORT", "29501")  # the next launch
    curate_once(config, console)
    assert len(calls) == 2
    write_jsonl(data, chat_records(5))  # the same launch address, other data
    curate_once(config, console)
    assert len(calls) == 3 and len((curated_dir(config) / "kept.jsonl").read_text().splitlines()) == 5
    monkeypatch.delenv("WORLD_SIZE")
    curate_once(config, console)
    curate_once(config, console)
    assert len(calls) == 5
