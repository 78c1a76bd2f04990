"""MinHash signatures for many documents at once (numpy), and the LSH banding that fits a target
Jaccard threshold.

The hash family is datasketch's default ("affine32", datasketch >= 2.0): 32-bit shingle hashes h,
permutations a * h + b mod 2^32 with odd a, seeded the same way, so a signature here equals
`datasketch.MinHash(num_perm, seed)` updated with the same 32-bit hashes (tested; both pre-mix
with MurmurHash3's finaliser). The speed comes from hashing a whole chunk's shingles in one (S, K)
uint32 matrix operation and `np.minimum.reduceat` per document, where datasketch updates one
document at a time.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np

_TOKEN = re.compile(r"\w+")


def shingles(text: str, n: int, unit: str) -> list[bytes]:
    """n-grams of words (lower-cased, punctuation dropped) or of characters (whitespace collapsed).
    A text shorter than n is one shingle, so short records still get a signature."""
    if unit == "word":
        tokens = _TOKEN.findall(text.lower())
        if len(tokens) <= n:
            return [" ".join(tokens).encode()]
        return [" ".join(tokens[i:i + n]).encode() for i in range(len(tokens) - n + 1)]
    flat = " ".join(text.lower().split())
    if len(flat) <= n:
        return [flat.encode()]
    return [flat[i:i + n].encode() for i in range(len(flat) - n + 1)]


def shingle_hashes(text: str, n: int, unit: str) -> np.ndarray:
    # crc32, not Python's hash(): it must give the same value in every worker process and every run.
    return np.fromiter({zlib.crc32(shingle) for shingle in shingles(text, n, unit)}, dtype=np.uint32)


def fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, as datasketch applies it before the affine maps: crc32 is linear, and
    affine maps of a linear hash would make the minima of related shingles correlated."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def jaccard(a: str, b: str, n: int, unit: str) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and the benchmark's truth)."""
    left, right = set(shingles(a, n, unit)), set(shingles(b, n, unit))
    return len(left & right) / len(left | right) if left | right else 1.0


class MinHasher:
    def __init__(self, num_perm: int, seed: int = 1):
        # Same draw as datasketch.MinHash(num_perm, seed): odd multipliers make each map a bijection.
        generator = np.random.RandomState(seed)
        self.a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self.b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.num_perm = num_perm

    def signatures(self, hash_sets: list[np.ndarray]) -> np.ndarray:
        """(N, K) uint32 signatures of N documents given their shingle hashes (each non-empty)."""
        lengths = np.array([len(hashes) for hashes in hash_sets])
        flat = fmix32(np.concatenate(hash_sets)) if hash_sets else np.zeros(0, dtype=np.uint32)
        out = np.empty((len(hash_sets), self.num_perm), dtype=np.uint32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        # Blocks of whole documents keep the (S, K) uint32 matrix near 16 MB.
        rows_per_block = max(1, (1 << 22) // self.num_perm)
        doc = 0
        while doc < len(hash_sets):
            end = doc + 1
            while end < len(hash_sets) and starts[end] + lengths[end] - starts[doc] <= rows_per_block:
                end += 1
            block = flat[starts[doc]:starts[end - 1] + lengths[end - 1]]
            permuted = block[:, None] * self.a + self.b  # (S, K), wraps mod 2^32
            out[doc:end] = np.minimum.reduceat(permuted, starts[doc:end] - starts[doc], axis=0)
            doc = end
        return out


def num_perm_for(threshold: float) -> int:
    """Enough permutations that the Jaccard estimate's standard error at the threshold,
    sqrt(J (1 - J) / K), is at most 0.025; between 64 and 512, a multiple of 16."""
    needed = threshold * (1 - threshold) / 0.025**2
    return int(min(512, max(64, -(-needed // 16) * 16)))


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted areas under the
    false-positive and false-negative parts of the LSH S-curve (datasketch's `_optimal_param`).

    Weights differ from datasketch's 0.5/0.5: candidates are verified against the threshold with
    the signatures afterwards, so a false positive costs one comparison but a false negative is a
    missed duplicate.
    """
    below = np.linspace(0.0, threshold, 200)
    above = np.linspace(threshold, 1.0, 200)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_negative = np.trapezoid((1 - above**rows) ** bands, above)
            error = fp_weight * false_positive + fn_weight * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


class LSHIndex:
    """Band tables over kept documents' signatures; `query` returns the most similar indexed document
    whose estimated Jaccard reaches the threshold (the earliest on ties)."""

    def __init__(self, threshold: float, num_perm: int, bands: int, rows: int):
        self.threshold, self.bands, self.rows = threshold, bands, rows
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)
        self.names: list[str] = []
        self._mix = np.random.RandomState(7).randint(1, 1 << 62, rows, dtype=np.uint64) | np.uint64(1)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(N, bands) keys, one per band of rows, for a whole chunk at once. A key collision between
        different bands of rows only adds a candidate, which verification then drops."""
        used = signatures[:, :self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        return (used.astype(np.uint64) * self._mix).sum(axis=2, dtype=np.uint64)  # (N, bands), wraps

    def query(self, signature: np.ndarray, keys: np.ndarray) -> tuple[int, float] | None:
        if not self.names:
            return None
        candidates: set[int] = set()
        for table, key in zip(self.tables, keys.tolist(), strict=True):
            found = table.get(key)
            if found is not None:
                candidates.update(found) if isinstance(found, list) else candidates.add(found)
        if not candidates:
            return None
        ids = np.array(sorted(candidates))
        similarity = (self.signatures[ids] == signature).mean(axis=1)
        best = int(np.argmax(similarity))  # argmax takes the first maximum: the earliest document
        return (int(ids[best]), float(similarity[best])) if similarity[best] >= self.threshold else None

    def add(self, signature: np.ndarray, keys: np.ndarray, name: str) -> int:
        doc = len(self.names)
        if doc == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[doc] = signature
        self.names.append(name)
        for table, key in zip(self.tables, keys.tolist(), strict=True):
            # Most buckets hold one document: a bare int saves a list per entry.
            found = table.get(key)
            if found is None:
                table[key] = doc
            elif isinstance(found, list):
                found.append(doc)
            else:
                table[key] = [found, doc]
        return doc
