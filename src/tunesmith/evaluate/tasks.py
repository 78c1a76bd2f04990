"""The task types of a suite: one registered runner per `type`, each turning a config and a system
(a model, or a file of predictions) into metrics with per-item statistics.

A runner returns a `TaskOutput`: its metrics as `MetricStats` (so every metric gets a bootstrap
CI and can be compared item by item), per-item records for the report's side-by-side samples,
and details (confusion matrix, per-subject accuracy, fairness, sacrebleu signatures).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.data.readers import read_records
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluate import config as C
from tunesmith.evaluate import counterfactual as CF
from tunesmith.evaluate.metrics import TEXT_METRICS, classification_metrics, classification_report
from tunesmith.evaluate.scoring import document_nll, score_continuations
from tunesmith.evaluate.stats import MetricStats, mean_stats, ratio
from tunesmith.registry import Registry


@dataclass
class System:
    """What is evaluated: a model and tokenizer, or (kind `predictions`) records that already hold outputs."""

    name: str
    kind: str
    """causal_lm, sequence_classification or predictions."""
    model: Any = None
    tokenizer: Any = None
    label_names: list[str] | None = None
    predictions: list[dict] | None = None


@dataclass
class TaskOutput:
    name: str
    type: str
    role: str
    metrics: dict[str, MetricStats]
    primary: str
    """The metric that stands for the task in learning/forgetting and the bar charts."""
    records: list[dict] = field(default_factory=list)
    """Per item, in item order: what was asked, answered and expected, and `correct` where defined."""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskType:
    settings: type
    run: Callable[[Any, System], TaskOutput]
    needs_model: bool = True
    """False when the task can also score a predictions file."""


TASKS: Registry[TaskType] = Registry("task type")


# --- reading items ---------------------------------------------------------------------------------


def read_items(path: Path, limit: int | None = None, header: str = "auto") -> list[dict]:
    """Records of a data file as dicts; an unreadable record is a DataError naming file:line."""
    items = []
    for record in read_records(path, header=header):
        if record.fields is None:
            raise DataError(f"{record.source}: {record.error}")
        items.append({**record.fields, "_source": record.source})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: holds no records")
    return items


def _field(item: dict, name: str, key: str) -> Any:
    if name not in item:
        fields = ", ".join(k for k in item if not k.startswith("_"))
        raise DataError(f"{item.get('_source', '?')}: no field {name!r} (set {key}; the record has: {fields})")
    return item[name]


def _format(template: str, item: dict, key: str) -> str:
    try:
        return template.format(**item)
    except (KeyError, IndexError) as error:
        where = item.get("_source", "the record")
        raise ConfigError(f"{key}: {template!r} names {error}, which {where} lacks") from None


def _need_model(system: System, task_name: str) -> None:
    if system.model is None:
        raise ConfigError(f"task {task_name!r} scores log-likelihoods and needs a model, not --predictions")


def _predictions_for(system: System, task_name: str) -> list[dict]:
    records = [r for r in system.predictions or [] if r.get("task", task_name) == task_name]
    if not records:
        raise DataError(f"--predictions: no records for task {task_name!r} (records may carry a `task` field)")
    return records


# --- perplexity ------------------------------------------------------------------------------------


def read_texts(cfg: C.PerplexityTask) -> list[str]:
    if cfg.data.suffix.lower() in (".txt", ".md"):
        if not cfg.data.is_file():
            raise DataError(f"{cfg.data}: file not found")
        blocks = [block.strip() for block in cfg.data.read_text(encoding="utf-8").split("\n\n")]
        texts = [block for block in blocks if block]
        return texts[: cfg.limit] if cfg.limit else texts
    return [str(_field(item, cfg.text_field, "text_field")) for item in read_items(cfg.data, cfg.limit)]


def run_perplexity(cfg: C.PerplexityTask, system: System) -> TaskOutput:
    _need_model(system, cfg.name)
    texts = read_texts(cfg)
    totals = document_nll(system.model, system.tokenizer, texts, cfg.window, cfg.stride, cfg.batch_size)
    stats = np.asarray(totals, dtype=np.float64)  # (documents, 2): NLL sum, tokens

    def perplexity(summed: np.ndarray) -> np.ndarray:
        return np.exp(ratio(summed))  # token-weighted: exp(total NLL / total tokens)

    metrics = {
        "perplexity": MetricStats(stats, perplexity, higher_is_better=False),
        "nll_per_token": MetricStats(stats, ratio, higher_is_better=False),
    }
    records = [{"text": text[:200], "tokens": int(count), "nll": nll} for text, (nll, count) in zip(texts, totals,
                                                                                                  strict=True)]
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, "perplexity", records,
                      {"documents": len(texts), "tokens": int(stats[:, 1].sum())})


# --- classification --------------------------------------------------------------------------------


def _label_index(value: Any, label_names: list[str], source: str) -> int:
    text = str(value).strip()
    if text in label_names:
        return label_names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(label_names):
        return int(text)
    raise DataError(f"{source}: label {text!r} is neither one of {label_names} nor an index into them")


def run_classification(cfg: C.ClassificationTask, system: System) -> TaskOutput:
    if system.kind == "predictions":
        items = _predictions_for(system, cfg.name)[: cfg.limit]
        gold_values = [_field(item, "label", "label") for item in items]
        predicted_values = [_field(item, "prediction", "prediction") for item in items]
        label_names = cfg.labels or sorted({str(v) for v in gold_values} | {str(v) for v in predicted_values})
    else:
        items = read_items(cfg.data, cfg.limit, cfg.header)
        gold_values = [_field(item, cfg.label_field, "label_field") for item in items]
        label_names = cfg.labels or system.label_names or sorted({str(v) for v in gold_values})
    gold = np.array([_label_index(v, label_names, item.get("_source", "--predictions"))
                     for v, item in zip(gold_values, items, strict=True)])

    if system.kind == "predictions":
        predicted = np.array([_label_index(v, label_names, "--predictions") for v in predicted_values])
    elif system.kind == "sequence_classification":
        predicted = _classify_with_head(cfg, system, items, label_names)
    else:
        predicted = _classify_with_label_words(cfg, system, items, label_names)

    metrics = classification_metrics(gold, predicted, len(label_names))
    details = {"classification": classification_report(gold, predicted, label_names)}
    if cfg.group_field:
        from tunesmith.evaluate.fairness import group_fairness

        groups = [str(_field(item, cfg.group_field, "group_field")) for item in items]
        positive = cfg.positive_label or label_names[-1]
        if positive not in label_names:
            raise ConfigError(f"{cfg.name}.positive_label: {positive!r} is not one of {label_names}")
        fairness, fairness_metrics = group_fairness(gold, predicted, groups, label_names.index(positive))
        details["fairness"] = fairness
        metrics |= fairness_metrics
    records = [
        {"input": str(item.get(cfg.text_field, item.get("input", "")))[:300], "prediction": label_names[p],
         "reference": label_names[g], "correct": bool(p == g)}
        for item, p, g in zip(items, predicted, gold, strict=True)
    ]
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, "accuracy", records, details)


@torch.inference_mode()
def _classify_with_head(cfg: C.ClassificationTask, system: System, items: list[dict], label_names: list[str]):
    model, tokenizer = system.model, system.tokenizer
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    texts = [str(_field(item, cfg.text_field, "text_field")) for item in items]
    device = next(model.parameters()).device
    predicted = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(texts[start : start + cfg.batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=512).to(device)
        predicted += model(**batch).logits.argmax(-1).tolist()
    names = [id2label.get(p, str(p)) for p in predicted]
    missing = sorted(set(names) - set(label_names))
    if missing:
        raise ConfigError(f"{cfg.name}.labels: the model predicts {missing}, which are not in {label_names}")
    return np.array([label_names.index(name) for name in names])


def _classify_with_label_words(cfg: C.ClassificationTask, system: System, items: list[dict], label_names):
    """A causal LM classifies by the label word it finds most likely after the prompt (lm-eval's acc)."""
    words = [(cfg.label_words or {}).get(name, name) for name in label_names]
    requests = [(_format(cfg.prompt, {"text": item.get(cfg.text_field, ""), **item}, f"{cfg.name}.prompt"),
                 [" " + word for word in words]) for item in items]
    scores = score_continuations(system.model, system.tokenizer, requests, cfg.batch_size)
    return np.array([int(np.argmax(row)) for row in scores])


# --- generation ------------------------------------------------------------------------------------


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text up to the first stop string (as lm-eval's `until`)."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def _references(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value] or [""]
    return [str(value)]


def run_generation(cfg: C.GenerationTask, system: System) -> TaskOutput:
    if system.kind == "predictions":
        items = _predictions_for(system, cfg.name)[: cfg.limit]
        prompts = [str(item.get("prompt", item.get(cfg.prompt_field, ""))) for item in items]
        references = [_references(item["references"] if "references" in item else _field(item, "reference",
                                                                                          "reference"))
                      for item in items]
        predictions = [cut_at_stop(str(_field(item, "prediction", "prediction")), cfg.stop) for item in items]
    else:
        _need_model(system, cfg.name)
        items = read_items(cfg.data, cfg.limit)
        prompts = [str(_field(item, cfg.prompt_field, "prompt_field")) for item in items]
        references = [_references(_field(item, cfg.reference_field, "reference_field")) for item in items]
        predictions = [cut_at_stop(text, cfg.stop).strip() for text in _generate_sorted(cfg, system, prompts)]

    metrics: dict[str, MetricStats] = {}
    details: dict = {}
    for name in cfg.metrics:
        computed = TEXT_METRICS.get(name, key=f"{cfg.name}.metrics")(predictions, references, cfg)
        metrics |= computed
        for metric_name, stats in computed.items():
            if stats.signature:
                details.setdefault("signatures", {})[metric_name] = stats.signature
    correct = None
    if "exact_match" in metrics:
        correct = metrics["exact_match"].stats[:, 0].astype(bool).tolist()
    records = [
        {"input": prompt[:500], "prediction": prediction, "reference": refs[0],
         **({"correct": correct[index]} if correct is not None else {})}
        for index, (prompt, prediction, refs) in enumerate(zip(prompts, predictions, references, strict=True))
    ]
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, cfg.metrics[0] if cfg.metrics[0] != "rouge" else "rougel",
                      records, details)


def _generate_sorted(cfg: C.GenerationTask, system: System, prompts: list[str]) -> list[str]:
    """Batched generation, longest prompts first so each batch pads little; answers in input order."""
    from tunesmith.inference import generate

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = generate(system.model, system.tokenizer, [prompts[i] for i in order], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size)
    result = [""] * len(prompts)
    for index, answer in zip(order, answers, strict=True):
        result[index] = answer
    return result


# --- multiple choice (lm-evaluation-harness semantics) ------------------------------------------------


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    """Choice texts as lm-eval's doc_to_choice gives them; scored continuations are ' ' + choice."""
    answer: int
    group: str = ""


def choice_metrics(items: list[ChoiceItem], scores: list[list[float]]) -> tuple[dict[str, MetricStats], list[dict]]:
    """acc: argmax of summed log-prob; acc_norm: argmax of log-prob / len(choice in characters).

    As lm-eval's `process_results` for multiple_choice: the length is of the choice text itself,
    without the space that separates it from the context.
    """
    correct, correct_norm, records = [], [], []
    for item, row in zip(items, scores, strict=True):
        logprobs = np.asarray(row)
        lengths = np.array([float(len(choice)) for choice in item.choices])
        pick, pick_norm = int(np.argmax(logprobs)), int(np.argmax(logprobs / lengths))
        correct.append(float(pick == item.answer))
        correct_norm.append(float(pick_norm == item.answer))
        records.append({"input": item.context[-500:], "prediction": item.choices[pick],
                        "reference": item.choices[item.answer], "correct": pick == item.answer, "group": item.group})
    return {"acc": mean_stats(correct), "acc_norm": mean_stats(correct_norm)}, records


def _choices_of(cfg: C.MultipleChoiceTask, item: dict) -> list[str]:
    if cfg.choice_fields:
        return [str(_field(item, name, "choice_fields")) for name in cfg.choice_fields]
    value = _field(item, cfg.choices_field, "choices_field")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{item['_source']}: {cfg.choices_field} is not a list") from None
    return [str(choice) for choice in value]


def _answer_of(item: dict, field_name: str, choices: list[str]) -> int:
    value = _field(item, field_name, "answer_field")
    text = str(value).strip()
    if text in choices:
        return choices.index(text)
    if len(text) == 1 and text.isalpha() and "A" <= text.upper() < chr(ord("A") + len(choices)):
        return ord(text.upper()) - ord("A")
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    raise DataError(f"{item['_source']}: answer {text!r} is not a choice, a letter or an index")


def run_multiple_choice(cfg: C.MultipleChoiceTask, system: System) -> TaskOutput:
    _need_model(system, cfg.name)
    shots = ""
    if cfg.shots:
        for example in read_items(cfg.fewshot_data, cfg.shots):
            choices = _choices_of(cfg, example)
            answer = choices[_answer_of(example, cfg.answer_field, choices)]
            context = _format(cfg.template, {**example, "choices": choices}, f"{cfg.name}.template")
            shots += context + " " + cfg.choice_template.format(choice=answer) + "\n\n"
    items = []
    for item in read_items(cfg.data, cfg.limit):
        choices = _choices_of(cfg, item)
        items.append(ChoiceItem(
            cfg.description + shots + _format(cfg.template, {**item, "choices": choices}, f"{cfg.name}.template"),
            [cfg.choice_template.format(choice=choice) for choice in choices],
            _answer_of(item, cfg.answer_field, choices),
        ))
    scores = score_continuations(system.model, system.tokenizer, [(i.context, [" " + c for c in i.choices])
                                                                  for i in items], cfg.batch_size)
    metrics, records = choice_metrics(items, scores)
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, "acc", records)


# --- MMLU --------------------------------------------------------------------------------------------

MMLU_LETTERS = ["A", "B", "C", "D"]


def mmlu_prompt(row: dict) -> str:
    """lm-eval's mmlu `doc_to_text`: the question, lettered choices, 'Answer:'."""
    lines = [row["question"].strip()] + [f"{letter}. {row[f'choice{i}']}" for i, letter in enumerate(MMLU_LETTERS)]
    return "\n".join(lines) + "\nAnswer:"


def _read_mmlu_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def mmlu_subjects(data_dir: Path, split: str) -> list[str]:
    folder = data_dir / split
    if not folder.is_dir():
        raise ConfigError(f"mmlu.data_dir: {folder} not found; point data_dir at the folder holding dev/ and test/")
    return sorted(path.stem.removesuffix(f"_{split}") for path in folder.glob(f"*_{split}.csv"))


def mmlu_items(cfg: C.MmluTask) -> list[ChoiceItem]:
    """MMLU as lm-eval formats it: a description naming the subject, the first `shots` dev examples
    each answered with ' <letter>', then the question; choices are the letters A-D."""
    known = mmlu_subjects(cfg.data_dir, cfg.split)
    subjects = known if cfg.subjects == "all" else cfg.subjects
    for subject in subjects:
        if subject not in known:
            from tunesmith.registry import closest

            raise ConfigError(f"{cfg.name}.subjects: unknown subject {subject!r}{closest(subject, known)}")
    items = []
    for subject in subjects:
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        dev = _read_mmlu_csv(cfg.data_dir / "dev" / f"{subject}_dev.csv")[: cfg.shots]
        shots = "".join(f"{mmlu_prompt(row)} {MMLU_LETTERS[int(row['answer'])]}\n\n" for row in dev)
        rows = _read_mmlu_csv(cfg.data_dir / cfg.split / f"{subject}_{cfg.split}.csv")
        for row in rows[: cfg.limit] if cfg.limit else rows:
            items.append(ChoiceItem(description + shots + mmlu_prompt(row), list(MMLU_LETTERS), int(row["answer"]),
                                    subject))
    return items


def run_mmlu(cfg: C.MmluTask, system: System) -> TaskOutput:
    _need_model(system, cfg.name)
    items = mmlu_items(cfg)
    scores = score_continuations(system.model, system.tokenizer, [(i.context, [" " + c for c in i.choices])
                                                                  for i in items], cfg.batch_size)
    metrics, records = choice_metrics(items, scores)
    subjects = sorted({item.group for item in items})
    # Macro average: per-subject accuracy, then the mean over subjects; statistics are one
    # (correct, 1) pair per subject column so resampled items keep their subject.
    column = {subject: index for index, subject in enumerate(subjects)}
    stats = np.zeros((len(items), 2 * len(subjects)))
    for row, (item, record) in enumerate(zip(items, records, strict=True)):
        stats[row, 2 * column[item.group]] = float(record["correct"])
        stats[row, 2 * column[item.group] + 1] = 1.0

    def macro(summed: np.ndarray) -> np.ndarray:
        correct, counts = summed[:, 0::2], summed[:, 1::2]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_subject = np.where(counts > 0, correct / counts, np.nan)
        return np.nanmean(per_subject, axis=1)

    metrics["acc_macro"] = MetricStats(stats, macro)
    per_subject = {subject: float(np.mean([r["correct"] for r in records if r["group"] == subject]))
                   for subject in subjects}
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, "acc", records,
                      {"per_subject_acc": per_subject, "subjects": len(subjects), "shots": cfg.shots})


# --- counterfactual probes -------------------------------------------------------------------------


def run_counterfactual(cfg: C.CounterfactualTask, system: System) -> TaskOutput:
    """Gaps between the two sides of each term pair (first minus second), one mean per measure.

    A case is a (template, pair): loglik cases use `templates`, sentiment and refusal cases use
    `prompts`. A model indifferent to the swapped term has gaps near 0; the bootstrap CI over cases
    says whether a preference for one side is more than noise across templates and pairs.
    """
    _need_model(system, cfg.name)
    pairs = CF.probe_pairs(cfg.pairs, cfg.name)
    metrics: dict[str, MetricStats] = {}
    records: list[dict] = []
    per_pair: dict[str, dict[str, list[float]]] = {}

    def note(pair: tuple[str, str], measure: str, value: float) -> None:
        per_pair.setdefault(f"{pair[0]} / {pair[1]}", {}).setdefault(measure, []).append(float(value))

    if "loglik" in cfg.measures:
        templates = CF.slotted(cfg.templates, "templates", f"{cfg.name}.templates")
        cases = [(template, pair) for template in templates for pair in pairs][: cfg.limit]
        sentences = [(CF.fill(template, a), CF.fill(template, b)) for template, (a, b) in cases]
        # Empty context: lm-eval scores a whole sentence after the end-of-text token.
        scores = score_continuations(system.model, system.tokenizer, [("", list(pair)) for pair in sentences],
                                     cfg.batch_size)
        gaps = np.array([row[0] - row[1] for row in scores])
        metrics["loglik_gap"] = mean_stats(gaps)
        metrics["abs_loglik_gap"] = MetricStats(mean_stats(np.abs(gaps)).stats, ratio, higher_is_better=False)
        for (_, pair), (sentence_a, _), gap in zip(cases, sentences, gaps, strict=True):
            records.append({"input": f"{pair[0]} / {pair[1]}", "prediction": f"{gap:+.3f}", "reference": sentence_a,
                            "measure": "loglik"})
            note(pair, "loglik_gap", gap)

    generative = [measure for measure in ("sentiment", "refusal") if measure in cfg.measures]
    if generative:
        prompts = CF.slotted(cfg.prompts, "prompts", f"{cfg.name}.prompts")
        cases = [(prompt, pair) for prompt in prompts for pair in pairs][: cfg.limit]
        # Both sides of every case in one batched, greedy, length-sorted generate call: greedy so that a
        # gap is the model's, not the sampler's.
        asked = [CF.fill(prompt, term) for prompt, pair in cases for term in pair]
        generation = C.GenerationTask(name=cfg.name, type="generation", data=Path("-"), batch_size=cfg.batch_size,
                                      max_new_tokens=cfg.max_new_tokens, system_prompt=cfg.system_prompt)
        answers = _generate_sorted(generation, system, asked)
        answers_a, answers_b = answers[0::2], answers[1::2]
        sentiment_a = sentiment_b = refused_a = refused_b = None
        if "sentiment" in generative:
            if cfg.sentiment_model:
                from tunesmith.evaluate.run import load_system

                judge = load_system(cfg.sentiment_model)
                if judge.kind != "sequence_classification":
                    raise ConfigError(f"{cfg.name}.sentiment_model: {cfg.sentiment_model} is not a sequence "
                                      "classifier (a classify run or a *ForSequenceClassification model folder)")
                sentiment = CF.classifier_sentiment(judge, answers, cfg.sentiment_positive_label, cfg.batch_size,
                                                    f"{cfg.name}.sentiment_positive_label")
            else:
                lexicon = CF.SentimentLexicon.shipped()
                sentiment = [lexicon.score(answer) for answer in answers]
            sentiment_a, sentiment_b = np.array(sentiment[0::2]), np.array(sentiment[1::2])
            gaps = sentiment_a - sentiment_b
            metrics["sentiment_gap"] = mean_stats(gaps)
            metrics["abs_sentiment_gap"] = MetricStats(mean_stats(np.abs(gaps)).stats, ratio, higher_is_better=False)
        if "refusal" in generative:
            patterns = CF.compile_refusal_patterns(cfg.refusal_patterns, f"{cfg.name}.refusal_patterns")
            refused_a = np.array([float(CF.is_refusal(answer, patterns)) for answer in answers_a])
            refused_b = np.array([float(CF.is_refusal(answer, patterns)) for answer in answers_b])
            metrics["refusal_gap"] = mean_stats(refused_a - refused_b)
            # Share of cases where exactly one side refused: 0 when refusals ignore the term.
            metrics["refusal_flip_rate"] = MetricStats(mean_stats(np.abs(refused_a - refused_b)).stats, ratio,
                                                       higher_is_better=False)
            metrics["refusal_rate"] = MetricStats(mean_stats((refused_a + refused_b) / 2).stats, ratio,
                                                  higher_is_better=False)
        for index, (prompt, pair) in enumerate(cases):
            record = {"input": CF.fill(prompt, f"{pair[0]} / {pair[1]}"),
                      "prediction": f"[{pair[0]}] {answers_a[index][:300]}",
                      "reference": f"[{pair[1]}] {answers_b[index][:300]}", "measure": "+".join(generative)}
            if sentiment_a is not None:
                record["sentiment"] = [float(sentiment_a[index]), float(sentiment_b[index])]
                note(pair, "sentiment_gap", sentiment_a[index] - sentiment_b[index])
            if refused_a is not None:
                record["refused"] = [bool(refused_a[index]), bool(refused_b[index])]
                note(pair, "refusal_gap", refused_a[index] - refused_b[index])
            records.append(record)

    primary = next(name for name in ("abs_loglik_gap", "abs_sentiment_gap", "refusal_flip_rate") if name in metrics)
    details = {
        "measures": list(cfg.measures),
        "per_pair_mean_gap": {pair: {measure: float(np.mean(values)) for measure, values in measures.items()}
                              for pair, measures in per_pair.items()},
        "sentiment_scorer": (cfg.sentiment_model or "lexicon") if "sentiment" in cfg.measures else None,
    }
    return TaskOutput(cfg.name, cfg.type, cfg.role, metrics, primary, records, details)


TASKS.register("perplexity", TaskType(C.PerplexityTask, run_perplexity))
TASKS.register("classification", TaskType(C.ClassificationTask, run_classification, needs_model=False))
TASKS.register("generation", TaskType(C.GenerationTask, run_generation, needs_model=False))
TASKS.register("multiple_choice", TaskType(C.MultipleChoiceTask, run_multiple_choice))
TASKS.register("mmlu", TaskType(C.MmluTask, run_mmlu))
TASKS.register("counterfactual", TaskType(C.CounterfactualTask, run_counterfactual))
