"""Semantic dedup: records whose sentence embeddings (minilm-l6 by default) have cosine similarity
at or above a threshold with an earlier kept record are removed, naming that record.

As in exact and near dedup, only kept records enter the index and records arrive in input order,
so "keep the earliest" holds and chunking does not change the result. The comparison is exact
(a matrix product against every kept embedding), not approximate: memory grows with kept records
(4 * 384 bytes each for minilm-l6) and time with kept x new, which suits the curated sizes of SFT
data (up to a few hundred thousand records); the 0.9 default follows SemDeDup's finding
(Abbas et al. 2023) that pairs above ~0.9 cosine are mostly paraphrases of one another.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
from pydantic import Field

from tunesmith.curate.base import StepContext, StepOutput, StepSettings, register_step
from tunesmith.curate.records import Part, Record, Reject


class SemanticDedupSettings(StepSettings):
    """Semantic near duplicates: cosine similarity of minilm-l6 sentence embeddings at a threshold."""

    name: Literal["semantic_dedup"] = "semantic_dedup"
    threshold: float = Field(0.9, gt=0, le=1, description="Cosine similarity at which records are duplicates.")
    model: str = Field("minilm-l6", description="Sentence encoder: a built-in alias or a local model folder.")
    part: Part = Field("all", description="Which texts are compared: all, prompt or response.")
    batch_size: int = Field(64, ge=1, description="Texts embedded per forward pass.")
    max_length: int = Field(128, ge=8, description="Tokens per text; longer texts are truncated for the embedding.")


class SemanticDedup:
    def __init__(self, settings: SemanticDedupSettings, context: StepContext):
        from tunesmith.curate.embeddings import load_embedder

        self.name, self.settings = settings.name, settings
        self.embedder = load_embedder(settings.model)
        self.kept = np.zeros((0, 0), dtype=np.float32)  # (K, D) embeddings of kept records
        self.count = 0
        self.sources: list[str] = []
        self.cluster_sizes: Counter = Counter()

    def _append(self, embedding: np.ndarray, source: str) -> None:
        if self.count == len(self.kept):
            grown = np.zeros((max(1024, 2 * len(self.kept)), embedding.shape[0]), dtype=np.float32)
            if self.count:
                grown[:self.count] = self.kept[:self.count]
            self.kept = grown
        self.kept[self.count] = embedding
        self.count += 1
        self.sources.append(source)

    def process(self, records: list[Record]) -> StepOutput:
        output = StepOutput(kept=[])
        texts = [record.text(self.settings.part) for record in records]
        embeddings = self.embedder.encode(texts, self.settings.batch_size, self.settings.max_length)  # (C, D)
        against_kept = embeddings @ self.kept[:self.count].T if self.count else None  # (C, K)
        within = embeddings @ embeddings.T  # (C, C)
        kept_here: list[int] = []  # positions in this chunk that were kept, in order
        for position, record in enumerate(records):
            best, best_source = -1.0, None
            if against_kept is not None:
                column = int(np.argmax(against_kept[position]))  # argmax takes the earliest on ties
                best, best_source = float(against_kept[position, column]), self.sources[column]
            if kept_here:
                similar = within[position, kept_here]
                column = int(np.argmax(similar))
                if similar[column] > best:
                    best, best_source = float(similar[column]), records[kept_here[column]].source
            if best >= self.settings.threshold:
                self.cluster_sizes[best_source] += 1
                output.rejected.append(Reject(
                    record.source, self.name, f"semantic duplicate (cosine >= {self.settings.threshold})",
                    {"cosine": round(best, 4), "threshold": self.settings.threshold, "model": self.settings.model},
                    record, duplicate_of=best_source, similarity=best))
                continue
            kept_here.append(position)
            output.kept.append(record)
        for position in kept_here:
            self._append(embeddings[position], records[position].source)
        return output

    def summary(self) -> dict:
        sizes = Counter(1 + size for size in self.cluster_sizes.values())
        return {"model": self.settings.model, "threshold": self.settings.threshold,
                "duplicate clusters": len(self.cluster_sizes),
                "cluster sizes": {str(size): count for size, count in sorted(sizes.items())}}


register_step(SemanticDedupSettings, SemanticDedup, parallel=False)
