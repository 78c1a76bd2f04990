"""`--engine ray`: the same steps on Ray Data (a local Ray, 1 CPU) give the local engine's kept.jsonl
and rejected.jsonl line for line, global dedup included; without Ray, a one-line install hint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tunesmith.curate import CurateConfig, curate
from tunesmith.curate.ray_engine import RAY_MISSING, plan_stages
from tunesmith.errors import UserError

# Record-by-record steps, the global dedup stage between them, and record-by-record steps after it.
STEPS = ["normalise", "schema", {"name": "length", "min_words": 3}, {"name": "pii", "action": "redact"},
         "exact_dedup", {"name": "near_dedup", "threshold": 0.6}, "standardise",
         {"name": "gopher_repetition", "top_n_grams": {}}]


def messy_records() -> list[str]:
    records = []
    for index in range(120):
        # Groups of three: a story, an exact copy of it, and a near copy (one word more).
        group = index // 3
        topic = ["the harbour", "a quiet village", "the old railway", "mountain weather"][group % 4]
        people = "the people" if index % 3 == 2 else "people"
        text = f"Story {group} tells about {topic} and what {people} there did in the year {1900 + group}."
        records.append(json.dumps({"prompt": f"Tell me story {group}.", "response": text}))
    records[5] = json.dumps({"prompt": "Contact?", "response": "Mail jane.doe@example.com or call +1 415 555 0199."})
    records[9] = json.dumps({"prompt": "Empty", "response": "   "})
    records[17] = "{broken json"
    records[30] = json.dumps({"prompt": "Hi", "response": "Ok."})
    records[44] = json.dumps({"prompt": "Repeat", "response": "same line\nsame line\nsame line\nsame line\nother"})
    return records


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[data]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_equals_local_engine(tmp_path, local_ray):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    records = messy_records()
    first.write_text("\n".join(records[:70]) + "\n", encoding="utf-8")
    second.write_text("\n".join(records[70:]) + "\n", encoding="utf-8")
    outputs = {}
    for engine in ("local", "ray"):
        config = CurateConfig(steps=STEPS, engine=engine, chunk_size=16, on_error="skip")
        result = curate(config, [first, second], tmp_path / engine)
        outputs[engine] = result
    for name in ("kept.jsonl", "rejected.jsonl"):
        local, ray = ((tmp_path / engine / name).read_text(encoding="utf-8") for engine in ("local", "ray"))
        assert local == ray, name
    local, ray = outputs["local"].report, outputs["ray"].report
    assert [{key: row[key] for key in ("step", "in", "out")} for row in local["funnel"]] == \
        [{key: row[key] for key in ("step", "in", "out")} for row in ray["funnel"]]
    assert local["reasons"] == ray["reasons"] and local["counts"] == ray["counts"]
    assert local["steps"] == ray["steps"]  # dedup cluster summaries from the global stage
    steps = {row["step"]: row for row in ray["funnel"]}
    assert steps["read"]["removed"] == 1 and steps["exact_dedup"]["removed"] > 20
    assert steps["near_dedup"]["removed"] > 20 and steps["gopher_repetition"]["removed"] == 1
    assert ray["records_in"] == 120 == ray["kept"] + ray["rejected"]


def test_stages_group_record_by_record_steps():
    config = CurateConfig(steps=STEPS)
    assert plan_stages(config) == [(True, [0, 1, 2, 3]), (False, [4]), (False, [5]), (True, [6, 7])]


def test_engine_ray_without_ray_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "hello there"}) + "\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(UserError) as raised:
        curate(CurateConfig(steps=["normalise"], engine="ray"), [path], tmp_path / "out")
    assert str(raised.value) == RAY_MISSING and "pip install" in RAY_MISSING


def test_cli_engine_ray_without_ray_is_one_line(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from tunesmith.curate.cli import register

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "hello there"}) + "\n")
    config = tmp_path / "curate.yaml"
    config.write_text("steps: [normalise]\n")
    monkeypatch.setitem(sys.modules, "ray", None)
    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)
    result = CliRunner().invoke(app, ["curate", str(path), "--config", str(config), "--output", str(tmp_path / "out"),
                                      "--engine", "ray", "--ray-address", "auto"])
    # tunesmith's entry point prints a UserError as `error: <message>` and exits with its code, 2.
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    assert str(result.exception) == RAY_MISSING


def test_ray_address_reaches_the_config(tmp_path):
    from tunesmith.curate import load_curate_config

    config = tmp_path / "curate.yaml"
    config.write_text("steps: [normalise]\nengine: ray\n")
    assert load_curate_config(config, ray_address="ray://head:10001").ray_address == "ray://head:10001"
    assert load_curate_config(Path(config)).ray_address is None
