"""Decontamination: remove training records that share an n-gram with an evaluation set.

As GPT-3 (Brown et al. 2020, appendix C) and lm-evaluation-harness: n = 13 words, lower-cased,
punctuation removed. Departure: an evaluation item shorter than n words (many MMLU questions are)
is matched as a whole, down to `min_words`, so short questions are not silently exempt.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.dedup import reference_texts
from tunesmith.curate.records import Part, Record, Reject
from tunesmith.errors import ConfigError

_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _key(words: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


class DecontamSettings(StepSettings):
    """n-gram overlap (13 words, as GPT-3 and lm-eval) with evaluation sets; contaminated records removed."""

    name: Literal["decontam"] = "decontam"
    eval_sets: list[Path] = Field(description="Evaluation data files or folders, e.g. ../shared/data/benchmark/mmlu.")
    n: int = Field(13, ge=1, description="n-gram length in words.")
    min_words: int = Field(8, ge=1, description="Evaluation items shorter than n are matched whole down to this.")
    part: Part = Field("all", description="Which training texts are checked: all, prompt or response.")


class Decontam(RecordFilter):
    def __init__(self, settings: DecontamSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        for path in settings.eval_sets:
            if not Path(path).exists():
                raise ConfigError(f"steps.decontam.eval_sets: {path}: not found")
        self.grams: dict[bytes, str] = {}
        self.lengths: set[int] = set()
        for source, text in reference_texts(settings.eval_sets, "all"):
            words = _words(text)
            length = min(settings.n, len(words))
            if length < settings.min_words:
                continue
            self.lengths.add(length)
            for start in range(len(words) - length + 1):
                self.grams.setdefault(_key(words[start:start + length]), source)

    def check(self, record: Record) -> Reject | None:
        words = _words(record.text(self.settings.part))
        for length in sorted(self.lengths, reverse=True):
            for start in range(len(words) - length + 1):
                source = self.grams.get(_key(words[start:start + length]))
                if source is not None:
                    return reject(record, self.name, f"contaminated: shares a {length}-gram with an eval set",
                                  eval_source=source, ngram=" ".join(words[start:start + length]))
        return None

    def summary(self) -> dict:
        return {"eval n-grams": len(self.grams), "n": self.settings.n}


register_step(DecontamSettings, Decontam, parallel=True)
