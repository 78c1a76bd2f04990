"""The opt-in `augment` step on the tiny causal LM: augmented records follow their source, marked
`augmented: {method, of}`; the funnel counts them apart; runs repeat; bad settings are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.curate import CurateConfig, curate
from tunesmith.errors import ModelError

RECORDS = [{"prompt": f"Name a city in country number {index}.", "response": f"City {index}.", "label": "a"}
           for index in range(6)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def records_file(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS), encoding="utf-8")
    return path


def augment_step(model: Path, **settings) -> dict:
    return {"name": "augment", "model": str(model), "max_new_tokens": 4, **settings}


def test_paraphrase_adds_marked_records_after_their_source(tmp_path, records_file, tiny_llama_dir):
    steps = ["normalise", augment_step(tiny_llama_dir, copies=2), "exact_dedup"]
    result = curate(CurateConfig(steps=steps, chunk_size=4), [records_file], tmp_path / "out")
    kept = _lines(tmp_path / "out" / "kept.jsonl")
    report = result.report
    augment_row = next(row for row in report["funnel"] if row["step"] == "augment")
    added = augment_row["added"]
    assert added == report["added"] > 0 and augment_row == {**augment_row, "in": 6, "out": 6 + added, "removed": 0}
    assert report["records_in"] == 6 and report["records_in"] + added == result.kept + result.rejected
    assert report["kept_augmented"] == sum("augmented" in record for record in kept)
    for position, record in enumerate(kept):
        if "augmented" not in record:
            continue
        source = record["augmented"]["of"]
        original = next(item for item in kept[:position] if item["source"] == source)
        assert record["augmented"]["method"] == "paraphrase"
        assert record["source"] in (f"{source}#paraphrase-1", f"{source}#paraphrase-2")
        assert record["response"] == original["response"] and record["label"] == original["label"]  # part: prompt
        assert record["prompt"] != original["prompt"] and record["prompt"].strip()
        # augmented copies sit right after their source (and its other copies)
        assert all(item["source"] == source or item.get("augmented", {}).get("of") == source
                   for item in kept[kept.index(original):position + 1])
    again = tmp_path / "again"
    curate(CurateConfig(steps=steps, chunk_size=4), [records_file], again)
    assert (again / "kept.jsonl").read_text() == (tmp_path / "out" / "kept.jsonl").read_text()
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "added (augmented)" in html and "augmented added" in html


def test_back_translation_of_a_fraction(tmp_path, records_file, tiny_llama_dir):
    steps = [augment_step(tiny_llama_dir, method="back_translate", fraction=0.5, seed=1)]
    result = curate(CurateConfig(steps=steps), [records_file], tmp_path / "out")
    kept = _lines(tmp_path / "out" / "kept.jsonl")
    augmented = [record for record in kept if "augmented" in record]
    assert 0 < len(augmented) < 6 and result.report["added"] == len(augmented), result.report["counts"]
    assert {record["augmented"]["method"] for record in augmented} == {"back_translate"}
    # the same records are chosen whatever the chunking: the choice hashes the seed and the source
    chunked = curate(CurateConfig(steps=steps, chunk_size=1), [records_file], tmp_path / "chunked")
    assert chunked.report["added"] == len(augmented)
    assert [record["augmented"]["of"] for record in _lines(tmp_path / "chunked" / "kept.jsonl")
            if "augmented" in record] == [record["augmented"]["of"] for record in augmented]


def test_augment_errors_name_the_key(tmp_path, records_file):
    with pytest.raises(ModelError, match=r"^steps\.augment\.model: "):
        curate(CurateConfig(steps=[{"name": "augment", "model": str(tmp_path / "no-model")}]), [records_file],
               tmp_path / "out")
    with pytest.raises(ValueError, match=r"step 0 \(augment\)\.model: Field required"):
        CurateConfig(steps=["augment"])
    with pytest.raises(ValueError, match=r"step 0 \(augment\)\.method"):
        CurateConfig(steps=[{"name": "augment", "model": "x", "method": "translate"}])
