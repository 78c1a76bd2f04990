"""Text clean-up steps that edit records and never remove one: `normalise` before the filters,
`standardise` (whitespace, line endings, answer-format rules) on the way out."""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.records import Part, Record, Reject
from tunesmith.settings import Section

# C0/C1 control characters except tab and newline (which carry layout); DEL included.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_HTML_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class NormaliseSettings(StepSettings):
    """Unicode normal form, broken encodings, control characters, stray HTML, whitespace."""

    name: Literal["normalise"] = "normalise"
    form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normal form; NFKC also folds compatibility forms (ﬁ -> fi, full-width -> ASCII)."
    )
    fix_encoding: bool = Field(True, description="Repair mojibake (UTF-8 read as Latin-1 and the like) with ftfy.")
    control_chars: bool = Field(True, description="Remove control characters other than tab and newline.")
    strip_html: bool = Field(True, description="Remove HTML tags and decode entities (&amp; -> &).")
    whitespace: bool = Field(True, description="Collapse runs of spaces, trim lines, at most one blank line.")


class Normalise(RecordFilter):
    def __init__(self, settings: NormaliseSettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def clean(self, text: str) -> str:
        settings = self.settings
        if settings.fix_encoding:
            import ftfy

            text = ftfy.fix_text(text, normalization=None)  # our own `form` decides the normal form
        if settings.strip_html and ("<" in text or "&" in text):
            text = _HTML_TAG.sub(" ", text)
            if _HTML_ENTITY.search(text):
                text = html.unescape(text)
        if settings.form != "none":
            text = unicodedata.normalize(settings.form, text)
        if settings.control_chars:
            text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if settings.whitespace:
            text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
            text = _BLANK_LINES.sub("\n\n", text).strip()
        return text

    def check(self, record: Record) -> Reject | None:
        if record.edit_texts(self.clean):
            self.counts["records changed"] += 1
        return None


class AnswerRule(Section):
    """A rule on response text: rewrite with `pattern` -> `replace`, or require `pattern` to match."""

    name: str = Field("rule", description="Label for this rule in the report.")
    pattern: str = Field(description="Python regular expression, searched in each response.")
    replace: str | None = Field(None, description="Replacement (\\1 for groups); unset: the rule only requires.")
    required: bool = Field(False, description="Remove records whose response does not match `pattern`.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression ({error})") from None
        return pattern


class StandardiseSettings(StepSettings):
    """Consistent output: line endings, trailing spaces, blank lines, answer format rules (regex)."""

    name: Literal["standardise"] = "standardise"
    line_endings: bool = Field(True, description="\\r\\n and \\r become \\n.")
    trailing_spaces: bool = Field(True, description="Strip spaces at line ends and around the text.")
    max_blank_lines: int | None = Field(1, ge=0, description="Collapse longer runs of blank lines; null keeps them.")
    rules: list[AnswerRule] = Field(default_factory=list, description="Answer format rules, applied in order.")
    part: Part = Field("response", description="Which texts the rules apply to: response, prompt or all.")


class Standardise(RecordFilter):
    def __init__(self, settings: StandardiseSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.rules = [(rule, re.compile(rule.pattern)) for rule in settings.rules]
        limit = settings.max_blank_lines
        self.blank = re.compile(rf"\n{{{limit + 2},}}") if limit is not None else None

    def layout(self, text: str) -> str:
        if self.settings.line_endings:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.settings.trailing_spaces:
            text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
        if self.blank is not None:
            text = self.blank.sub("\n" * (self.settings.max_blank_lines + 1), text)
        return text

    def check(self, record: Record) -> Reject | None:
        if record.edit_texts(self.layout):
            self.counts["records re-laid out"] += 1
        for rule, pattern in self.rules:
            texts = record.texts(self.settings.part)
            if rule.required and not any(pattern.search(text) for text in texts):
                return reject(record, self.name, f"response does not match rule {rule.name!r}", pattern=rule.pattern)
            if rule.replace is not None and record.edit_texts(
                lambda text, pattern=pattern, rule=rule: pattern.sub(rule.replace, text), self.settings.part
            ):
                self.counts[f"rule {rule.name!r} rewrote"] += 1
        return None


register_step(NormaliseSettings, Normalise, parallel=True)
register_step(StandardiseSettings, Standardise, parallel=True)
