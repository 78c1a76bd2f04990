"""tunesmith curate end to end: the CLI on small synthetic files and slices of the real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.curate import CurateConfig, curate, load_curate_config
from tunesmith.curate.minhash import MinHasher, jaccard, optimal_bands, shingle_hashes, shingles
from tunesmith.curate.pii import find_pii
from tunesmith.errors import ConfigError, DataError


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # The curate command is registered by tunesmith.cli once STAGE_COMMANDS names it; until then the
    # same Typer command is driven through a private app, with the CLI's error handling.
    script = (
        "import sys, typer, click\n"
        "from tunesmith.curate.cli import register\n"
        "from tunesmith.errors import UserError\n"
        "app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)\n"
        "register(app)\n"
        "@app.callback()\n"
        "def main(): pass\n"
        "try:\n"
        "    app(standalone_mode=False)\n"
        "except UserError as error:\n"
        "    print(f'error: {error}', file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", script, "curate", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def messy_inputs(tmp_path) -> list[Path]:
    first = _write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
        {"prompt": "What is the capital of France ?", "response": "Paris is the capital of  France."},  # exact dup
        {"prompt": "Contact", "response": "Write to jane.doe@example.com or call +1 415 555 0199."},
        {"prompt": "Empty", "response": "   "},
        "{not json",
        {"prompt": "<b>Caf\u00c3\u00a9</b> menu", "response": "The caf\u00c3\u00a9 serves coffee and cake every day."},
    ])
    second = _write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "what is the capital of france", "response": "paris is the capital of france"},  # dup across files
        {"prompt": "Name a prime number between ten and twenty please",
         "response": "Thirteen is a prime number between ten and twenty, and so are eleven, seventeen and nineteen."},
        {"prompt": "Name a prime number between ten and twenty please",
         "response": "Thirteen is a prime number between ten and twenty, and so are eleven, seventeen and 19."},
    ])
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "x", "response": "caf\xe9"}\n')
    return [first, second, tmp_path / "bad.jsonl"]


def _config(tmp_path: Path, steps: list, **extra) -> Path:
    path = tmp_path / f"curate-{len(list(tmp_path.glob('curate-*.yaml')))}.yaml"  # a new file per call
    path.write_text(yaml.safe_dump({"steps": steps, **extra}), encoding="utf-8")
    return path


def test_cli_keeps_every_record_accounted_for(tmp_path, messy_inputs):
    config = _config(tmp_path, ["normalise", "schema", "exact_dedup", {"name": "near_dedup", "threshold": 0.6},
                                {"name": "pii", "action": "redact"}], on_error="skip", chunk_size=2)
    out = tmp_path / "out"
    result = _run_cli(*map(str, messy_inputs), "--config", str(config), "--output", str(out))
    assert result.returncode == 0, result.stderr
    kept, rejected = _lines(out / "kept.jsonl"), _lines(out / "rejected.jsonl")
    report = json.loads((out / "report.json").read_text())
    assert report["records_in"] == 10 == len(kept) + len(rejected)
    sources = sorted(item["source"] for item in kept + rejected)
    assert len(set(sources)) == 10  # every record, once, by its file:line
    by_source = {item["source"].rsplit("/", 1)[-1]: item for item in kept + rejected}
    assert by_source["a.jsonl:5"]["step"] == "read" and "not valid JSON" in by_source["a.jsonl:5"]["reason"]
    assert by_source["bad.jsonl:1"]["step"] == "read" and "UTF-8" in by_source["bad.jsonl:1"]["reason"]
    assert by_source["a.jsonl:4"]["step"] == "schema"  # whitespace-only response
    assert by_source["a.jsonl:2"]["step"] == "exact_dedup"
    assert by_source["a.jsonl:2"]["duplicate_of"].endswith("a.jsonl:1")
    assert by_source["b.jsonl:1"]["duplicate_of"].endswith("a.jsonl:1")  # across files, earliest kept
    near = by_source["b.jsonl:3"]
    assert near["step"] == "near_dedup" and near["duplicate_of"].endswith("b.jsonl:2") and near["similarity"] >= 0.6
    assert near["record"]["response"].endswith("19.")  # the whole record is in the rejects file
    cafe = by_source["a.jsonl:6"]
    assert cafe["prompt"] == "Café menu" and "serves" in cafe["response"]  # mojibake fixed, HTML gone
    contact = by_source["a.jsonl:3"]["response"]
    assert "[EMAIL]" in contact and "[PHONE]" in contact and "example.com" not in contact
    steps = ["read", "normalise", "schema", "exact_dedup", "near_dedup", "pii"]
    assert [row["step"] for row in report["funnel"]] == steps


def _error_from_command(*args: str) -> str:
    """The UserError message the CLI would print as `error: ...` (exit 2), run in-process for speed."""
    import typer
    from typer.testing import CliRunner

    from tunesmith.curate.cli import register
    from tunesmith.errors import UserError

    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)
    result = CliRunner().invoke(app, ["curate", *args])
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_errors(tmp_path, messy_inputs):
    out = str(tmp_path / "out")
    plain = str(_config(tmp_path, ["normalise"]))
    assert "a.jsonl:5: not valid JSON" in _error_from_command(str(messy_inputs[0]), "--config", plain, "--output", out)
    typo = str(_config(tmp_path, ["exact_dedupe"]))
    assert "did you mean 'exact_dedup'" in _error_from_command(str(messy_inputs[0]), "--config", typo, "--output", out)
    key = str(_config(tmp_path, [{"name": "length", "min_word": 3}]))
    assert "min_words" in _error_from_command(str(messy_inputs[0]), "--config", key, "--output", out)
    missing = str(tmp_path / "nope.jsonl")
    assert "file not found" in _error_from_command(missing, "--config", plain, "--output", out)
    (tmp_path / "empty.jsonl").write_text("")
    empty = str(tmp_path / "empty.jsonl")
    assert "no records" in _error_from_command(empty, "--config", plain, "--output", out)


def test_huge_line_is_rejected_not_read(tmp_path):
    path = _write_jsonl(tmp_path / "big.jsonl", [{"text": "short one"}, {"text": "x" * 5000}, {"text": "after it"}])
    config = CurateConfig(steps=["normalise"], on_error="skip", max_record_bytes=1000)
    result = curate(config, [path], tmp_path / "out")
    assert (result.kept, result.rejected) == (2, 1)
    rejected = _lines(tmp_path / "out" / "rejected.jsonl")[0]
    assert rejected["source"].endswith("big.jsonl:2") and "max_record_bytes" in rejected["reason"]


def test_real_data_slice_invariant_and_workers_match(tmp_path, shared_data):
    sst = tmp_path / "sst.tsv"
    with open(shared_data / "classification" / "sst2_train.tsv", encoding="utf-8") as handle:
        sst.write_text("".join(next(handle) for _ in range(1501)), encoding="utf-8")
    steps = ["normalise", "schema", {"name": "length", "min_words": 3}, "pii", "exact_dedup",
             {"name": "near_dedup", "threshold": 0.8}]
    single = curate(CurateConfig(steps=steps, chunk_size=256), [sst], tmp_path / "one")
    curate(CurateConfig(steps=steps, chunk_size=256, workers=2), [sst], tmp_path / "two")
    assert single.records_in == 1500 == single.kept + single.rejected
    assert (tmp_path / "one" / "kept.jsonl").read_text() == (tmp_path / "two" / "kept.jsonl").read_text()
    assert single.report["reasons"]["length"]["too short"] > 0
    assert single.report["labels"]["before"].keys() == {"0", "1"}


def test_decontamination_removes_mmlu_questions(tmp_path, shared_data):
    import csv

    mmlu = shared_data / "benchmark" / "mmlu" / "dev"
    with open(mmlu / "astronomy_dev.csv", encoding="utf-8") as handle:
        question = next(csv.DictReader(handle))["question"]
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": f"Quiz: {question}", "response": "I think so."},
        {"prompt": "Tell me about the planets of the solar system in order from the sun outwards please",
         "response": "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."},
    ])
    result = curate(CurateConfig(steps=[{"name": "decontam", "eval_sets": [str(mmlu)]}]), [train], tmp_path / "out")
    (rejected,) = _lines(tmp_path / "out" / "rejected.jsonl")
    assert result.kept == 1 and rejected["step"] == "decontam"
    assert "astronomy_dev.csv" in rejected["evidence"]["eval_source"]


def test_run_config_curate_section_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "curate": {"steps": ["normalise", "exact_dedup"]}}))
    assert [step.name for step in load_curate_config(path).steps] == ["normalise", "exact_dedup"]
    path.write_text(yaml.safe_dump({"curate": {"steps": [{"name": "near_dedup", "threshold": 1.5}]}}))
    with pytest.raises(ConfigError, match=r"curate\.steps: step 0 \(near_dedup\)\.threshold"):
        load_curate_config(path)
    with pytest.raises(DataError, match="file not found"):
        curate(CurateConfig(steps=["normalise"]), [tmp_path / "missing.jsonl"], tmp_path / "out")


def test_minhash_equals_datasketch_and_estimates_jaccard():
    import zlib

    import datasketch
    import numpy as np

    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    reference = datasketch.MinHash(num_perm=128, seed=1, hashfunc=zlib.crc32)
    reference.update_batch(set(shingles(text, 3, "word")))
    ours = MinHasher(128, seed=1).signatures([shingle_hashes(text, 3, "word")])[0]
    assert np.array_equal(ours, reference.hashvalues)
    other = text.replace("lazy dog", "sleepy dog")
    signatures = MinHasher(512).signatures([shingle_hashes(t, 3, "word") for t in (text, other)])
    assert abs((signatures[0] == signatures[1]).mean() - jaccard(text, other, 3, "word")) < 0.08
    bands, rows = optimal_bands(0.8, 256)
    assert bands * rows <= 256 and rows > 1


@pytest.mark.parametrize(("text", "kinds"), [
    ("card 4111 1111 1111 1111 here", ["CREDIT_CARD"]),
    ("card 4111 1111 1111 1112 here", []),  # fails the Luhn check
    ("iban GB82 WEST 1234 5698 7654 32", ["IBAN"]),
    ("iban GB83 WEST 1234 5698 7654 32", []),  # fails mod 97
    ("server at 10.0.12.7 today", ["IP_ADDRESS"]),
    ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789ab", ["API_KEY"]),
    ("no personal data in this sentence at all", []),
])
def test_pii_detectors(text, kinds):
    looked_for = set(kinds) or {"CREDIT_CARD", "IBAN", "IP_ADDRESS", "API_KEY"}
    assert [kind for kind, _, _ in find_pii(text, looked_for)] == kinds
