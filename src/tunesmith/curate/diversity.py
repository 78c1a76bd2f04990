"""Diversity scan: distinct-n, duplicate-cluster sizes, and (opt-in) embedding-space coverage by
k-means over minilm-l6 sentence embeddings, with the record nearest each centre as its example.

The step keeps every record; it only measures what passes it (put it before the dedup steps to
measure the raw data, after them to measure the result). Memory grows with the data here, by
design of the measures: one 8-byte hash per distinct n-gram (up to `max_ngrams` per n, after which
distinct-n is a lower bound and says so) and one per distinct record for the cluster sizes. The
k-means part embeds a fixed-size uniform sample (reservoir sampling, seeded), so its cost does not
grow with the input.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from typing import Literal

import numpy as np
from pydantic import Field

from tunesmith.curate.base import StepContext, StepOutput, StepSettings, register_step
from tunesmith.curate.dedup import normalised_text
from tunesmith.curate.records import Part, Record

_WORD = re.compile(r"\w+")
SNIPPET = 160


class DiversitySettings(StepSettings):
    """Diversity: distinct-n, duplicate-cluster sizes, optional k-means coverage of minilm-l6 embeddings."""

    name: Literal["diversity"] = "diversity"
    part: Part = Field("all", description="Which texts are measured: all, prompt or response.")
    ngrams: list[int] = Field([1, 2, 3], min_length=1, description="n of distinct-n (Li et al. 2016): distinct "
                              "n-grams / all n-grams over the data.")
    max_ngrams: int = Field(20_000_000, ge=1, description="Distinct n-grams remembered per n (memory bound).")
    embeddings: bool = Field(False, description="Embed a sample and report k-means coverage (needs minilm-l6).")
    clusters: int = Field(10, ge=2, description="k of k-means.")
    sample: int = Field(2000, ge=2, description="Records embedded for k-means (a seeded uniform sample).")
    model: str = Field("minilm-l6", description="Sentence encoder: a built-in alias or a local model folder.")


class Diversity:
    def __init__(self, settings: DiversitySettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.seen_ngrams = {n: set() for n in settings.ngrams}
        self.total_ngrams: Counter = Counter()
        self.capped: set[int] = set()
        self.records: Counter = Counter()  # normalised-text hash -> records with that text
        self.count = 0
        self.rng = random.Random(context.seed)
        self.seed = context.seed
        self.reservoir: list[tuple[str, str]] = []  # (source, text)

    def process(self, records: list[Record]) -> StepOutput:
        for record in records:
            text = record.text(self.settings.part)
            tokens = _WORD.findall(text.lower())
            for n, seen in self.seen_ngrams.items():
                grams = [hash(tuple(tokens[i:i + n])) for i in range(len(tokens) - n + 1)]
                self.total_ngrams[n] += len(grams)
                if len(seen) < self.settings.max_ngrams:
                    seen.update(grams)
                else:
                    self.capped.add(n)
            key = hashlib.blake2b(normalised_text(text).encode(), digest_size=8).digest()
            self.records[key] += 1
            if self.settings.embeddings:
                # Reservoir sampling (Vitter's algorithm R): every record has the same chance to be in it.
                if len(self.reservoir) < self.settings.sample:
                    self.reservoir.append((record.source, text))
                else:
                    slot = self.rng.randrange(self.count + 1)
                    if slot < self.settings.sample:
                        self.reservoir[slot] = (record.source, text)
            self.count += 1
        return StepOutput(kept=list(records))

    def summary(self) -> dict:
        summary: dict = {"records": self.count}
        for n, seen in self.seen_ngrams.items():
            value = round(len(seen) / self.total_ngrams[n], 4) if self.total_ngrams[n] else None
            summary[f"distinct-{n}"] = f">= {value} (capped at max_ngrams)" if n in self.capped else value
        sizes = Counter(self.records.values())
        in_clusters = sum(size * count for size, count in sizes.items() if size > 1)
        summary["duplicate cluster sizes (normalised text)"] = {str(size): count
                                                                for size, count in sorted(sizes.items())}
        summary["records in duplicate clusters"] = in_clusters
        summary["largest duplicate cluster"] = max(sizes, default=0)
        if self.settings.embeddings and len(self.reservoir) >= 2:
            summary |= self._coverage()
        return summary

    def _coverage(self) -> dict:
        from sklearn.cluster import KMeans

        from tunesmith.curate.embeddings import load_embedder

        sources, texts = zip(*self.reservoir, strict=True)
        vectors = load_embedder(self.settings.model).encode(list(texts))  # (S, D), unit length
        k = min(self.settings.clusters, len(texts))
        kmeans = KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit(vectors)
        assignment = kmeans.labels_
        distances = np.linalg.norm(vectors - kmeans.cluster_centers_[assignment], axis=1)  # (S,)
        shares = np.bincount(assignment, minlength=k) / len(texts)
        nonzero = shares[shares > 0]
        clusters = []
        for cluster in np.argsort(-shares):
            members = np.flatnonzero(assignment == cluster)
            nearest = members[np.argmin(distances[members])]
            text = " ".join(texts[nearest].split())
            clusters.append({"cluster": int(cluster), "records": len(members),
                             "share": round(float(shares[cluster]), 4),
                             "mean distance to centre": round(float(distances[members].mean()), 4),
                             "example source": sources[nearest],
                             "example": text if len(text) <= SNIPPET else text[:SNIPPET - 1] + "…"})
        return {
            "embedded sample": len(texts),
            # 1.0 when the sample spreads evenly over the k clusters, towards 0 when one cluster holds it all.
            "cluster balance (normalised entropy)": round(float(-(nonzero * np.log(nonzero)).sum() / np.log(k)), 4),
            "largest cluster share": round(float(shares.max()), 4),
            "mean distance to centre": round(float(distances.mean()), 4),
            "clusters": clusters,
        }


register_step(DiversitySettings, Diversity, parallel=False)
