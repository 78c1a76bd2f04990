"""Text and classification metrics, each as additive per-item statistics (see stats.py).

Reference implementations are the arbiters: BLEU and chrF are sacrebleu's own per-sentence
statistics summed and passed to sacrebleu's own formula (exactly what `corpus_score` does), ROUGE
is rouge-score's scorer per item averaged (the usual corpus ROUGE), accuracy and F1 equal
scikit-learn's. Tests compare each with the library on the same strings.

A generation metric is a function `(predictions, references, task_cfg) -> {name: MetricStats}`
registered once in `TEXT_METRICS`; users add their own with `register_text_metric`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import numpy as np

from tunesmith.evaluate.stats import MetricStats, mean_stats
from tunesmith.registry import Registry

TextMetric = Callable[[list[str], list[list[str]], object], dict[str, MetricStats]]
TEXT_METRICS: Registry[TextMetric] = Registry("metric")


def register_text_metric(name: str):
    """Decorator: `@register_text_metric("my_metric")` on `(predictions, references, cfg) -> {name: stats}`."""

    def decorate(function: TextMetric) -> TextMetric:
        return TEXT_METRICS.register(name, function)

    return decorate


# --- exact match ---------------------------------------------------------------------------------


def extract_answer(text: str, pattern: str | None) -> str:
    """The first group of `pattern` (or the whole match) in `text`; the text itself when nothing matches.

    GSM8K's references end with `#### 72`; with `answer_regex: "#### (.+)"` both the model's
    output and the reference reduce to `72`.
    """
    if not pattern:
        return text
    match = re.search(pattern, text)
    if match is None:
        return text
    return match.group(1) if match.groups() else match.group(0)


def normalize_answer(text: str, ignore_case: bool, ignore_punctuation: bool) -> str:
    text = text.strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


@register_text_metric("exact_match")
def exact_match(predictions: list[str], references: list[list[str]], cfg) -> dict[str, MetricStats]:
    pattern = getattr(cfg, "answer_regex", None)
    ignore_case = getattr(cfg, "ignore_case", False)
    ignore_punctuation = getattr(cfg, "ignore_punctuation", False)
    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        answer = normalize_answer(extract_answer(prediction, pattern), ignore_case, ignore_punctuation)
        scores.append(float(any(
            answer == normalize_answer(extract_answer(ref, pattern), ignore_case, ignore_punctuation) for ref in refs
        )))
    return {"exact_match": mean_stats(scores)}


# --- sacrebleu: BLEU and chrF ----------------------------------------------------------------------


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference position; items with fewer references repeat their
    last one, which changes neither BLEU (clipped counts, closest length) nor chrF (best reference)."""
    width = max(len(refs) for refs in references)
    return [[refs[min(index, len(refs) - 1)] for refs in references] for index in range(width)]


def _sacrebleu_stats(metric, predictions: list[str], references: list[list[str]]) -> MetricStats:
    streams = _reference_streams(references)
    # The same per-segment statistics `corpus_score` sums; private in name, but it is how
    # sacrebleu's own paired bootstrap resamples (sacrebleu/significance.py).
    per_item = np.asarray(metric._extract_corpus_statistics(predictions, streams), dtype=np.float64)

    def finalize(summed: np.ndarray) -> np.ndarray:
        return np.array([metric._compute_score_from_stats(list(row)).score for row in summed])

    # corpus_score once on the real data: it sets what the signature reports (number of references).
    metric.corpus_score(predictions, streams)
    return MetricStats(per_item, finalize, signature=str(metric.get_signature()))


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


@register_text_metric("bleu")
def bleu(predictions: list[str], references: list[list[str]], cfg) -> dict[str, MetricStats]:
    return {"bleu": _sacrebleu_stats(_bleu(), predictions, references)}


@register_text_metric("chrf")
def chrf(predictions: list[str], references: list[list[str]], cfg) -> dict[str, MetricStats]:
    return {"chrf": _sacrebleu_stats(_chrf(), predictions, references)}


# --- rouge-score -----------------------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z])")
"""A sentence boundary: . ! or ? (with a closing quote or bracket after it, if any), whitespace, then a
capital letter (after an opening quote or bracket, if any). The whitespace is the boundary."""
NOT_SENTENCE_ENDS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "no", "fig", "gen", "rev"})
"""Words whose period ends an abbreviation, not a sentence ("Dr. Smith"); so does a single letter ("J. Smith")."""


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: every line break ends one, and within a line so does `SENTENCE_END` unless the
    word before it is an abbreviation. Offline and deterministic, unlike nltk's punkt, which needs a
    download; like punkt's output in the common case, though a lower-case start ("... e.g. this") or
    an abbreviation outside the list decides differently."""
    sentences = []
    for line in text.split("\n"):
        start = 0
        for boundary in SENTENCE_END.finditer(line):
            words = line[start : boundary.start()].split()
            last_word = words[-1].strip("\"')]").rstrip(".!?").lower() if words else ""
            if last_word in NOT_SENTENCE_ENDS or (len(last_word) == 1 and last_word.isalpha()):
                continue
            sentences.append(line[start : boundary.start()])
            start = boundary.end()
        sentences.append(line[start:])
    return [sentence.strip() for sentence in sentences if sentence.strip()]


def one_sentence_per_line(text: str) -> str:
    return "\n".join(split_sentences(text))


@register_text_metric("rouge")
def rouge(predictions: list[str], references: list[list[str]], cfg) -> dict[str, MetricStats]:
    """F-measure per item (best reference, rouge-score's `score_multi`), averaged over items (Lin 2004,
    "ROUGE: A Package for Automatic Evaluation of Summaries").

    rougeLsum is the summary-level LCS over sentences, and rouge-score takes a text's lines as its
    sentences. `rouge_lsum_split: sentences` first puts one sentence per line (`split_sentences`),
    which is what Hugging Face's summarization examples do with nltk before calling rouge-score; the
    other ROUGE types are unchanged by it (rouge-score's tokenizer reads a line break as a space).
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=getattr(cfg, "rouge_stemmer", False))
    if getattr(cfg, "rouge_lsum_split", "newline") == "sentences":
        predictions = [one_sentence_per_line(prediction) for prediction in predictions]
        references = [[one_sentence_per_line(reference) for reference in refs] for refs in references]
    per_type: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(refs, prediction)
        for name in ROUGE_TYPES:
            per_type[name].append(scores[name].fmeasure)
    return {name.lower(): mean_stats(values) for name, values in per_type.items()}


# --- classification --------------------------------------------------------------------------------


def confusion_stats(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C*C): each item's one-hot confusion cell (row = true, column = predicted)."""
    cells = np.asarray(y_true) * n_classes + np.asarray(y_pred)
    one_hot = np.zeros((len(cells), n_classes * n_classes))
    one_hot[np.arange(len(cells)), cells] = 1.0
    return one_hot


def _per_class_counts(summed: np.ndarray, n_classes: int):
    matrix = summed.reshape(-1, n_classes, n_classes)  # (B, true, predicted)
    true_positive = np.diagonal(matrix, axis1=1, axis2=2)
    predicted = matrix.sum(axis=1)
    actual = matrix.sum(axis=2)
    return matrix, true_positive, predicted, actual


def classification_metrics(y_true, y_pred, n_classes: int) -> dict[str, MetricStats]:
    """accuracy, f1_macro, f1_micro from summed confusion matrices.

    f1_macro averages over the classes that occur in y_true or y_pred, which is scikit-learn's
    default label set; a class with TP + FP + FN = 0 in a bootstrap replicate is left out likewise.
    """
    stats = confusion_stats(y_true, y_pred, n_classes)

    def accuracy(summed):
        matrix, true_positive, _, _ = _per_class_counts(summed, n_classes)
        return true_positive.sum(axis=1) / np.maximum(matrix.sum(axis=(1, 2)), 1)

    def f1_macro(summed):
        _, true_positive, predicted, actual = _per_class_counts(summed, n_classes)
        denominator = predicted + actual  # 2TP + FP + FN
        present = denominator > 0
        f1 = np.where(present, 2 * true_positive / np.maximum(denominator, 1), 0.0)
        return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    def f1_micro(summed):
        matrix, true_positive, _, _ = _per_class_counts(summed, n_classes)
        # Single-label multiclass: micro P = micro R = accuracy, so micro F1 is accuracy too.
        return true_positive.sum(axis=1) / np.maximum(matrix.sum(axis=(1, 2)), 1)

    return {
        "accuracy": MetricStats(stats, accuracy),
        "f1_macro": MetricStats(stats, f1_macro),
        "f1_micro": MetricStats(stats, f1_micro),
    }


def classification_report(y_true, y_pred, label_names: list[str]) -> dict:
    """scikit-learn's point estimates: accuracy, macro/micro F1, per-class P/R/F1/support, confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": label_names,
    }
