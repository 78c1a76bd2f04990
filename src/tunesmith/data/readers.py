"""Read data files into raw records, one at a time, each tagged with where it came from.

Formats: JSONL, JSON (a list of objects, or JSONL saved as .json), CSV, TSV, Parquet, and a folder of
such files (read recursively, in sorted path order; files with other extensions in a folder are
ignored). A record that cannot be parsed does not stop the reader: it comes back with `fields=None`
and an `error`, so the caller applies `data.on_error` and the count read = kept + rejected holds.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from tunesmith.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

# A first CSV/TSV row holding one of these (case-insensitive) is a header under `header: auto`.
KNOWN_FIELD_NAMES = frozenset([
    "text", "label", "sentence", "question", "answer", "instruction", "input", "output", "prompt", "response",
    "messages", "conversations",
])

_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_HEADER_SNIFF_ROWS = 20


@dataclass
class RawRecord:
    """One record as read: `fields` maps column -> value, or is None when the record is unreadable.

    `source` is `file:line` (1-based; the line where the record starts), or `file:row N` for Parquet.
    `error` says why an unreadable record failed; `raw` holds its text, for the rejects file.
    """

    fields: dict | None
    source: str
    error: str | None = None
    raw: str | None = None


def read_records(path: Path, header: str = "auto", column_names: Iterable[str] = ()) -> Iterator[RawRecord]:
    """Stream the records of a file or a folder of files.

    `header` (CSV/TSV only): "yes", "no" or "auto". Auto takes the first row as a header when it
    holds a known field name (see KNOWN_FIELD_NAMES) or one of `column_names` (the columns named in
    `data.columns`), or when a column that is numeric in the next rows is not numeric in the first
    row (e.g. `review,stars`). Without a header, columns are named "0", "1", ...
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    known = KNOWN_FIELD_NAMES | {name.lower() for name in column_names}
    for file in data_files(path):
        yield from _read_file(file, header, known)


def data_files(path: Path) -> list[Path]:
    """The files `path` stands for: itself, or the data files under a folder in sorted order."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(
        file for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in SUFFIXES and not file.name.startswith(".")
    )
    if not files:
        raise DataError(f"{path}: folder holds no data files ({', '.join(SUFFIXES)})")
    return files


def _read_file(file: Path, header: str, known: frozenset[str]) -> Iterator[RawRecord]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(file)
    if suffix == ".json":
        return _read_json(file)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(file, "\t" if suffix == ".tsv" else ",", header, known)
    return _read_parquet(file)


def _record_from_json(value, source: str, raw: str) -> RawRecord:
    if isinstance(value, dict):
        return RawRecord(value, source)
    return RawRecord(None, source, f"expected a JSON object, got {type(value).__name__}", raw)


def _read_jsonl(file: Path) -> Iterator[RawRecord]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{file}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                reason = f"not valid JSON ({error.msg} at column {error.colno})"
                yield RawRecord(None, source, reason, line.rstrip("\n"))
                continue
            yield _record_from_json(value, source, line.rstrip("\n"))


def _read_json(file: Path) -> Iterator[RawRecord]:
    """A JSON list of objects, decoded element by element so each record knows its starting line.

    A file that starts with `{` is read as JSONL: many `.json` files are one object per line.
    """
    text = file.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "{":
        yield from _read_jsonl(file)
        return
    if text[start:start + 1] != "[":
        raise DataError(f"{file}:1: expected a JSON list of objects")
    decoder = json.JSONDecoder()
    position, line, counted_to = start + 1, 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    while True:
        position = _skip_space(text, position)
        if text.startswith("]", position):
            return
        source = f"{file}:{line_at(position)}"
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # The list cannot be resynchronised after a syntax error: report it and stop this file.
            excerpt = text[position:error.pos + 1][-200:]
            yield RawRecord(None, f"{file}:{error.lineno}", f"not valid JSON ({error.msg})", excerpt)
            return
        yield _record_from_json(value, source, text[position:end])
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            excerpt = text[position:position + 200]
            yield RawRecord(None, f"{file}:{line_at(position)}", "not valid JSON (expected ',' or ']')", excerpt)
            return


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _is_number(value: str) -> bool:
    return bool(_NUMBER.match(value))


def _looks_like_header(first: list[str], following: list[list[str]], known: frozenset[str]) -> bool:
    if any(cell.strip().lower() in known for cell in first):
        return True
    for column, cell in enumerate(first):
        below = [row[column] for row in following if column < len(row)]
        if below and all(_is_number(value) for value in below) and not _is_number(cell):
            return True
    return False


def _read_delimited(file: Path, delimiter: str, header: str, known: frozenset[str]) -> Iterator[RawRecord]:
    # TSV files (GLUE and the like) are not quoted and hold bare `"` inside text: read them unquoted.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(file, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        rows = _rows_with_lines(reader)
        first = next(rows, None)
        if first is None:
            return
        if header == "auto":
            peeked = [next(rows, None) for _ in range(_HEADER_SNIFF_ROWS)]
            peeked = [row for row in peeked if row is not None]
            has_header = _looks_like_header(first[1], [row for _, row in peeked], known)
            pending = iter(peeked)
        else:
            has_header, pending = header == "yes", iter(())
        if has_header:
            names = [cell.strip() for cell in first[1]]
            queue = chain(pending, rows)
        else:
            names = [str(index) for index in range(len(first[1]))]
            queue = chain([first], pending, rows)
        for line, row in queue:
            source = f"{file}:{line}"
            if len(row) != len(names):
                yield RawRecord(
                    None, source, f"expected {len(names)} columns, found {len(row)}", delimiter.join(row)
                )
                continue
            yield RawRecord(dict(zip(names, row, strict=True)), source)


def _rows_with_lines(reader) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, row), skipping blank lines; quoted fields may span lines."""
    start = 1
    for row in reader:
        if row:
            yield start, row
        start = reader.line_num + 1


def _read_parquet(file: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises several types for a broken file
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for fields in batch.to_pylist():
            number += 1
            yield RawRecord(fields, f"{file}:row {number}")
