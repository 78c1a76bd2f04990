"""Balance and bias scan: label and length distributions, demographic term counts and pronoun
ratios per label, warnings where a label or a group is heavily under-represented, and optional
down-sampling to a target label distribution.

The scan only counts (memory: one counter per label and term group), and keeps every record
unless `target` is set. Resampling then removes records, never copies them, so input = kept +
rejected still holds: label `l` is kept with probability p_l = min(1, target_l * T / n_l), with
n_l its count in the run's inputs (one extra pass over the inputs reading labels only) and T the
largest total the counts allow, T = min over l of n_l / target_l. Each record's draw is
a hash of the seed and its source, so the result is the same for any chunk size, worker count or
order. The counts come from the raw inputs: steps before `balance` that remove records make the
kept shares drift from the target by their removal rates, so put `balance` early when shares must
be exact.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.curate.base import StepContext, StepOutput, StepSettings, register_step, reject
from tunesmith.curate.demographic_terms import DEMOGRAPHIC_TERMS, PRONOUNS
from tunesmith.curate.records import Part, Record, read_inputs
from tunesmith.errors import ConfigError

_WORD = re.compile(r"\w+(?:[-']\w+)*")
NO_LABEL = "(none)"
# Word-count bins for the per-label length table.
WORD_BINS = ((0, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 500), (500, None))


class BalanceSettings(StepSettings):
    """Balance and bias scan: labels, lengths, demographic terms, pronouns; optional label resampling."""

    name: Literal["balance"] = "balance"
    label_field: str = Field("label", description="The record field holding the label.")
    part: Part = Field("all", description="Which texts are scanned for terms and lengths: all, prompt or response.")
    terms: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict,
        description="Extra term lists, {category: {group: [words or two-word phrases]}}, merged into the built-in "
        "gender, ethnicity, religion and age lists.",
    )
    min_group_ratio: float = Field(
        0.1, gt=0, le=1, description="Warn when a group has fewer mentions than this fraction of its category's top."
    )
    min_mentions: int = Field(20, ge=1, description="Categories whose top group has fewer mentions are not judged.")
    min_label_ratio: float = Field(
        0.2, gt=0, le=1, description="Warn when a label has fewer records than this fraction of the largest label."
    )
    target: dict[str, float] | None = Field(
        None, description="Down-sample to this label distribution, e.g. {'0': 0.5, '1': 0.5} (shares, normalised); "
        "labels not listed are kept as they are."
    )

    @field_validator("target")
    @classmethod
    def _shares(cls, target: dict[str, float] | None) -> dict[str, float] | None:
        if target is None:
            return None
        if not target or any(share <= 0 for share in target.values()):
            raise ValueError("give each listed label a share > 0, e.g. {'0': 0.5, '1': 0.5}")
        total = sum(target.values())
        return {str(label): share / total for label, share in target.items()}


def _term_tables(extra: dict[str, dict[str, list[str]]]):
    """word -> [(category, group)] and "word word" -> [(category, group)] lookups."""
    merged: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for source in (DEMOGRAPHIC_TERMS, extra):
        for category, groups in source.items():
            for group, words in groups.items():
                merged[category][group].update(word.lower() for word in words)
    words: dict[str, list[tuple[str, str]]] = defaultdict(list)
    phrases: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for category, groups in merged.items():
        for group, terms in groups.items():
            for term in terms:
                (phrases if " " in term else words)[term].append((category, group))
    groups = {category: sorted(named) for category, named in merged.items()}
    return words, phrases, groups


def _draw(seed: int, source: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the record's source."""
    digest = hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Balance:
    def __init__(self, settings: BalanceSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.seed = context.seed
        self.words, self.phrases, self.groups = _term_tables(settings.terms)
        self.pronoun_of = {word: pronoun for pronoun, words in PRONOUNS.items() for word in words}
        self.labels: Counter = Counter()
        self.chars: Counter = Counter()
        self.word_counts: Counter = Counter()
        self.word_bins: dict[str, Counter] = defaultdict(Counter)
        self.mentions: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (category, group) -> label -> n
        self.pronouns: dict[str, Counter] = defaultdict(Counter)  # label -> pronoun -> n
        self.keep_probability: dict[str, float] = {}
        self.kept_labels: Counter = Counter()
        if settings.target is not None:
            self.keep_probability = self._keep_probabilities(context)

    def _label(self, record: Record) -> str:
        value = record.fields.get(self.settings.label_field)
        return NO_LABEL if value is None or isinstance(value, (dict, list)) else str(value)

    def _keep_probabilities(self, context: StepContext) -> dict[str, float]:
        counts: Counter = Counter()
        for raw in read_inputs(list(context.inputs), context.header, max_record_bytes=10_000_000):
            if raw.fields is not None:
                value = raw.fields.get(self.settings.label_field)
                counts[NO_LABEL if value is None or isinstance(value, (dict, list)) else str(value)] += 1
        target = self.settings.target
        missing = [label for label in target if counts[label] == 0]
        if missing:
            found = ", ".join(f"{label!r}" for label in sorted(counts)) or "none"
            raise ConfigError(f"steps.balance.target: label(s) {', '.join(map(repr, missing))} have no records in "
                              f"the inputs (field {self.settings.label_field!r}; labels found: {found})")
        total = min(counts[label] / share for label, share in target.items())
        return {label: min(1.0, share * total / counts[label]) for label, share in target.items()}

    def process(self, records: list[Record]) -> StepOutput:
        output = StepOutput(kept=[])
        for record in records:
            label = self._label(record)
            self._scan(record, label)
            probability = self.keep_probability.get(label)
            if probability is None or _draw(self.seed, record.source) < probability:
                self.kept_labels[label] += 1
                output.kept.append(record)
                continue
            output.rejected.append(reject(
                record, self.name, f"resampled: label {label} kept with probability {probability:.3f}",
                label=label, keep_probability=round(probability, 4), target_share=self.settings.target[label]))
        return output

    def _scan(self, record: Record, label: str) -> None:
        text = record.text(self.settings.part)
        tokens = _WORD.findall(text.lower())
        self.labels[label] += 1
        self.chars[label] += len(text)
        self.word_counts[label] += len(tokens)
        for low, high in WORD_BINS:
            if len(tokens) >= low and (high is None or len(tokens) < high):
                self.word_bins[label][f"{low}+" if high is None else f"{low}-{high - 1}"] += 1
                break
        for position, token in enumerate(tokens):
            for key in self.words.get(token, ()):
                self.mentions[key][label] += 1
            if position and self.phrases:
                for key in self.phrases.get(f"{tokens[position - 1]} {token}", ()):
                    self.mentions[key][label] += 1
            pronoun = self.pronoun_of.get(token)
            if pronoun is not None:
                self.pronouns[label][pronoun] += 1

    def warnings(self) -> list[str]:
        found = []
        s = self.settings
        if len(self.labels) > 1:
            top, top_count = self.labels.most_common(1)[0]
            for label, count in sorted(self.labels.items()):
                if count < s.min_label_ratio * top_count:
                    found.append(f"label {label!r} has {count:,} records, {count / top_count:.1%} of label {top!r} "
                                 f"({top_count:,}); below min_label_ratio {s.min_label_ratio}")
        for category, groups in self.groups.items():
            totals = {group: sum(self.mentions[(category, group)].values()) for group in groups}
            top = max(totals, key=totals.get)
            if totals[top] < s.min_mentions:
                continue
            for group, count in totals.items():
                if count < s.min_group_ratio * totals[top]:
                    found.append(f"{category}: {group!r} terms mentioned {count:,} times, {count / totals[top]:.1%} "
                                 f"of {top!r} ({totals[top]:,}); below min_group_ratio {s.min_group_ratio}")
        return found

    def summary(self) -> dict:
        labels = sorted(self.labels)
        total = sum(self.labels.values()) or 1
        summary: dict = {
            "labels": {label: {"records": self.labels[label], "share": round(self.labels[label] / total, 4),
                               "mean chars": round(self.chars[label] / self.labels[label], 1),
                               "mean words": round(self.word_counts[label] / self.labels[label], 1)}
                       for label in labels},
            "words per record, by label": {label: dict(self.word_bins[label]) for label in labels},
            "demographic terms (mentions per label)": {
                f"{category}/{group}": {"all": sum(self.mentions[(category, group)].values()),
                                        **{f"label {label}": self.mentions[(category, group)][label]
                                           for label in labels}}
                for category, groups in self.groups.items() for group in groups},
            "pronouns per label": {label: {**{p: self.pronouns[label][p] for p in PRONOUNS},
                                           "she per he": round(self.pronouns[label]["she"]
                                                               / max(self.pronouns[label]["he"], 1), 3)}
                                   for label in labels},
            "warnings": self.warnings(),
        }
        if self.keep_probability:
            summary["resampling"] = {label: {"target share": round(self.settings.target[label], 4),
                                             "keep probability": round(probability, 4),
                                             "records in": self.labels[label], "kept": self.kept_labels[label]}
                                     for label, probability in self.keep_probability.items()}
        return summary


register_step(BalanceSettings, Balance, parallel=False)
