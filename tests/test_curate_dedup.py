"""near_dedup's LSH index (numpy band runs): the same verdicts as a brute-force LSH over every kept
record, whatever the chunking; bounded memory per indexed record; sources stored compactly."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tunesmith.curate import CurateConfig, curate
from tunesmith.curate.base import StepContext
from tunesmith.curate.dedup import NearDedup, NearDedupSettings
from tunesmith.curate.minhash import LSHIndex, SourceNames, shingle_hashes

WORDS = [f"w{index}" for index in range(400)]


def corpus(count: int, seed: int) -> list[str]:
    """Random 20-word texts, a third of them edited copies of an earlier text (1-5 words replaced),
    so some pairs land above a 0.5 Jaccard threshold, some near it and some below."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(count):
        if texts and rng.random() < 0.35:
            words = rng.choice(texts).split()
            for position in rng.sample(range(len(words)), rng.randint(1, 5)):
                words[position] = rng.choice(WORDS)
        else:
            words = [rng.choice(WORDS) for _ in range(20)]
        texts.append(" ".join(words))
    return texts


def brute_force(texts: list[str], settings: NearDedupSettings) -> dict[int, tuple[int, float]]:
    """Keep-the-earliest LSH done the slow way: a record is compared with every kept record sharing
    any band key; {record: (kept record it duplicates, estimated Jaccard)}."""
    step = NearDedup(settings, StepContext(output_dir=Path(".")))
    signatures = step.hasher.signatures([shingle_hashes(text, settings.ngram, settings.unit) for text in texts])
    keys = step.index.band_keys(signatures)  # (N, bands)
    kept: list[int] = []
    duplicates = {}
    for doc in range(len(texts)):
        candidates = [other for other in kept if (keys[other] == keys[doc]).any()]
        similarity = [float((signatures[other] == signatures[doc]).mean()) for other in candidates]
        if similarity and max(similarity) >= settings.threshold:
            best = int(np.argmax(similarity))
            duplicates[doc] = (candidates[best], similarity[best])
        else:
            kept.append(doc)
    return duplicates


@pytest.mark.parametrize("chunk_size", [16, 1000])
def test_index_matches_brute_force_lsh_at_any_chunk_size(tmp_path, chunk_size):
    texts = corpus(400, seed=3)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    settings = NearDedupSettings(threshold=0.5)
    expected = brute_force(texts, settings)
    assert 40 < len(expected) < 200  # the corpus exercises both verdicts
    result = curate(CurateConfig(steps=[settings], chunk_size=chunk_size), [path], tmp_path / "out")
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    found = {int(item["source"].rsplit(":", 1)[1]) - 1:
             (int(item["duplicate_of"].rsplit(":", 1)[1]) - 1, item["similarity"]) for item in rejected}
    assert found.keys() == expected.keys() and result.kept == 400 - len(expected)
    for doc, (original, similarity) in expected.items():
        assert found[doc] == (original, pytest.approx(similarity, abs=1e-4))


def test_scope_file_and_reference_dataset_with_chunks_spanning_files(tmp_path):
    text = "the quick brown fox jumps over the lazy dog near the river bank today"
    near = text.replace("today", "tonight")
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    reference = tmp_path / "eval.jsonl"
    first.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "something else entirely here"}) + "\n")
    second.write_text(json.dumps({"text": near}) + "\n" + json.dumps({"text": text}) + "\n")
    reference.write_text(json.dumps({"text": "something else entirely here!"}) + "\n")
    steps = [{"name": "near_dedup", "threshold": 0.6, "scope": "file", "against": [str(reference)]}]
    curate(CurateConfig(steps=steps, chunk_size=4), [first, second], tmp_path / "out")
    rejected = {item["source"].rsplit("/", 1)[1]: item["duplicate_of"].rsplit("/", 1)[1]
                for item in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    # b.jsonl:2 duplicates b.jsonl:1 within its file; a.jsonl:1 (another file) is forgotten.
    assert rejected == {"a.jsonl:2": "eval.jsonl:1", "b.jsonl:2": "b.jsonl:1"}


def test_index_memory_per_record_is_bounded():
    # threshold 0.7: num_perm 336, 37 bands of 9 rows. The old dict-of-bands index held ~6.5 KB a
    # record; signature (1,344 bytes) + 12 bytes a band (444) + a 12-byte source is ~1.8 KB.
    settings = NearDedupSettings(threshold=0.7)
    step = NearDedup(settings, StepContext(output_dir=Path(".")))
    rng = np.random.default_rng(0)
    count, chunk = 8192, 1024  # two signature blocks, eight seals
    signatures = rng.integers(0, 1 << 32, (count, step.num_perm), dtype=np.uint32)
    keys = step.index.band_keys(signatures)
    tracemalloc.start()
    index = LSHIndex(settings.threshold, step.num_perm, step.bands, step.rows)
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, count, chunk):
        for doc in range(start, start + chunk):
            index.add(signatures[doc], keys[doc], f"/data/train.jsonl:{doc + 1}")
        index.seal()
    per_record = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    expected = step.num_perm * 4 + 12 * step.bands + 12
    assert per_record < 1.25 * expected, f"{per_record:.0f} bytes per record, expected about {expected}"
    assert len(index.runs) <= 3  # runs merge: O(log N) of them
    assert index.query(signatures[123], keys[123], index.sealed_candidates(keys[123:124])[0]) == (123, 1.0)
    assert index.names[123] == "/data/train.jsonl:124"


@pytest.mark.parametrize("source", ["data/train.jsonl:41", "data/x.parquet:row 7", "odd:007", "no-number",
                                    "C:/data/a.csv:3", "big:123456789012345678901234", ""])
def test_source_names_round_trip(source):
    names = SourceNames()
    for index in range(3000):  # grows past its first allocation
        names.add(f"other.jsonl:{index}")
    doc = names.add(source)
    assert names[doc] == source and names[2999] == "other.jsonl:2999" and len(names) == 3001
