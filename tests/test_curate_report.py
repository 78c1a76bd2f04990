"""report.html renders in a real headless browser and shows the funnel, reasons and clusters."""

from __future__ import annotations

import json

from browser import rendered_dom

from tunesmith.curate import CurateConfig, curate


def test_report_renders_with_funnel(tmp_path):
    records = [{"text": f"record number {i % 7} is about topic {i % 7} and nothing else", "label": str(i % 2)}
               for i in range(40)] + [{"text": "hi", "label": "1"}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    config = CurateConfig(steps=["normalise", {"name": "length", "min_words": 3}, "exact_dedup"])
    result = curate(config, [path], tmp_path / "out")
    assert (result.kept, result.rejected) == (7, 34)
    dom = rendered_dom(tmp_path / "out" / "report.html")
    assert 'id="funnel-table"' in dom
    for text in ("normalise", "exact_dedup", "too short", "exact duplicate", "Largest duplicate clusters"):
        assert text in dom
    assert dom.count("<img") >= 2  # funnel and length histogram figures
