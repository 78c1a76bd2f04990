"""Personal data and secrets: e-mail, phone, IP, credit card (Luhn-checked), IBAN (mod-97-checked),
API keys and tokens; each found item is replaced by a typed placeholder, or the record is dropped."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Literal

from pydantic import Field

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.records import Record, Reject


def luhn_valid(number: str) -> bool:
    digits = [int(char) for char in number if char.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in moved)) % 97 == 1


def ip_valid(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    # Version-like strings (1.2.3.4) are common in text; loopback and unspecified addresses identify no one.
    return not (address.is_loopback or address.is_unspecified)


# kind -> (pattern, extra check). Order matters: keys before phones, cards before phones.
DETECTORS: dict[str, tuple[re.Pattern, Callable[[str], bool] | None]] = {
    "EMAIL": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b"), None),
    "API_KEY": (re.compile(
        r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
        r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,}"
        r"|glpat-[A-Za-z0-9_-]{20,})"
        r"|(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"
        r"|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
    ), None),
    "IBAN": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), iban_valid),
    "CREDIT_CARD": (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), luhn_valid),
    "IP_ADDRESS": (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"), ip_valid),
    "PHONE": (re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}[ .-]?\d{3,4}\b(?![ .-]?\d)"
    ), None),
}


class PIISettings(StepSettings):
    """E-mail, phone, IP, credit card (Luhn), IBAN and API keys: redact with a typed placeholder or drop."""

    name: Literal["pii"] = "pii"
    action: Literal["redact", "drop"] = Field(
        "redact", description="Replace each item by [KIND], or remove the record."
    )
    kinds: list[Literal["EMAIL", "PHONE", "IP_ADDRESS", "CREDIT_CARD", "IBAN", "API_KEY"]] = Field(
        default_factory=lambda: list(DETECTORS), description="Which kinds are looked for."
    )


def find_pii(text: str, kinds) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each item, non-overlapping, earlier kinds in DETECTORS winning."""
    found: list[tuple[str, int, int]] = []
    for kind, (pattern, valid) in DETECTORS.items():
        if kind not in kinds:
            continue
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < other_end and other_start < end for _, other_start, other_end in found):
                continue
            if valid is None or valid(match.group()):
                found.append((kind, start, end))
    return sorted(found, key=lambda item: item[1])


def redact(text: str, items: list[tuple[str, int, int]]) -> str:
    for kind, start, end in reversed(items):
        text = f"{text[:start]}[{kind}]{text[end:]}"
    return text


class PII(RecordFilter):
    def __init__(self, settings: PIISettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        kinds = set(self.settings.kinds)
        found_kinds: list[str] = []
        for container, key in record.slots():
            items = find_pii(container[key], kinds)
            if not items:
                continue
            found_kinds += [kind for kind, _, _ in items]
            if self.settings.action == "drop":
                return reject(record, self.name, f"contains personal data ({', '.join(sorted(set(found_kinds)))})",
                              kinds=sorted(set(found_kinds)))
            container[key] = redact(container[key], items)
        for kind in found_kinds:
            self.counts[f"redacted {kind}"] += 1
        if found_kinds:
            self.counts["records redacted"] += 1
        return None


register_step(PIISettings, PII, parallel=True)
