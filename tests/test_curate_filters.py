"""The web-text quality rules (Gopher quality and repetition, C4, FineWeb) and output standardisation,
one rule at a time, on records crafted to sit exactly at a rule's default threshold and one step past
it. The defaults and comparisons are datatrove's (src/datatrove/pipeline/filters/
gopher_quality_filter.py, gopher_repetition_filter.py, c4_filters.py, fineweb_quality_filter.py):
Gopher and C4 remove a record strictly past a threshold, FineWeb removes one *at* its line-punctuation,
short-line and duplicated-character thresholds. A rule under test runs with the others switched off
(`null` / `{}`), so a failure names the rule that broke.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.curate import STEPS
from tunesmith.curate.base import StepContext
from tunesmith.curate.records import Record

GOPHER_QUALITY_RULES = ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length",
                        "max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                        "min_alpha_words_ratio", "min_stop_words")
GOPHER_REPETITION_RULES = ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac")
FINEWEB_RULES = ("line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio")


def run_step(step: dict, fields: dict | str):
    """(kept record or None, reject or None, counts) of one step on one record."""
    settings = STEPS.get(step["name"]).settings.model_validate(step)
    built = STEPS.get(step["name"]).build(settings, StepContext(output_dir=Path(".")))
    record = Record({"text": fields} if isinstance(fields, str) else fields, "crafted.jsonl:1", 0, "crafted.jsonl")
    output = built.process([record])
    assert len(output.kept) + len(output.rejected) == 1
    return (output.kept[0] if output.kept else None), (output.rejected[0] if output.rejected else None), output.counts


def only(name: str, rules: tuple[str, ...], keep: str, **extra) -> dict:
    """Settings for step `name` with every rule in `rules` but `keep` switched off."""
    return {"name": name, **{rule: None for rule in rules if rule != keep}, **extra}


def assert_verdict(step: dict, text: str, rule: str | None, value: float | None = None, threshold=None):
    kept, rejected, _ = run_step(step, text)
    if rule is None:
        assert rejected is None, rejected and rejected.evidence
        return
    assert kept is None and rejected.step == step["name"], f"expected {rule} to remove the record"
    assert rejected.evidence["rule"] == rule
    assert rejected.reason.split(":")[0].endswith(rule)
    assert rejected.evidence["value"] == pytest.approx(value)
    assert rejected.evidence["threshold"] == threshold
    assert rejected.source == "crafted.jsonl:1" and rejected.record.fields["text"] == text


# --- Gopher quality (Rae et al. 2021, appendix A) -----------------------------------------------------

def gopher(keep: str) -> dict:
    return only("gopher_quality", GOPHER_QUALITY_RULES, keep)


def prose(words: int) -> str:
    """`words` words, half of them the stop word "the", mean length 4.5, ending in a full stop."""
    return " ".join(["the", "garden"] * (words // 2) + ["garden"] * (words % 2)) + "."


def test_gopher_defaults_pass_ordinary_prose():
    text = ("The garden behind the old house was planted with roses and tall sunflowers. "
            "Every summer the children played there with the dog until it was dark. ") * 3
    assert_verdict({"name": "gopher_quality"}, text, None)


@pytest.mark.parametrize(("words", "removed"), [(50, False), (49, True)])
def test_gopher_min_doc_words(words, removed):
    assert_verdict(gopher("min_doc_words"), prose(words), "min_doc_words" if removed else None, words, 50)


@pytest.mark.parametrize(("words", "removed"), [(100_000, False), (100_001, True)])
def test_gopher_max_doc_words(words, removed):
    assert_verdict(gopher("max_doc_words"), prose(words), "max_doc_words" if removed else None, words, 100_000)


@pytest.mark.parametrize(("short_words", "removed"), [(0, False), (1, True)])
def test_gopher_min_avg_word_length(short_words, removed):
    # 50 words of 3 letters: mean exactly 3; one 2-letter word makes it 149 / 50 = 2.98.
    text = " ".join(["cat"] * (50 - short_words) + ["at"] * short_words) + "."
    assert_verdict(gopher("min_avg_word_length"), text, "min_avg_word_length" if removed else None, 2.98, 3)


@pytest.mark.parametrize(("extra_letters", "removed"), [(0, False), (1, True)])
def test_gopher_max_avg_word_length(extra_letters, removed):
    # 2 x "the" + 46 x 10 letters + 2 x 17 letters = 500 letters over 50 words: mean exactly 10.
    words = ["the", "the"] + ["abcdefghij"] * 46 + ["abcdefghijklmnopq", "abcdefghijklmnopq" + "r" * extra_letters]
    assert_verdict(gopher("max_avg_word_length"), " ".join(words), "max_avg_word_length" if removed else None,
                   10.02, 10)


@pytest.mark.parametrize(("symbol", "rule"), [("#", "max_symbol_word_ratio (hash)"),
                                              ("...", "max_symbol_word_ratio (ellipsis)")])
@pytest.mark.parametrize(("count", "removed"), [(5, False), (6, True)])
def test_gopher_max_symbol_word_ratio(symbol, rule, count, removed):
    # Symbols over the 50 non-punctuation words: 5 / 50 = 0.1 is the limit, 6 / 50 past it.
    text = prose(50)[:-1] + f" {symbol}" * count + " ."
    assert_verdict(gopher("max_symbol_word_ratio"), text, rule if removed else None, 0.12, 0.1)


@pytest.mark.parametrize(("bullets", "removed"), [(9, False), (10, True)])
def test_gopher_max_bullet_lines_ratio(bullets, removed):
    lines = ["• " + prose(6)] * bullets + [prose(6)] * (10 - bullets)
    assert_verdict(gopher("max_bullet_lines_ratio"), "\n".join(lines), "max_bullet_lines_ratio" if removed else None,
                   1.0, 0.9)


@pytest.mark.parametrize(("trailing", "removed"), [(3, False), (4, True)])
def test_gopher_max_ellipsis_lines_ratio(trailing, removed):
    lines = [prose(6)[:-1] + " ..."] * trailing + [prose(6)] * (10 - trailing)
    assert_verdict(gopher("max_ellipsis_lines_ratio"), "\n".join(lines),
                   "max_ellipsis_lines_ratio" if removed else None, 0.4, 0.3)


@pytest.mark.parametrize(("numbers", "removed"), [(10, False), (11, True)])
def test_gopher_min_alpha_words_ratio(numbers, removed):
    # Words holding a letter over all 50 words: 40 / 50 = 0.8 is the limit, 39 / 50 below it.
    words = ["the", "garden"] * 25
    words[:numbers] = ["1234"] * numbers
    assert_verdict(gopher("min_alpha_words_ratio"), " ".join(words), "min_alpha_words_ratio" if removed else None,
                   0.78, 0.8)


@pytest.mark.parametrize(("stop_words", "removed"), [(2, False), (1, True)])
def test_gopher_min_stop_words(stop_words, removed):
    text = " ".join(["garden"] * 48 + ["The", "with"][:stop_words]) + "."
    assert_verdict(gopher("min_stop_words"), text, "min_stop_words" if removed else None, 1, 2)


# --- Gopher repetition (Rae et al. 2021, table A1) -------------------------------------------------------

def repetition(keep: str | None, **extra) -> dict:
    return {**only("gopher_repetition", GOPHER_REPETITION_RULES, keep or ""), "top_n_grams": {}, "dup_n_grams": {},
            **extra}


def numbered(count: int, separator: str, repeats: int) -> str:
    """`count` parts, the last `repeats` of them copies of the first."""
    parts = [f"part number {index} of the text" for index in range(count - repeats)]
    return separator.join(parts + [parts[0]] * repeats)


@pytest.mark.parametrize(("unit", "separator"), [("line", "\n"), ("para", "\n\n")])
@pytest.mark.parametrize(("repeats", "removed"), [(3, False), (4, True)])
def test_gopher_duplicate_fraction(unit, separator, repeats, removed):
    # 10 lines (or paragraphs), 3 of them duplicates: 0.3 is the limit, 4 / 10 past it.
    rule = f"dup_{unit}_frac"
    assert_verdict(repetition(rule), numbered(10, separator, repeats), rule if removed else None, 0.4, 0.3)


@pytest.mark.parametrize(("unit", "separator"), [("line", "\n"), ("para", "\n\n")])
@pytest.mark.parametrize(("filler", "removed"), [(0, False), (-1, True)])
def test_gopher_duplicate_character_fraction(unit, separator, filler, removed):
    # A 20-character part twice plus filler, 100 characters in all: 20 / 100 = 0.2 is the limit.
    part = "twenty characters!!!"
    head = part + separator + part + separator
    text = head + "x" * (100 - len(head) + filler)
    rule = f"dup_{unit}_char_frac"
    assert_verdict(repetition(rule), text, rule if removed else None, 20 / 99, 0.2)


def gram_of(n: int, characters: int, count_spaces: bool) -> str:
    """n distinct space-separated words, `characters` long (with or without the spaces)."""
    others = list("bcdefghij"[:n - 1])
    first = "a" * (characters - len(others) - (len(others) if count_spaces else 0))
    return " ".join([first, *others])


@pytest.mark.parametrize(("n", "limit"), [(2, 0.2), (3, 0.18), (4, 0.16)])
@pytest.mark.parametrize(("length", "removed"), [(100, False), (99, True)])
def test_gopher_top_n_gram(n, limit, length, removed):
    # The gram (spaces included) twice makes `limit` of a 100-character text; 99 characters pass it.
    gram = gram_of(n, round(limit * 100 / 2), count_spaces=True)
    head = f"{gram} {gram} "
    text = head + "z" * (length - len(head))
    assert_verdict(repetition(None, top_n_grams={n: limit}), text, f"top_{n}_gram" if removed else None,
                   len(gram) * 2 / 99, limit)


@pytest.mark.parametrize(("n", "limit"), [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
@pytest.mark.parametrize(("length", "removed"), [(100, False), (99, True)])
def test_gopher_duplicated_n_grams(n, limit, length, removed):
    # datatrove counts a repeated n-gram's characters without spaces: the repeat holds limit * 100.
    gram = gram_of(n, round(limit * 100), count_spaces=False)
    head = f"{gram} {gram} "
    text = head + "z" * (length - len(head))
    assert_verdict(repetition(None, dup_n_grams={n: limit}), text, f"dup_{n}_grams" if removed else None,
                   round(limit * 100) / 99, limit)


def test_gopher_top_gram_needs_a_repeat():
    # Departure from datatrove, documented in filters.py: a bigram seen once is not repetition.
    assert_verdict(repetition(None, top_n_grams={2: 0.2}), "short record here", None)


# --- C4 (Raffel et al. 2020, section 2.2) -------------------------------------------------------------------

SENTENCE = "The river runs past the mill."


def c4_text(sentences: int, *other_lines: str) -> str:
    return "\n".join([SENTENCE] * sentences + list(other_lines))


@pytest.mark.parametrize(("sentences", "removed"), [(5, False), (4, True)])
def test_c4_min_sentences(sentences, removed):
    kept, rejected, _ = run_step({"name": "c4"}, c4_text(sentences))
    if removed:
        assert rejected.evidence == {"rule": "min_sentences", "value": 4, "threshold": 5}
        assert rejected.reason == "c4 min_sentences: 4 < 5"
    else:
        assert kept.fields["text"] == c4_text(5)


@pytest.mark.parametrize(("line", "count"), [
    ("This line has no terminal punctuation", "no terminal punctuation"),
    ("This line trails off...", "no terminal punctuation"),
    ("Two words.", "few words"),
    ("Please enable Javascript to see this page.", "javascript"),
    ("Read our privacy policy before you go.", "policy"),
    ("A word of " + "x" * 1001 + " letters.", "long word"),
])
def test_c4_drops_lines_and_counts_why(line, count):
    kept, rejected, counts = run_step({"name": "c4"}, c4_text(5, line))
    assert rejected is None and kept.fields["text"] == c4_text(5)
    assert counts == {f"c4 lines dropped: {count}": 1}


@pytest.mark.parametrize(("line", "kept_line"), [
    ("Three words here.", True),  # min_words_per_line 3: kept at the limit
    ("A word of " + "x" * 1000 + " letters.", True),  # max_word_length 1000: kept at the limit
    ("It rose in 1850.[1] Then it fell.[edit]", True),  # citations removed, line kept
])
def test_c4_keeps_lines_at_the_limits(line, kept_line):
    kept, rejected, _ = run_step({"name": "c4"}, c4_text(4, line))
    assert rejected is None
    assert kept.fields["text"].splitlines()[-1] == line.replace("[1]", "").replace("[edit]", "")


@pytest.mark.parametrize(("line", "rule"), [
    ("Lorem ipsum dolor sit amet.", "lorem_ipsum"),
    ("Set the value to {x} first.", "curly_bracket"),
])
def test_c4_removes_whole_records(line, rule):
    _, rejected, _ = run_step({"name": "c4"}, c4_text(5, line))
    assert rejected.evidence["rule"] == rule and rejected.reason.startswith(f"c4 {rule}")
    kept, _, _ = run_step({"name": "c4", rule: False}, c4_text(5, line))
    assert kept is not None  # each rule switches off on its own


def test_c4_javascript_line_dropped_before_the_bracket_rule():
    # datatrove's order: a line that mentions javascript is dropped, so its '{' removes nothing.
    kept, rejected, _ = run_step({"name": "c4"}, c4_text(5, "Your javascript code {here} is off."))
    assert rejected is None and kept.fields["text"] == c4_text(5)


# --- FineWeb (Penedo et al. 2024, section 3.3) ------------------------------------------------------------

def fineweb(keep: str, **extra) -> dict:
    return {**only("fineweb", FINEWEB_RULES, keep), **extra}


LONG_LINE = "a line that is well over thirty characters long"


@pytest.mark.parametrize(("punctuated", "removed"), [(4, False), (3, True)])
def test_fineweb_line_punct_ratio(punctuated, removed):
    # 3 of 25 lines ending in punctuation is 0.12: removed at the threshold, as in datatrove.
    text = "\n".join([LONG_LINE + "."] * punctuated + [LONG_LINE] * (25 - punctuated))
    assert_verdict(fineweb("line_punct_thr"), text, "line_punct_ratio" if removed else None, 0.12, 0.12)


def test_fineweb_line_punct_exclude_zero():
    text = "\n".join([LONG_LINE] * 5)
    assert_verdict(fineweb("line_punct_thr"), text, "line_punct_ratio", 0.0, 0.12)
    assert_verdict(fineweb("line_punct_thr", line_punct_exclude_zero=True), text, None)


@pytest.mark.parametrize(("short", "removed"), [(66, False), (67, True)])
def test_fineweb_short_line_ratio(short, removed):
    # Lines of at most 30 characters; 67 of 100 is 0.67: removed at the threshold.
    text = "\n".join(["x" * 30] * short + [LONG_LINE] * (100 - short))
    assert_verdict(fineweb("short_line_thr"), text, "short_line_ratio" if removed else None, 0.67, 0.67)


@pytest.mark.parametrize(("filler", "removed"), [(981, False), (980, True)])
def test_fineweb_char_dup_ratio(filler, removed):
    # A 10-character line twice plus filler: 10 / 1000 non-newline characters is 0.01, removed.
    text = "ten chars.\nten chars.\n" + "y" * filler
    assert_verdict(fineweb("char_duplicates_ratio"), text, "char_dup_ratio" if removed else None, 0.01, 0.01)


@pytest.mark.parametrize(("words", "removed"), [(10, False), (9, True)])
def test_fineweb_list_ratio(words, removed):
    # 3 newlines over 10 words is 0.3, kept (datatrove removes strictly above); over 9 words, removed.
    text = "\n".join(["one two three", "four five six", "seven eight", "nine ten" if words == 10 else "nine"])
    assert_verdict(fineweb("new_line_ratio"), text, "list_ratio" if removed else None, 3 / 9, 0.3)


def test_fineweb_defaults_pass_prose_and_reject_empty():
    text = "The mill was built in 1850 by the river.\nIt ground flour for the town until the war came."
    assert_verdict({"name": "fineweb"}, text, None)
    _, rejected, _ = run_step({"name": "fineweb"}, "  \n ")
    assert rejected.evidence["rule"] == "empty"


# --- output standardisation ------------------------------------------------------------------------------------

def test_standardise_layout():
    fields = {"prompt": "Sum?\r\n", "response": "  Step one.  \r\nStep two.\r\r\r\r\rAnswer: 4  "}
    kept, _, counts = run_step({"name": "standardise"}, fields)
    assert kept.fields == {"prompt": "Sum?", "response": "Step one.\nStep two.\n\nAnswer: 4"}
    assert counts == {"records re-laid out": 1}
    kept, _, _ = run_step({"name": "standardise", "max_blank_lines": None, "line_endings": False},
                          {"response": "a\n\n\n\nb  "})
    assert kept.fields["response"] == "a\n\n\n\nb"
    kept, _, counts = run_step({"name": "standardise"}, {"response": "already clean"})
    assert kept.fields["response"] == "already clean" and counts == {}


def test_standardise_answer_rules_rewrite_and_require():
    rules = [{"name": "gsm8k answer", "pattern": r"####\s*(\d+)\s*$", "replace": r"The answer is \1."},
             {"name": "has answer", "pattern": r"The answer is \d+\.$", "required": True}]
    kept, _, counts = run_step({"name": "standardise", "rules": rules},
                               {"question": "2+2? #### 9", "answer": "2+2=4\n#### 4"})
    assert kept.fields == {"question": "2+2? #### 9", "answer": "2+2=4\nThe answer is 4."}  # prompt untouched
    assert counts == {"rule 'gsm8k answer' rewrote": 1}
    _, rejected, _ = run_step({"name": "standardise", "rules": rules}, {"question": "2+2?", "answer": "four"})
    assert rejected.reason == "response does not match rule 'has answer'"
    assert rejected.evidence == {"pattern": r"The answer is \d+\.$"}
    assert rejected.record.fields["answer"] == "four"


def test_standardise_rejects_a_bad_pattern_naming_the_key():
    from tunesmith.curate import CurateConfig

    with pytest.raises(ValueError, match=r"step 0 \(standardise\)\.rules\.0\.pattern: not a valid regular expression"):
        CurateConfig(steps=[{"name": "standardise", "rules": [{"pattern": "(unclosed"}]}])
