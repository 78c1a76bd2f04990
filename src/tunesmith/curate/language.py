"""Language identification: keep records in the listed languages, detected above a score.

The model is py3langid (langid.py's naive Bayes over byte n-grams, 97 languages, offline, from
PyPI), with normalised probabilities. The default threshold 0.65 is datatrove's LanguageFilter
default. Very short texts carry too few n-grams for a reliable call, so records shorter than
`min_chars` are kept without a verdict (counted as "too short to judge").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.records import Part, Record, Reject
from tunesmith.errors import ConfigError


class LanguageSettings(StepSettings):
    """Language identification (py3langid): keep the listed languages detected above a score."""

    name: Literal["langid"] = "langid"
    languages: list[str] = Field(["en"], min_length=1, description="ISO 639-1 codes to keep, e.g. [en, fr].")
    min_score: float = Field(0.65, ge=0, le=1, description="Lowest probability of a kept language (datatrove: 0.65).")
    min_chars: int = Field(20, ge=0, description="Shorter texts are kept without a verdict (too little evidence).")
    part: Part = Field("all", description="Which texts are judged: all, prompt or response.")

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, languages: list[str]) -> list[str]:
        known = set(_identifier().nb_classes)
        unknown = [code for code in languages if code not in known]
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return languages


@lru_cache(maxsize=1)
def _identifier():
    # Loaded once per process (each worker loads its own); about 0.3 s.
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise ConfigError("steps.langid: needs the py3langid package (pip install py3langid)") from None

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter(RecordFilter):
    def __init__(self, settings: LanguageSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.identifier = _identifier()
        self.keep = set(settings.languages)

    def check(self, record: Record) -> Reject | None:
        text = " ".join(record.text(self.settings.part).split())
        if len(text) < self.settings.min_chars:
            self.counts["too short to judge"] += 1
            return None
        language, score = self.identifier.classify(text)
        self.counts[f"detected {language}"] += 1
        if language in self.keep and score >= self.settings.min_score:
            return None
        if language in self.keep:
            reason = f"language score too low: {language} {score:.2f} < {self.settings.min_score}"
        else:
            reason = f"language not kept: {language} ({score:.2f})"
        return reject(record, self.name, reason, language=language, score=round(score, 4),
                      languages=self.settings.languages, threshold=self.settings.min_score)


register_step(LanguageSettings, LanguageFilter, parallel=True)
