"""Readers: every file format, real data from ../shared/data, sources that point at the right line."""

from __future__ import annotations

import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.readers import read_records
from tunesmith.errors import DataError


def test_gsm8k_jsonl_streams_every_line_with_its_line_number(shared_data):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    records = list(read_records(path))
    assert len(records) == 7473
    assert records[0].source == f"{path}:1"
    assert records[-1].source == f"{path}:7473"
    assert set(records[0].fields) == {"question", "answer"}
    assert all(record.fields is not None for record in records)


def test_json_list_sources_name_the_line_where_each_object_starts(shared_data):
    path = shared_data / "preference" / "dpo_en_demo.json"
    records = list(read_records(path))
    assert len(records) == 300
    assert "conversations" in records[0].fields and "chosen" in records[0].fields
    lines = path.read_text(encoding="utf-8").splitlines()
    for record in (records[0], records[1], records[-1]):
        line = int(record.source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"


def test_kto_json_reads_messages(shared_data):
    records = list(read_records(shared_data / "preference" / "kto_en_demo.json"))
    assert len(records) == 300
    assert records[0].fields["messages"][0]["role"] == "user"
    assert isinstance(records[0].fields["label"], bool)


def test_tsv_with_header_is_detected(shared_data):
    path = shared_data / "classification" / "sst2_test.tsv"
    records = list(read_records(path))
    assert len(records) == 872
    assert set(records[0].fields) == {"sentence", "label"}
    assert records[0].source == f"{path}:2"


def test_tsv_without_header_gets_numbered_columns(shared_data):
    path = shared_data / "classification" / "agnews_test.tsv"
    first = list(islice(read_records(path), 3))
    assert first[0].source == f"{path}:1"
    assert set(first[0].fields) == {"0", "1"}
    assert first[0].fields["1"] == "Business"


def test_folder_of_csv_files_is_read_recursively_in_sorted_order(shared_data):
    folder = shared_data / "benchmark" / "mmlu" / "dev"
    records = list(read_records(folder))
    assert len(records) == 285
    assert set(records[0].fields) == {"question", "choice0", "choice1", "choice2", "choice3", "answer"}
    sources = [record.source.rsplit(":", 1)[0] for record in records]
    assert sources == sorted(sources)


def test_csv_quoted_field_spanning_lines_keeps_its_starting_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"first\nrecord",a\nsecond,b\n', encoding="utf-8")
    records = list(read_records(path))
    assert [record.fields for record in records] == [
        {"text": "first\nrecord", "label": "a"},
        {"text": "second", "label": "b"},
    ]
    assert [record.source.rsplit(":", 1)[1] for record in records] == ["2", "4"]


@pytest.mark.parametrize(
    ("content", "header", "first_fields"),
    [
        ("review,stars\ngood,5\nbad,1\n", "auto", {"review": "good", "stars": "5"}),  # numeric column below
        ("hello,1\nworld,0\n", "auto", {"0": "hello", "1": "1"}),
        ("a,b\nc,d\n", "auto", {"0": "a", "1": "b"}),  # nothing marks a header
        ("a,b\nc,d\n", "yes", {"a": "c", "b": "d"}),
        ("text,label\nx,y\n", "no", {"0": "text", "1": "label"}),
    ],
)
def test_csv_header_modes(tmp_path, content, header, first_fields):
    path = tmp_path / "data.csv"
    path.write_text(content, encoding="utf-8")
    assert next(read_records(path, header)).fields == first_fields


def test_a_mapped_column_name_marks_a_header(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("body,sentiment\nnice,pos\n", encoding="utf-8")
    assert next(read_records(path, column_names=["body"])).fields == {"body": "nice", "sentiment": "pos"}


def test_wrong_column_count_is_an_error_record(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\na\t1\nb\t2\textra\n", encoding="utf-8")
    records = list(read_records(path))
    assert records[0].fields == {"text": "a", "label": "1"}
    assert records[1].fields is None
    assert records[1].source == f"{path}:3"
    assert "expected 2 columns, found 3" in records[1].error


def test_parquet_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]}), path)
    records = list(read_records(path))
    assert [record.fields for record in records][1] == {"text": "b", "label": 1}
    assert records[2].source == f"{path}:row 3"


def test_corrupt_jsonl_lines_come_back_as_error_records(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n\n[1, 2]\n{"text": "fine"}\n', encoding="utf-8")
    records = list(read_records(path))
    assert [record.source for record in records] == [f"{path}:{line}" for line in (1, 2, 4, 5)]
    assert records[1].fields is None and "not valid JSON" in records[1].error
    assert records[1].raw == '{"text": broken'
    assert records[2].fields is None and "expected a JSON object, got list" in records[2].error
    assert records[3].fields == {"text": "fine"}


def test_json_list_with_a_non_object_and_a_syntax_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  "oops",\n  {"text": "b"},\n  {"text": \n]', encoding="utf-8")
    records = list(read_records(path))
    assert records[0].fields == {"text": "a"} and records[0].source == f"{path}:2"
    assert records[1].fields is None and records[1].source == f"{path}:3"
    assert records[2].fields == {"text": "b"}
    assert records[3].fields is None and "not valid JSON" in records[3].error
    assert len(records) == 4


def test_json_file_holding_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps({"text": str(index)}) + "\n" for index in range(3)), encoding="utf-8")
    assert [record.fields["text"] for record in read_records(path)] == ["0", "1", "2"]


def test_folder_reads_data_files_only(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "part.jsonl").write_text('{"text": "second"}\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n', encoding="utf-8")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    assert [record.fields["text"] for record in read_records(tmp_path)] == ["first", "second"]


def test_missing_file_and_unknown_extension_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl: file not found"):
        list(read_records(tmp_path / "nothing.jsonl"))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match="data.xml: unknown data file type"):
        list(read_records(odd))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        list(read_records(empty))
