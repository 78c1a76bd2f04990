"""Near-dedup quality and speed: tunesmith's `near_dedup` step vs datasketch's MinHashLSH used the plain way.

Real text (SST-2 sentences, GSM8K questions, MMLU questions, read in place from ../shared/data)
gets planted near-duplicates: word substitutions, insertions, deletions and re-orderings, each
variant made to land near a target Jaccard level (0.3 ... 0.95) of its original's word 3-gram
set. The truth is exact, not assumed: every document sharing a shingle with an earlier one is
compared on exact shingle sets (a sparse overlap product), and "keep the earliest" is simulated
on those exact values, so real near-duplicates already in the data (SST-2 repeats phrases)
count too. A document is a true duplicate when its exact Jaccard with an earlier kept document
reaches the threshold.

    python bench/dedup.py                                  # dedup quality + speed, then memory
    python bench/dedup.py --per-source 2000 --parts dedup --json out.json
    python bench/dedup.py --parts memory --memory-runs per_record:100000,dedup_only:1000000

datasketch "plain": one `MinHash(num_perm)` per document updated with the same shingles, one
`MinHashLSH(threshold, num_perm)`, `query` then `insert` when nothing is found (a candidate
counts as a duplicate: datasketch does not verify). Both see the same shingles and num_perm.

Memory: peak RSS of the `tunesmith curate` command on N synthetic unique records, for a
pipeline of per-record steps (flat in N: one chunk in memory at a time), the same with
exact_dedup + near_dedup, and the two dedup steps alone. With dedup, memory grows with the kept
records by design: per kept record a 16-byte exact key, the num_perm * 4-byte MinHash signature
(verification needs it) and 12 bytes per LSH band; `--source` names the code to measure (e.g. a
copy of an older src/) so before/after figures come from the same command.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
LEVELS = (0.3, 0.5, 0.6, 0.65, 0.75, 0.8, 0.9, 0.95)
OPERATIONS = ("substitute", "insert", "delete", "reorder")
_TOKEN = re.compile(r"\w+")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=0.7, help="near_dedup threshold (its default)")
    parser.add_argument("--per-source", type=int, default=4000, help="original texts from each of the 3 sources")
    parser.add_argument("--planted", type=float, default=0.5, help="share of originals that get 1-3 variants")
    parser.add_argument("--min-words", type=int, default=10, help="originals shorter than this are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-runs", default="per_record:100000,per_record:1000000,with_dedup:100000,"
                        "with_dedup:1000000", help="PIPELINE:RECORDS,... peak-RSS runs (pipelines: "
                        "per_record, with_dedup, dedup_only)")
    parser.add_argument("--source", type=Path, help="import tunesmith from this src folder for the memory runs")
    parser.add_argument("--parts", default="dedup,memory", help="what to run: dedup (quality, speed), memory")
    parser.add_argument("--workdir", type=Path, help="where synthetic inputs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


# --- data ------------------------------------------------------------------------------------------


def real_texts(per_source: int, min_words: int, seed: int) -> dict[str, list[str]]:
    """Up to `per_source` texts of at least `min_words` words from each source, sampled by seed."""
    sources: dict[str, list[str]] = {"sst2": [], "gsm8k": [], "mmlu": []}
    with open(SHARED_DATA / "classification" / "sst2_train.tsv", encoding="utf-8") as handle:
        sources["sst2"] = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with open(SHARED_DATA / "sft" / "gsm8k_train.jsonl", encoding="utf-8") as handle:
        sources["gsm8k"] = [json.loads(line)["question"] for line in handle if line.strip()]
    for file in sorted((SHARED_DATA / "benchmark" / "mmlu" / "test").glob("*.csv")):
        with open(file, encoding="utf-8") as handle:
            sources["mmlu"] += [row["question"] for row in csv.DictReader(handle)]
    rng = random.Random(seed)
    picked = {}
    for name, texts in sources.items():
        seen, usable = set(), []
        for text in texts:
            words = _TOKEN.findall(text.lower())
            key = " ".join(words)
            if len(words) >= min_words and key not in seen:
                seen.add(key)
                usable.append(" ".join(text.split()))
        rng.shuffle(usable)
        picked[name] = usable[:per_source]
    return picked


def _edit(words: list[str], operation: str, amount: int, vocabulary: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    if operation == "substitute":
        for position in rng.sample(range(len(words)), min(amount, len(words))):
            words[position] = rng.choice(vocabulary)
    elif operation == "insert":
        for _ in range(amount):
            words.insert(rng.randrange(len(words) + 1), rng.choice(vocabulary))
    elif operation == "delete":
        for _ in range(min(amount, len(words) - 1)):
            del words[rng.randrange(len(words))]
    else:  # reorder: move `amount` cut points' worth of segments around (each cut breaks ~2 shingles)
        cuts = sorted(rng.sample(range(1, len(words)), min(amount, len(words) - 1)))
        segments = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
        rng.shuffle(segments)
        words = [word for segment in segments for word in segment]
    return words


def plant_variant(text: str, target: float, operation: str, vocabulary: list[str], seed: int, ngram: int):
    """A variant of `text` made with `operation`, its size chosen so the exact Jaccard of word
    n-gram sets is as close to `target` as the text's length allows: (variant, exact Jaccard)."""
    from tunesmith.curate.minhash import jaccard

    words = text.split()
    best = (text, 1.0)
    for amount in range(1, 2 * len(words)):
        variant = " ".join(_edit(words, operation, amount, vocabulary, random.Random(seed * 1009 + amount)))
        similarity = jaccard(text, variant, ngram, "word")
        if abs(similarity - target) < abs(best[1] - target):
            best = (variant, similarity)
        if similarity < target:
            break
    return best


def build_corpus(texts: dict[str, list[str]], planted: float, ngram: int, seed: int):
    """Originals plus planted variants, shuffled: list of dicts with text, source, and (for a
    variant) its original's position, operation and target level."""
    rng = random.Random(seed)
    vocabulary = sorted({word for group in texts.values() for text in group for word in text.split()})
    documents = []
    for source, group in texts.items():
        for text in group:
            cluster = len(documents)
            documents.append({"text": text, "source": source, "cluster": cluster, "planted": None})
            if rng.random() >= planted:
                continue
            for _ in range(rng.choice((1, 1, 2, 3))):
                target, operation = rng.choice(LEVELS), rng.choice(OPERATIONS)
                variant, similarity = plant_variant(text, target, operation, vocabulary, rng.randrange(1 << 30), ngram)
                documents.append({"text": variant, "source": source, "cluster": cluster,
                                  "planted": {"operation": operation, "target": target, "jaccard": similarity}})
    rng.shuffle(documents)
    return documents


def exact_truth(texts: list[str], threshold: float, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_duplicate, best_jaccard) per document: keep-the-earliest simulated on exact Jaccard of
    shingle sets. Pairs come from a sparse (N, shingles) @ (shingles, N) overlap product in blocks."""
    from scipy.sparse import csr_matrix

    from tunesmith.curate.minhash import shingles

    ids: dict[bytes, int] = {}
    indptr, indices = [0], []
    for text in texts:
        row = {ids.setdefault(shingle, len(ids)) for shingle in shingles(text, ngram, "word")}
        indices += sorted(row)
        indptr.append(len(indices))
    matrix = csr_matrix((np.ones(len(indices), dtype=np.int32), indices, indptr), shape=(len(texts), len(ids)))
    sizes = np.diff(matrix.indptr)
    transposed = matrix.T.tocsc()
    earlier_similar: list[list[tuple[int, float]]] = [[] for _ in texts]
    for start in range(0, len(texts), 1000):
        overlaps = (matrix[start:start + 1000] @ transposed).tocoo()  # (block, N) shared shingle counts
        rows, cols = overlaps.row + start, overlaps.col
        earlier = cols < rows
        rows, cols, counts = rows[earlier], cols[earlier], overlaps.data[earlier]
        similarity = counts / (sizes[rows] + sizes[cols] - counts)
        close = similarity >= 0.25  # lower pairs only feed the lowest "by Jaccard" band, as 0
        rows, cols, similarity = rows[close], cols[close], similarity[close]
        for row, col, value in zip(rows.tolist(), cols.tolist(), similarity.tolist(), strict=True):
            earlier_similar[row].append((col, value))
    duplicate = np.zeros(len(texts), dtype=bool)
    best = np.zeros(len(texts))
    for doc, pairs in enumerate(earlier_similar):
        kept = [value for other, value in pairs if not duplicate[other]]
        best[doc] = max(kept, default=0.0)
        duplicate[doc] = best[doc] >= threshold
    return duplicate, best


# --- the two methods -------------------------------------------------------------------------------


def run_tunesmith(texts: list[str], threshold: float, chunk_size: int = 1000) -> tuple[np.ndarray, float, dict]:
    from tunesmith.curate.base import StepContext
    from tunesmith.curate.dedup import NearDedup, NearDedupSettings
    from tunesmith.curate.records import Record

    records = [Record({"text": text}, f"bench:{index}", index, "bench") for index, text in enumerate(texts)]
    started = time.perf_counter()
    step = NearDedup(NearDedupSettings(threshold=threshold), StepContext(output_dir=Path(tempfile.gettempdir())))
    removed = np.zeros(len(texts), dtype=bool)
    for start in range(0, len(records), chunk_size):
        for item in step.process(records[start:start + chunk_size]).rejected:
            removed[item.record.index] = True
    seconds = time.perf_counter() - started
    return removed, seconds, {"num_perm": step.num_perm, "bands": step.bands, "rows": step.rows}


def run_datasketch(texts: list[str], threshold: float, num_perm: int, ngram: int) -> tuple[np.ndarray, float, dict]:
    from datasketch import MinHash, MinHashLSH

    from tunesmith.curate.minhash import shingles

    started = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = np.zeros(len(texts), dtype=bool)
    for index, text in enumerate(texts):
        signature = MinHash(num_perm=num_perm)
        signature.update_batch(set(shingles(text, ngram, "word")))
        if lsh.query(signature):
            removed[index] = True
        else:
            lsh.insert(str(index), signature)
    seconds = time.perf_counter() - started
    return removed, seconds, {"num_perm": num_perm, "bands": lsh.b, "rows": lsh.r}


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    true_positive = int((predicted & truth).sum())
    precision = true_positive / max(int(predicted.sum()), 1)
    recall = true_positive / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "false_positives": int((predicted & ~truth).sum()), "false_negatives": int((~predicted & truth).sum())}


def by_level(predicted: np.ndarray, best: np.ndarray) -> list[dict]:
    """Share removed per band of exact Jaccard with the closest earlier kept document."""
    edges = [0.0, 0.3, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0001]
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (best >= low) & (best < high)
        if inside.any():
            rows.append({"jaccard": f"[{low:.2f}, {min(high, 1.0):.2f})", "documents": int(inside.sum()),
                         "removed": round(float(predicted[inside].mean()), 4)})
    return rows


# --- memory ----------------------------------------------------------------------------------------


def write_synthetic(path: Path, count: int, seed: int) -> None:
    """`count` unique records of random words (prompt, response, label), written in blocks."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{index}" for index in range(20_000)])
    with open(path, "w", encoding="utf-8") as handle:
        for start in range(0, count, 10_000):
            size = min(10_000, count - start)
            words = vocabulary[rng.integers(0, len(vocabulary), (size, 30))]
            lines = []
            for offset, row in enumerate(words):
                prompt = f"record {start + offset}: " + " ".join(row[:10])
                lines.append(json.dumps({"prompt": prompt, "response": " ".join(row[10:]) + ".",
                                         "label": str((start + offset) % 3)}))
            handle.write("\n".join(lines) + "\n")


MEMORY_PIPELINES = {
    "per_record": ["normalise", "schema", {"name": "length", "min_words": 3}, "pii"],
    "with_dedup": ["normalise", "schema", {"name": "length", "min_words": 3}, "pii", "exact_dedup", "near_dedup"],
    "dedup_only": ["exact_dedup", "near_dedup"],
}


def peak_rss(workdir: Path, count: int, pipeline: str, seed: int, source: Path | None = None) -> dict:
    import yaml

    data = workdir / f"synthetic-{count}.jsonl"
    if not data.exists():
        write_synthetic(data, count, seed)
    config = workdir / f"{pipeline}.yaml"
    config.write_text(yaml.safe_dump({"steps": MEMORY_PIPELINES[pipeline]}), encoding="utf-8")
    command = [str(Path(sys.executable).parent / "tunesmith"), "curate", str(data), "--config", str(config),
               "--output", str(workdir / f"out-{pipeline}-{count}")]
    # A wrapper process per run, so RUSAGE_CHILDREN is this run's peak and not an earlier one's.
    wrapper = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
    environment = {**os.environ, "PYTHONPATH": str(source.resolve())} if source else None
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True,
                            env=environment)
    seconds = time.perf_counter() - started
    kilobytes, code = map(int, output.stdout.split())
    if code != 0:
        raise SystemExit(f"tunesmith curate failed on {count} records ({pipeline}): exit {code}")
    return {"pipeline": pipeline, "records": count, "code": str(source or "installed tunesmith"),
            "peak_rss_mb": round(kilobytes / 1024, 1),
            "seconds": round(seconds, 1), "records_per_s": round(count / seconds, 1)}


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    parts = set(args.parts.split(","))
    figures: dict = {"cpu_count": os.cpu_count()}
    if "dedup" in parts:
        figures |= dedup_quality_and_speed(args)
    if "memory" in parts:
        figures["memory"] = memory(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")


def dedup_quality_and_speed(args: argparse.Namespace) -> dict:
    ngram = 3  # near_dedup's default shingles: word 3-grams
    texts = real_texts(args.per_source, args.min_words, args.seed)
    documents = build_corpus(texts, args.planted, ngram, args.seed)
    corpus = [document["text"] for document in documents]
    planted = [document for document in documents if document["planted"]]
    print(f"corpus: {len(corpus):,} documents ({', '.join(f'{k} {len(v):,}' for k, v in texts.items())} originals, "
          f"{len(planted):,} planted variants)")
    truth, best = exact_truth(corpus, args.threshold, ngram)
    print(f"truth: {int(truth.sum()):,} duplicates at exact Jaccard >= {args.threshold}")

    ours, our_seconds, our_params = run_tunesmith(corpus, args.threshold)
    theirs, their_seconds, their_params = run_datasketch(corpus, args.threshold, our_params["num_perm"], ngram)
    results = {"tunesmith": {**scores(ours, truth), "docs_per_s": round(len(corpus) / our_seconds, 1), **our_params,
                             "by_jaccard": by_level(ours, best)},
               "datasketch_plain": {**scores(theirs, truth), "docs_per_s": round(len(corpus) / their_seconds, 1),
                                    **their_params, "by_jaccard": by_level(theirs, best)}}
    speedup = results["tunesmith"]["docs_per_s"] / results["datasketch_plain"]["docs_per_s"]
    print(f"{'':>17} {'precision':>9} {'recall':>7} {'F1':>6} {'docs/s':>9} {'b x r':>7}")
    for name, row in results.items():
        print(f"{name:>17} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>6.4f} "
              f"{row['docs_per_s']:>9,.0f} {row['bands']:>3}x{row['rows']:<3}")
    print(f"speed-up: {speedup:.2f}x  (targets: F1 >= 0.95, speed-up >= 3x)")
    print("removed share by exact Jaccard with the closest earlier kept document (tunesmith | datasketch):")
    for ours_row, theirs_row in zip(results["tunesmith"]["by_jaccard"], results["datasketch_plain"]["by_jaccard"],
                                    strict=True):
        print(f"  {ours_row['jaccard']:>14} {ours_row['documents']:>7,} docs: {ours_row['removed']:.3f} | "
              f"{theirs_row['removed']:.3f}")
    operations = Counter(document["planted"]["operation"] for document in planted)
    return {"threshold": args.threshold, "ngram": ngram, "documents": len(corpus),
            "originals": {name: len(group) for name, group in texts.items()}, "planted": len(planted),
            "planted_by_operation": dict(operations), "true_duplicates": int(truth.sum()), "results": results,
            "speedup": round(speedup, 2)}


def memory_runs(text: str) -> list[tuple[int, str]]:
    """`PIPELINE:RECORDS,...` as (records, pipeline) pairs, smallest first."""
    runs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pipeline, _, count = item.partition(":")
        if pipeline not in MEMORY_PIPELINES or not count.isdigit():
            raise SystemExit(f"--memory-runs: {item!r} is not PIPELINE:RECORDS with PIPELINE one of "
                             f"{', '.join(MEMORY_PIPELINES)}")
        runs.append((int(count), pipeline))
    return sorted(runs)


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for count, pipeline in memory_runs(args.memory_runs):
            row = peak_rss(workdir, count, pipeline, args.seed, args.source)
            rows.append(row)
            print(f"memory: {pipeline:>10} {count:>9,} records: peak RSS {row['peak_rss_mb']:,.0f} MB, "
                  f"{row['records_per_s']:,.0f} records/s", flush=True)
    return rows


if __name__ == "__main__":
    main()
