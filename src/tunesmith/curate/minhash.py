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
from dataclasses import dataclass
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


_TRAILING_NUMBER = re.compile(r"\d+$")


class SourceNames:
    """The sources ("file:line") of indexed documents, by document id, at 12 bytes each: a source is
    held as a prefix id and its trailing number ("data.jsonl:" and 41), not as one string per record."""

    def __init__(self):
        self.prefixes: list[str] = []
        self.prefix_ids: dict[str, int] = {}
        self.prefix_of = np.empty(0, dtype=np.uint32)
        self.number_of = np.empty(0, dtype=np.int64)
        self.count = 0

    def add(self, source: str) -> int:
        digits = _TRAILING_NUMBER.search(source)
        # Only numbers that print back the same ("007" does not) and fit an int64 are split off.
        if digits and len(digits.group()) < 19 and str(int(digits.group())) == digits.group():
            prefix, number = source[:digits.start()], int(digits.group())
        else:
            prefix, number = source, -1
        if self.count == len(self.number_of):
            grown = max(1024, self.count // 2)
            self.prefix_of = np.concatenate([self.prefix_of, np.empty(grown, dtype=np.uint32)])
            self.number_of = np.concatenate([self.number_of, np.empty(grown, dtype=np.int64)])
        self.prefix_of[self.count] = self.prefix_ids.setdefault(prefix, len(self.prefix_ids))
        if len(self.prefixes) < len(self.prefix_ids):
            self.prefixes.append(prefix)
        self.number_of[self.count] = number
        self.count += 1
        return self.count - 1

    def __getitem__(self, doc: int) -> str:
        number = int(self.number_of[doc])
        return self.prefixes[self.prefix_of[doc]] + (str(number) if number >= 0 else "")

    def __len__(self) -> int:
        return self.count


class SignatureStore:
    """(N, K) uint32 signatures in fixed-size blocks: growing never copies, nor holds twice the data."""

    BLOCK_ROWS = 4096

    def __init__(self, num_perm: int):
        self.num_perm = num_perm
        self.blocks: list[np.ndarray] = []
        self.count = 0

    def append(self, signature: np.ndarray) -> None:
        block, row = divmod(self.count, self.BLOCK_ROWS)
        if block == len(self.blocks):
            self.blocks.append(np.empty((self.BLOCK_ROWS, self.num_perm), dtype=np.uint32))
        self.blocks[block][row] = signature
        self.count += 1

    def rows(self, docs: np.ndarray) -> np.ndarray:
        """(len(docs), K) signatures of the given document ids."""
        if len(self.blocks) == 1:
            return self.blocks[0][docs]
        return np.stack([self.blocks[doc // self.BLOCK_ROWS][doc % self.BLOCK_ROWS] for doc in docs.tolist()])


_FREED = np.zeros(0, dtype=np.uint64)


@dataclass
class BandRun:
    """Band keys of a set of documents, each band's keys sorted (with the matching document ids), so a
    whole chunk's keys are looked up with one `np.searchsorted` per band."""

    keys: list[np.ndarray]  # per band: (M,) uint64, ascending
    docs: list[np.ndarray]  # per band: (M,) uint32, the document of each key

    @property
    def size(self) -> int:
        return len(self.keys[0])

    @classmethod
    def build(cls, keys: np.ndarray, docs: np.ndarray) -> BandRun:
        """From (M, bands) keys of documents `docs` (M,)."""
        orders = [np.argsort(keys[:, band], kind="stable") for band in range(keys.shape[1])]
        return cls([keys[order, band] for band, order in enumerate(orders)], [docs[order] for order in orders])

    def merge(self, other: BandRun) -> BandRun:
        """One run holding both, built band by band so the extra memory is one band's worth. Stable
        sorting two concatenated sorted runs is a linear merge (timsort finds the two runs)."""
        keys, docs = [], []
        for band in range(len(self.keys)):
            joined = np.concatenate([self.keys[band], other.keys[band]])
            order = np.argsort(joined, kind="stable")
            keys.append(joined[order])
            docs.append(np.concatenate([self.docs[band], other.docs[band]])[order])
            # Both inputs are dropped after the merge: free each band as soon as it is merged.
            self.keys[band] = self.docs[band] = other.keys[band] = other.docs[band] = _FREED
        return BandRun(keys, docs)

    def lookup(self, keys: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every (query row, document) pair sharing a band key, for (N, bands) query keys."""
        rows, docs = [], []
        for band, (column, owners) in enumerate(zip(self.keys, self.docs, strict=True)):
            low = np.searchsorted(column, keys[:, band], "left")
            counts = np.searchsorted(column, keys[:, band], "right") - low  # documents holding each key
            hit = np.flatnonzero(counts)
            if hit.size:
                counts = counts[hit]
                # Positions low[h], ..., low[h] + counts[h] - 1 for every hit h, as one flat range.
                offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
                rows.append(np.repeat(hit, counts))
                docs.append(owners[np.repeat(low[hit], counts) + offsets])
        return rows, docs


_NO_CANDIDATES = np.zeros(0, dtype=np.int64)


class LSHIndex:
    """Band tables over kept documents' signatures; `query` returns the most similar indexed document
    whose estimated Jaccard reaches the threshold (the earliest on ties).

    Memory per indexed document: its signature (K * 4 bytes), 12 bytes per band and its source in 12
    bytes. Band keys live in sorted numpy runs (an LSM layout: a chunk's new documents become a run,
    runs of similar size merge, so there are O(log N) runs), looked up for a whole chunk at once by
    `sealed_candidates`. Documents added within the current chunk sit in small dicts until `seal`.
    """

    def __init__(self, threshold: float, num_perm: int, bands: int, rows: int):
        self.threshold, self.bands, self.rows = threshold, bands, rows
        self.signatures = SignatureStore(num_perm)
        self.names = SourceNames()
        self.runs: list[BandRun] = []
        self.open_tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self.open_keys: list[np.ndarray] = []
        self.open_docs: list[int] = []
        self._mix = np.random.RandomState(7).randint(1, 1 << 62, rows, dtype=np.uint64) | np.uint64(1)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(N, bands) keys, one per band of rows, for a whole chunk at once. A key collision between
        different bands of rows only adds a candidate, which verification then drops."""
        used = signatures[:, :self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        return (used.astype(np.uint64) * self._mix).sum(axis=2, dtype=np.uint64)  # (N, bands), wraps

    def sealed_candidates(self, keys: np.ndarray) -> list[np.ndarray]:
        """For (N, bands) query keys, each row's sorted ids of sealed documents sharing a band key."""
        rows, docs = [], []
        for run in self.runs:
            run_rows, run_docs = run.lookup(keys)
            rows += run_rows
            docs += run_docs
        if not rows:
            return [_NO_CANDIDATES] * len(keys)
        rows, docs = np.concatenate(rows), np.concatenate(docs).astype(np.int64)
        order = np.lexsort((docs, rows))
        rows, docs = rows[order], docs[order]
        distinct = np.ones(len(rows), dtype=bool)
        distinct[1:] = (rows[1:] != rows[:-1]) | (docs[1:] != docs[:-1])
        rows, docs = rows[distinct], docs[distinct]
        return np.split(docs, np.searchsorted(rows, np.arange(1, len(keys))))

    def query(self, signature: np.ndarray, keys: np.ndarray, sealed: np.ndarray) -> tuple[int, float] | None:
        """Best match among `sealed` (this row of `sealed_candidates`) and the documents added since
        the last `seal` that share a band key with `keys` (bands,)."""
        ids = sealed
        if self.open_docs:
            recent: set[int] = set()
            for table, key in zip(self.open_tables, keys.tolist(), strict=True):
                found = table.get(key)
                if found is not None:
                    recent.update(found) if isinstance(found, list) else recent.add(found)
            if recent:
                # Open documents were added after every sealed one: their ids are larger.
                ids = np.concatenate([sealed, np.array(sorted(recent), dtype=np.int64)])
        if not len(ids):
            return None
        similarity = (self.signatures.rows(ids) == signature).mean(axis=1)
        best = int(np.argmax(similarity))  # argmax takes the first maximum: the earliest document
        return (int(ids[best]), float(similarity[best])) if similarity[best] >= self.threshold else None

    def add(self, signature: np.ndarray, keys: np.ndarray, name: str) -> int:
        doc = self.names.add(name)
        self.signatures.append(signature)
        self.open_keys.append(keys)
        self.open_docs.append(doc)
        for table, key in zip(self.open_tables, keys.tolist(), strict=True):
            # Most buckets hold one document: a bare int saves a list per entry.
            found = table.get(key)
            if found is None:
                table[key] = doc
            elif isinstance(found, list):
                found.append(doc)
            else:
                table[key] = [found, doc]
        return doc

    def seal(self) -> None:
        """Move the documents added since the last seal into a sorted run; merge runs while the
        newest is at least half the size of the one before (so sizes at least double down the list)."""
        if not self.open_docs:
            return
        self.runs.append(BandRun.build(np.stack(self.open_keys), np.array(self.open_docs, dtype=np.uint32)))
        self.open_tables = [{} for _ in range(self.bands)]
        self.open_keys, self.open_docs = [], []
        while len(self.runs) > 1 and 2 * self.runs[-1].size >= self.runs[-2].size:
            newest = self.runs.pop()
            self.runs[-1] = self.runs[-1].merge(newest)
