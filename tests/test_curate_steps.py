"""The scan and model-backed curate steps (langid, balance, diversity, semantic_dedup) through `curate`,
as a user runs them: what they remove and why, what they report, and that results do not depend on
chunking. The semantic tests use the real minilm-l6 on ~20 records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.curate import STEPS, CurateConfig, curate
from tunesmith.errors import ConfigError

NEW_STEPS = ["langid", "balance", "diversity", "semantic_dedup"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", NEW_STEPS)
def test_step_is_registered_and_rejects_unknown_keys(name):
    assert name in STEPS
    with pytest.raises(ValueError, match=rf"step 0 \({name}\)\.thresh: unknown key"):
        CurateConfig(steps=[{"name": name, "thresh": 1}])


def test_langid_keeps_listed_languages_above_score(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [
        {"text": "The committee will publish its final report on the new railway line next spring."},
        {"text": "Le comité publiera son rapport final sur la nouvelle ligne de chemin de fer au printemps."},
        {"text": "Der Ausschuss wird seinen Abschlussbericht über die neue Bahnstrecke im Frühjahr vorlegen."},
        {"text": "ok thanks"},  # too short to judge: kept
    ])
    result = curate(CurateConfig(steps=[{"name": "langid", "languages": ["en", "fr"]}], workers=2, chunk_size=2),
                    [path], tmp_path / "out")
    (rejected,) = _lines(tmp_path / "out" / "rejected.jsonl")
    assert result.kept == 3 and rejected["source"].endswith("in.jsonl:3")
    assert rejected["evidence"]["language"] == "de" and rejected["evidence"]["threshold"] == 0.65
    counts = result.report["counts"]["langid"]
    assert counts["detected en"] == counts["detected fr"] == 1 and counts["too short to judge"] == 1
    with pytest.raises(ValueError, match="unknown language code"):
        CurateConfig(steps=[{"name": "langid", "languages": ["english"]}])


def _skewed_records(count: int = 300) -> list[dict]:
    # Label 0 is 9x label 1; "she" is rare next to "he"; no religion terms at all.
    records = []
    for index in range(count):
        label = "1" if index % 10 == 0 else "0"
        pronoun = "she" if index % 25 == 0 else "he"
        records.append({"text": f"Record {index}: {pronoun} said the young man liked item {index}.", "label": label})
    return records


def test_balance_scan_reports_and_warns(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", _skewed_records())
    result = curate(CurateConfig(steps=["balance"]), [path], tmp_path / "out")
    assert result.kept == 300
    summary = result.report["steps"]["balance"]
    assert summary["labels"]["0"]["records"] == 270 and summary["labels"]["1"]["records"] == 30
    assert summary["pronouns per label"]["0"]["she"] + summary["pronouns per label"]["1"]["she"] == 12
    assert summary["demographic terms (mentions per label)"]["age/young"]["all"] == 300
    warnings = " | ".join(summary["warnings"])
    assert "label '1' has 30 records" in warnings
    assert "gender: 'female' terms mentioned 12 times" in warnings
    assert "religion" not in warnings  # no mentions at all: nothing to judge
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "pronouns per label" in html and "gender/female" in html and "has 30 records" in html


def test_balance_resampling_is_deterministic_by_seed(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", _skewed_records(600))
    steps = [{"name": "balance", "target": {"0": 1, "1": 1}}]
    first = curate(CurateConfig(steps=steps, seed=3, chunk_size=7), [path], tmp_path / "a")
    curate(CurateConfig(steps=steps, seed=3, chunk_size=500), [path], tmp_path / "b")
    other = curate(CurateConfig(steps=steps, seed=4), [path], tmp_path / "c")
    kept = (tmp_path / "a" / "kept.jsonl").read_text()
    assert kept == (tmp_path / "b" / "kept.jsonl").read_text() != (tmp_path / "c" / "kept.jsonl").read_text()
    assert first.records_in == 600 == first.kept + first.rejected and other.records_in == 600
    labels = first.report["labels"]["after"]
    assert labels["1"] == 60 and 40 <= labels["0"] <= 80  # label 0 kept with probability 60/540
    reject = _lines(tmp_path / "a" / "rejected.jsonl")[0]
    assert reject["step"] == "balance" and reject["evidence"]["keep_probability"] == 0.1111
    with pytest.raises(ConfigError, match=r"label\(s\) '7' have no records"):
        curate(CurateConfig(steps=[{"name": "balance", "target": {"0": 1, "7": 1}}]), [path], tmp_path / "d")


TOPICS = {
    "cooking": ["How long should I bake a loaf of sourdough bread?", "What spices go well in a lentil curry?",
                "How do I keep pasta from sticking together when boiling it?", "Best way to roast vegetables?",
                "How much salt should go into homemade pizza dough?", "Can I freeze cooked rice safely?",
                "How do you make a smooth tomato soup?", "What temperature should chicken be cooked to?",
                "How to caramelise onions without burning them?", "What can I use instead of eggs in a cake?"],
    "astronomy": ["Why does Jupiter have so many moons?", "How far away is the Andromeda galaxy?",
                  "What causes a total solar eclipse?", "How are black holes detected by telescopes?",
                  "Why is Mars red when seen from Earth?", "How many planets orbit the star Trappist-1?",
                  "What is the difference between a comet and an asteroid?", "How old is the universe?",
                  "Why do stars twinkle in the night sky?", "What are the rings of Saturn made of?"],
}


def test_diversity_distinct_n_clusters_and_kmeans_coverage(tmp_path):
    records = [{"text": text, "label": topic} for topic, texts in TOPICS.items() for text in texts]
    records += [{"text": "Why is Mars red when seen from Earth?"}, {"text": "why is mars red, when seen from earth"}]
    path = _write_jsonl(tmp_path / "in.jsonl", records)
    steps = [{"name": "diversity", "embeddings": True, "clusters": 2, "ngrams": [1, 2]}]
    result = curate(CurateConfig(steps=steps), [path], tmp_path / "out")
    assert result.kept == 22
    summary = result.report["steps"]["diversity"]
    assert summary["duplicate cluster sizes (normalised text)"] == {"1": 19, "3": 1}
    assert summary["largest duplicate cluster"] == 3 and 0 < summary["distinct-2"] <= 1
    assert summary["distinct-1"] < summary["distinct-2"]
    clusters = summary["clusters"]
    assert len(clusters) == 2 and sum(cluster["records"] for cluster in clusters) == 22
    topic_of = {text: topic for topic, texts in TOPICS.items() for text in texts}
    examples = {topic_of.get(cluster["example"], "astronomy") for cluster in clusters}
    assert examples == {"cooking", "astronomy"}  # one cluster per topic, each shown by one of its records
    assert summary["cluster balance (normalised entropy)"] > 0.9
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "distinct-1" in html and "mean distance to centre" in html


def test_semantic_dedup_removes_paraphrases_keeping_the_earliest(tmp_path):
    texts = [text for group in TOPICS.values() for text in group]
    texts.insert(3, "What is the right amount of time to bake sourdough bread?")  # paraphrase of texts[0]
    texts.append("Why does the planet Mars look red from the Earth?")  # paraphrase of a record 14 lines up
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in texts])
    steps = [{"name": "semantic_dedup", "threshold": 0.8}]
    result = curate(CurateConfig(steps=steps, chunk_size=5), [path], tmp_path / "out")
    rejected = _lines(tmp_path / "out" / "rejected.jsonl")
    assert result.kept == 20 and len(rejected) == 2
    assert [item["source"].rsplit(":", 1)[1] for item in rejected] == ["4", "22"]
    assert [item["duplicate_of"].rsplit(":", 1)[1] for item in rejected] == ["1", "16"]
    assert all(item["similarity"] >= 0.8 and item["evidence"]["model"] == "minilm-l6" for item in rejected)
    whole = curate(CurateConfig(steps=steps, chunk_size=100), [path], tmp_path / "whole")
    assert whole.kept == 20
    assert (tmp_path / "whole" / "kept.jsonl").read_text() == (tmp_path / "out" / "kept.jsonl").read_text()
