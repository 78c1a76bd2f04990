"""Filters that keep or remove one record at a time: length, and the published web-text quality
heuristics (Gopher quality and repetition, C4 line rules, FineWeb), with datatrove's defaults.

Every threshold is a field that `null` switches off; the reject's evidence names the rule, the
measured value and the threshold. The heuristics were tuned on web pages: on short SFT records
(one line, under 50 words) most of them remove nearly everything, which is why none is on unless
listed in the pipeline.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

from pydantic import Field

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.records import Part, Record, Reject

# Word tokens as nltk's word tokenizer (which datatrove uses) roughly gives them: words and
# punctuation runs as separate tokens.
_WORD = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]+")
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—‘’“”«»•·")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# datatrove: gopher stop words (Rae et al. 2021, appendix A) and C4's policy substrings.
GOPHER_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                        "use cookies")
C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(duplicate elements, characters in them): datatrove's `find_duplicates`."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


# --- length --------------------------------------------------------------------------------------


class LengthSettings(StepSettings):
    """Minimum and maximum length in characters, words and tokens."""

    name: Literal["length"] = "length"
    part: Part = Field("all", description="Which texts are measured: all, prompt or response.")
    min_chars: int | None = Field(None, ge=0, description="Remove records with fewer characters.")
    max_chars: int | None = Field(None, ge=1, description="Remove records with more characters.")
    min_words: int | None = Field(None, ge=0, description="Remove records with fewer words.")
    max_words: int | None = Field(None, ge=1, description="Remove records with more words.")
    min_tokens: int | None = Field(None, ge=0, description="Remove records with fewer tokens (needs `tokenizer`).")
    max_tokens: int | None = Field(None, ge=1, description="Remove records with more tokens (needs `tokenizer`).")
    tokenizer: str | None = Field(
        None, description="Model whose tokenizer counts tokens: a built-in alias or a local folder (the run's model)."
    )


class Length(RecordFilter):
    def __init__(self, settings: LengthSettings, context: StepContext):
        self.name, self.settings = settings.name, settings
        self.tokenizer = None
        if settings.min_tokens is not None or settings.max_tokens is not None:
            if settings.tokenizer is None:
                from tunesmith.errors import ConfigError

                raise ConfigError("steps.length.tokenizer: min_tokens/max_tokens need a tokenizer (a model name)")
            from tunesmith.config import ModelConfig
            from tunesmith.models import load_tokenizer

            self.tokenizer = load_tokenizer(ModelConfig(name=settings.tokenizer))

    def check(self, record: Record) -> Reject | None:
        text = record.text(self.settings.part)
        settings = self.settings
        measures = [("chars", lambda: len(text)), ("words", lambda: len(text.split()))]
        if self.tokenizer is not None:
            measures.append(("tokens", lambda: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])))
        for unit, measure in measures:
            low, high = getattr(settings, f"min_{unit}"), getattr(settings, f"max_{unit}")
            if low is None and high is None:
                continue
            value = measure()
            if low is not None and value < low:
                return reject(record, self.name, f"too short: {value} {unit} < {low}", rule=f"min_{unit}",
                              value=value, threshold=low)
            if high is not None and value > high:
                return reject(record, self.name, f"too long: {value} {unit} > {high}", rule=f"max_{unit}",
                              value=value, threshold=high)
        return None


# --- Gopher (Rae et al. 2021, appendix A; datatrove GopherQualityFilter / GopherRepetitionFilter) ---


class GopherQualitySettings(StepSettings):
    """Gopher quality rules: document length, word length, symbols, bullets, alphabetic words, stop words."""

    name: Literal["gopher_quality"] = "gopher_quality"
    part: Part = Field("all", description="Which texts are judged: all, prompt or response.")
    min_doc_words: int | None = Field(50, description="Fewest non-symbol words.")
    max_doc_words: int | None = Field(100_000, description="Most non-symbol words.")
    min_avg_word_length: float | None = Field(3, description="Shortest mean word length (characters).")
    max_avg_word_length: float | None = Field(10, description="Longest mean word length (characters).")
    max_symbol_word_ratio: float | None = Field(0.1, description="Most '#' and '...' per word.")
    max_bullet_lines_ratio: float | None = Field(0.9, description="Most lines starting with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="Most lines ending with an ellipsis.")
    min_alpha_words_ratio: float | None = Field(0.8, description="Fewest words holding a letter (as a fraction).")
    min_stop_words: int | None = Field(2, description="Fewest English stop words (the, be, to, of, and, ...).")


class GopherQuality(RecordFilter):
    def __init__(self, settings: GopherQualitySettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        found = gopher_quality_failure(record.text(self.settings.part), self.settings)
        if found is None:
            return None
        rule, value, threshold = found
        return reject(record, self.name, f"gopher {rule}: {value:.3g} vs {threshold}", rule=rule, value=value,
                      threshold=threshold)


def gopher_quality_failure(text: str, s: GopherQualitySettings) -> tuple[str, float, float] | None:
    """The first Gopher quality rule `text` fails as (rule, value, threshold), or None."""
    words = words_of(text)
    content = [word for word in words if any(char not in _PUNCTUATION for char in word)]
    # datatrove divides the symbol and alphabetic-word counts by the non-punctuation words too.
    n_words = max(len(content), 1)
    if s.min_doc_words is not None and len(content) < s.min_doc_words:
        return "min_doc_words", len(content), s.min_doc_words
    if s.max_doc_words is not None and len(content) > s.max_doc_words:
        return "max_doc_words", len(content), s.max_doc_words
    mean_length = sum(map(len, content)) / len(content) if content else 0.0
    if s.min_avg_word_length is not None and mean_length < s.min_avg_word_length:
        return "min_avg_word_length", mean_length, s.min_avg_word_length
    if s.max_avg_word_length is not None and mean_length > s.max_avg_word_length:
        return "max_avg_word_length", mean_length, s.max_avg_word_length
    if s.max_symbol_word_ratio is not None:
        for symbol, count in (("hash", text.count("#")), ("ellipsis", text.count("...") + text.count("…"))):
            if count / n_words > s.max_symbol_word_ratio:
                return f"max_symbol_word_ratio ({symbol})", count / n_words, s.max_symbol_word_ratio
    lines = text.splitlines() or [""]
    if s.max_bullet_lines_ratio is not None:
        # Departs from datatrove, which counts only "•": Markdown lists in SFT data use "-".
        ratio = sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines)
        if ratio > s.max_bullet_lines_ratio:
            return "max_bullet_lines_ratio", ratio, s.max_bullet_lines_ratio
    if s.max_ellipsis_lines_ratio is not None:
        ratio = sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)
        if ratio > s.max_ellipsis_lines_ratio:
            return "max_ellipsis_lines_ratio", ratio, s.max_ellipsis_lines_ratio
    if s.min_alpha_words_ratio is not None:
        ratio = sum(any(char.isalpha() for char in word) for word in words) / n_words
        if ratio < s.min_alpha_words_ratio:
            return "min_alpha_words_ratio", ratio, s.min_alpha_words_ratio
    if s.min_stop_words is not None:
        # Departs from datatrove (case-sensitive): "The" at a sentence start is a stop word too.
        count = sum(word.lower() in GOPHER_STOP_WORDS for word in words)
        if count < s.min_stop_words:
            return "min_stop_words", count, s.min_stop_words
    return None


class GopherRepetitionSettings(StepSettings):
    """Gopher repetition rules: duplicate lines and paragraphs, top n-grams, duplicated n-grams."""

    name: Literal["gopher_repetition"] = "gopher_repetition"
    part: Part = Field("all", description="Which texts are judged: all, prompt or response.")
    dup_line_frac: float | None = Field(0.3, description="Most duplicate lines, as a fraction of lines.")
    dup_para_frac: float | None = Field(0.3, description="Most duplicate paragraphs, as a fraction of paragraphs.")
    dup_line_char_frac: float | None = Field(0.2, description="Most characters in duplicate lines.")
    dup_para_char_frac: float | None = Field(0.2, description="Most characters in duplicate paragraphs.")
    top_n_grams: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> most characters in the most frequent n-gram; {} disables."
    )
    dup_n_grams: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> most characters in repeated n-grams; {} disables.",
    )


class GopherRepetition(RecordFilter):
    def __init__(self, settings: GopherRepetitionSettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        found = gopher_repetition_failure(record.text(self.settings.part), self.settings)
        if found is None:
            return None
        rule, value, threshold = found
        return reject(record, self.name, f"gopher {rule}: {value:.3g} > {threshold}", rule=rule, value=value,
                      threshold=threshold)


def gopher_repetition_failure(text: str, s: GopherRepetitionSettings) -> tuple[str, float, float] | None:
    if not text:
        return None
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p]
    lines = [line for line in re.split(r"\n+", text) if line]
    for unit, parts, frac, char_frac in (("para", paragraphs, s.dup_para_frac, s.dup_para_char_frac),
                                         ("line", lines, s.dup_line_frac, s.dup_line_char_frac)):
        count, chars = _duplicates(parts)
        if frac is not None and parts and count / len(parts) > frac:
            return f"dup_{unit}_frac", count / len(parts), frac
        if char_frac is not None and chars / len(text) > char_frac:
            return f"dup_{unit}_char_frac", chars / len(text), char_frac
    words = words_of(text)
    for n, frac in sorted(s.top_n_grams.items()):
        grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
        if not grams:
            continue
        gram, count = grams.most_common(1)[0]
        # Departs from datatrove, which also counts a gram seen once: on a short record any bigram is
        # then "20% of the text" although nothing repeats. Repetition needs a second occurrence.
        if count > 1 and len(gram) * count / len(text) > frac:
            return f"top_{n}_gram", len(gram) * count / len(text), frac
    for n, frac in sorted(s.dup_n_grams.items()):
        seen: set[str] = set()
        repeated = index = 0
        while index < len(words) - n + 1:  # datatrove's find_all_duplicate: repeats are skipped whole
            gram = "".join(words[index:index + n])
            if gram in seen:
                repeated += len(gram)
                index += n
            else:
                seen.add(gram)
                index += 1
        if repeated / len(text) > frac:
            return f"dup_{n}_grams", repeated / len(text), frac
    return None


# --- C4 (Raffel et al. 2020, section 2.2; datatrove C4QualityFilter) -----------------------------


class C4Settings(StepSettings):
    """C4 line rules: drop lines without terminal punctuation, short lines, javascript and policy lines;
    remove documents with lorem ipsum, curly brackets or too few sentences."""

    name: Literal["c4"] = "c4"
    part: Part = Field("all", description="Which texts are judged and cleaned: all, prompt or response.")
    remove_citations: bool = Field(True, description="Remove wiki citation marks like [1], [edit].")
    terminal_punctuation: bool = Field(True, description="Drop lines not ending in . ? ! \" or ' (or ending in ...).")
    min_words_per_line: int | None = Field(3, description="Drop lines with fewer words.")
    max_word_length: int | None = Field(1000, description="Drop lines holding a longer word.")
    javascript: bool = Field(True, description="Drop lines mentioning javascript.")
    policy: bool = Field(True, description="Drop lines about terms of use, privacy or cookie policies.")
    lorem_ipsum: bool = Field(True, description="Remove records containing 'lorem ipsum'.")
    curly_bracket: bool = Field(True, description="Remove records containing '{' (code, templates).")
    min_sentences: int | None = Field(5, description="Remove records with fewer sentences left.")


class C4(RecordFilter):
    def __init__(self, settings: C4Settings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        s = self.settings
        sentences = 0
        for container, key in record.slots(s.part):
            kept_lines = []
            for line in container[key].splitlines():
                line = line.strip()
                words = line.split()
                if s.max_word_length is not None and any(len(word) > s.max_word_length for word in words):
                    self.counts["c4 lines dropped: long word"] += 1
                    continue
                if s.remove_citations:
                    line = C4_CITATION.sub("", line)
                if s.terminal_punctuation and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                    self.counts["c4 lines dropped: no terminal punctuation"] += 1
                    continue
                if s.min_words_per_line is not None and len(words) < s.min_words_per_line:
                    self.counts["c4 lines dropped: few words"] += 1
                    continue
                lowered = line.lower()
                if s.lorem_ipsum and "lorem ipsum" in lowered:
                    return reject(record, self.name, "c4 lorem_ipsum: placeholder text", rule="lorem_ipsum")
                if s.javascript and "javascript" in lowered:
                    self.counts["c4 lines dropped: javascript"] += 1
                    continue
                if s.curly_bracket and "{" in line:
                    return reject(record, self.name, "c4 curly_bracket: '{' in text", rule="curly_bracket")
                if s.policy and any(phrase in lowered for phrase in C4_POLICY_SUBSTRINGS):
                    self.counts["c4 lines dropped: policy"] += 1
                    continue
                sentences += len([part for part in _SENTENCE_END.split(line) if part])
                kept_lines.append(line)
            container[key] = "\n".join(kept_lines).strip()
        if s.min_sentences is not None and sentences < s.min_sentences:
            return reject(record, self.name, f"c4 min_sentences: {sentences} < {s.min_sentences}",
                          rule="min_sentences", value=sentences, threshold=s.min_sentences)
        return None


# --- FineWeb (Penedo et al. 2024, section 3.3; datatrove FineWebQualityFilter) -------------------


class FineWebSettings(StepSettings):
    """FineWeb rules: lines ending in punctuation, short lines, duplicated line characters, list-like text."""

    name: Literal["fineweb"] = "fineweb"
    part: Part = Field("all", description="Which texts are judged: all, prompt or response.")
    line_punct_thr: float | None = Field(
        0.12, description="Remove records where at most this fraction of lines ends in . ? ! \" or '."
    )
    line_punct_exclude_zero: bool = Field(False, description="Do not apply line_punct_thr when no line ends so.")
    short_line_thr: float | None = Field(
        0.67, description="Remove records where at least this fraction of lines is `short_line_length` or shorter."
    )
    short_line_length: int = Field(30, description="A line this short or shorter counts as short.")
    char_duplicates_ratio: float | None = Field(
        0.01, description="Remove records with at least this fraction of characters in duplicated lines."
    )
    new_line_ratio: float | None = Field(0.3, description="Most newlines per word (list-like text).")


class FineWeb(RecordFilter):
    def __init__(self, settings: FineWebSettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        found = fineweb_failure(record.text(self.settings.part), self.settings)
        if found is None:
            return None
        rule, value, threshold = found
        return reject(record, self.name, f"fineweb {rule}: {value:.3g} vs {threshold}", rule=rule, value=value,
                      threshold=threshold)


def fineweb_failure(text: str, s: FineWebSettings) -> tuple[str, float, float] | None:
    """The first FineWeb rule `text` fails as (rule, value, threshold), or None. The comparisons are
    datatrove's: a record *at* line_punct_thr, short_line_thr or char_duplicates_ratio is removed."""
    # Departs from datatrove, which also counts blank lines (as short and unpunctuated): SFT records
    # separate paragraphs with blank lines far more often than web text does.
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty", 0, 1
    if s.line_punct_thr is not None:
        ratio = sum(line.endswith(END_PUNCTUATION) for line in lines) / len(lines)
        if ratio <= s.line_punct_thr and not (ratio == 0 and s.line_punct_exclude_zero):
            return "line_punct_ratio", ratio, s.line_punct_thr
    if s.short_line_thr is not None:
        ratio = sum(len(line) <= s.short_line_length for line in lines) / len(lines)
        if ratio >= s.short_line_thr:
            return "short_line_ratio", ratio, s.short_line_thr
    if s.char_duplicates_ratio is not None:
        ratio = _duplicates(lines)[1] / max(len(text.replace("\n", "")), 1)
        if ratio >= s.char_duplicates_ratio:
            return "char_dup_ratio", ratio, s.char_duplicates_ratio
    if s.new_line_ratio is not None:
        ratio = text.count("\n") / max(len(words_of(text)), 1)
        if ratio > s.new_line_ratio:
            return "list_ratio", ratio, s.new_line_ratio
    return None


register_step(LengthSettings, Length, parallel=True)
register_step(GopherQualitySettings, GopherQuality, parallel=True)
register_step(GopherRepetitionSettings, GopherRepetition, parallel=True)
register_step(C4Settings, C4, parallel=True)
register_step(FineWebSettings, FineWeb, parallel=True)
