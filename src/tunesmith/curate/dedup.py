"""Deduplication: exact (on normalised text) and near (MinHash LSH at a Jaccard threshold).

Records arrive in input order and only kept records enter the index, so "keep the earliest" holds
by construction and the result does not depend on chunk size or worker count. A duplicate's reject
names the kept record it duplicates (`duplicate_of`, that record's source) and the similarity.
`against` loads other datasets into the index first: a record matching one of them is removed and
points at the reference record. `scope: file` forgets the index at each new input file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tunesmith.curate.base import StepContext, StepOutput, StepSettings, register_step
from tunesmith.curate.minhash import LSHIndex, MinHasher, num_perm_for, optimal_bands, shingle_hashes
from tunesmith.curate.records import Part, Record, Reject, read_inputs, text_slots

_NOT_WORD = re.compile(r"[^\w\s]")


def normalised_text(text: str) -> str:
    """Case, punctuation and whitespace folded: 'Hello,  World!' and 'hello world' are exact duplicates."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def reference_texts(paths: list[Path], part: Part):
    """(source, text) of every readable record of the reference datasets."""
    for raw in read_inputs(paths, header="auto", max_record_bytes=10_000_000):
        if raw.fields is not None:
            yield raw.source, "\n".join(container[key] for container, key in text_slots(raw.fields, part))


class DedupSettings(StepSettings):
    """Exact duplicates after folding case, punctuation and whitespace."""

    name: Literal["exact_dedup"] = "exact_dedup"
    part: Part = Field("all", description="Which texts make the key: all, prompt or response.")
    scope: Literal["global", "file"] = Field("global", description="Across all inputs, or within each file.")
    against: list[Path] = Field(default_factory=list, description="Other datasets: records found there are removed.")


class ExactDedup:
    def __init__(self, settings: DedupSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.seen: dict[bytes, str] = {}
        self.reference: dict[bytes, str] = {}
        for source, text in reference_texts(settings.against, settings.part):
            self.reference.setdefault(self._key(text), source)
        self.file: str | None = None
        self.cluster_sizes: Counter = Counter()

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(normalised_text(text).encode(), digest_size=16).digest()

    def process(self, records: list[Record]) -> StepOutput:
        output = StepOutput(kept=[])
        for record in records:
            if self.settings.scope == "file" and record.file != self.file:
                self.seen.clear()
            self.file = record.file
            key = self._key(record.text(self.settings.part))
            original = self.reference.get(key) or self.seen.get(key)
            if original is None:
                self.seen[key] = record.source
                output.kept.append(record)
                continue
            where = "reference dataset" if key in self.reference else "input"
            self.cluster_sizes[original] += 1
            output.rejected.append(Reject(record.source, self.name, f"exact duplicate ({where})",
                                          {"normalised": True}, record, duplicate_of=original, similarity=1.0))
        return output

    def summary(self) -> dict:
        largest = 1 + max(self.cluster_sizes.values(), default=0)
        return {"duplicate clusters": len(self.cluster_sizes), "largest cluster": largest}


class NearDedupSettings(StepSettings):
    """Near duplicates: MinHash LSH at a Jaccard threshold (bands and rows derived from it)."""

    name: Literal["near_dedup"] = "near_dedup"
    threshold: float = Field(
        0.7, gt=0, lt=1, description="Jaccard similarity of shingle sets at which records are duplicates."
    )
    ngram: int = Field(3, ge=1, description="Shingle size, in `unit`s.")
    unit: Literal["word", "char"] = Field("word", description="Shingles of words or of characters.")
    num_perm: int | None = Field(
        None, ge=16, le=1024, description="Permutations; default from the threshold (standard error <= 0.025 there)."
    )
    bands: int | None = Field(None, ge=1, description="LSH bands; default: optimal for the threshold (with rows).")
    rows: int | None = Field(None, ge=1, description="Rows per band; set together with bands.")
    part: Part = Field("all", description="Which texts are compared: all, prompt or response.")
    scope: Literal["global", "file"] = Field("global", description="Across all inputs, or within each file.")
    against: list[Path] = Field(default_factory=list, description="Other datasets: records near them are removed.")
    seed: int = Field(1, description="MinHash permutation seed.")


class NearDedup:
    def __init__(self, settings: NearDedupSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.num_perm = settings.num_perm or num_perm_for(settings.threshold)
        if (settings.bands is None) != (settings.rows is None):
            from tunesmith.errors import ConfigError

            raise ConfigError("steps.near_dedup: set both bands and rows, or neither")
        if settings.bands is not None and settings.bands * settings.rows > self.num_perm:
            from tunesmith.errors import ConfigError

            used = settings.bands * settings.rows
            raise ConfigError(f"steps.near_dedup: bands * rows = {used} > num_perm {self.num_perm}")
        self.bands, self.rows = (settings.bands, settings.rows) if settings.bands else optimal_bands(
            settings.threshold, self.num_perm)
        self.hasher = MinHasher(self.num_perm, settings.seed)
        self.reference = self._new_index()
        batch: list[tuple[str, str]] = []
        for item in reference_texts(settings.against, settings.part):
            batch.append(item)
            if len(batch) == 1000:
                self._index_reference(batch)
                batch = []
        self._index_reference(batch)
        self.index = self._new_index()
        self.file: str | None = None
        self.cluster_sizes: Counter = Counter()

    def _new_index(self) -> LSHIndex:
        return LSHIndex(self.settings.threshold, self.num_perm, self.bands, self.rows)

    def _signatures(self, texts: list[str]):
        s = self.settings
        return self.hasher.signatures([shingle_hashes(text, s.ngram, s.unit) for text in texts])

    def _index_reference(self, batch: list[tuple[str, str]]) -> None:
        if batch:
            signatures = self._signatures([text for _, text in batch])
            keys = self.reference.band_keys(signatures)
            for (source, _), signature, band_keys in zip(batch, signatures, keys, strict=True):
                self.reference.add(signature, band_keys, source)
            self.reference.seal()

    def process(self, records: list[Record]) -> StepOutput:
        output = StepOutput(kept=[])
        signatures = self._signatures([record.text(self.settings.part) for record in records])  # (N, K)
        keys = self.index.band_keys(signatures)  # (N, bands)
        for start, end in self._segments(records):
            if self.settings.scope == "file" and records[start].file != self.file:
                self.index = self._new_index()
            self.file = records[start].file
            self._deduplicate(records[start:end], signatures[start:end], keys[start:end], output)
        return output

    def _segments(self, records: list[Record]) -> list[tuple[int, int]]:
        """(start, end) spans looked up together: the whole chunk, or with scope: file each file's run
        of records (the index starts afresh at each new file)."""
        if self.settings.scope == "global":
            return [(0, len(records))]
        starts = [0] + [i for i in range(1, len(records)) if records[i].file != records[i - 1].file]
        return list(zip(starts, [*starts[1:], len(records)], strict=True))

    def _deduplicate(self, records: list[Record], signatures: np.ndarray, keys: np.ndarray,
                     output: StepOutput) -> None:
        """Records in order against the reference and the index; kept ones join the index."""
        reference_candidates = self.reference.sealed_candidates(keys)
        index_candidates = self.index.sealed_candidates(keys)
        for position, record in enumerate(records):
            signature, band_keys = signatures[position], keys[position]
            index, where = self.reference, "reference dataset"
            match = index.query(signature, band_keys, reference_candidates[position])
            if match is None:
                index, where = self.index, "input"
                match = index.query(signature, band_keys, index_candidates[position])
            if match is None:
                self.index.add(signature, band_keys, record.source)
                output.kept.append(record)
                continue
            original, similarity = index.names[match[0]], match[1]
            self.cluster_sizes[original] += 1
            output.rejected.append(Reject(
                record.source, self.name, f"near duplicate ({where}, Jaccard >= {self.settings.threshold})",
                {"estimated_jaccard": round(similarity, 4), "threshold": self.settings.threshold,
                 "num_perm": self.num_perm, "bands": self.bands, "rows": self.rows},
                record, duplicate_of=original, similarity=similarity,
            ))
        self.index.seal()

    def summary(self) -> dict:
        sizes = Counter(1 + size for size in self.cluster_sizes.values())
        return {"num_perm": self.num_perm, "bands": self.bands, "rows": self.rows,
                "duplicate clusters": len(self.cluster_sizes),
                "cluster sizes": {str(size): count for size, count in sorted(sizes.items())}}


register_step(DedupSettings, ExactDedup, parallel=False)
register_step(NearDedupSettings, NearDedup, parallel=False)
