"""The shared HTML report: self-contained, escaped, and renders in a real browser."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from browser import rendered_dom  # noqa: E402

from tunesmith.report import Report  # noqa: E402


def test_report_escapes_user_text_and_embeds_figures(tmp_path):
    figure, axes = plt.subplots()
    axes.bar(["in", "out"], [10, 7])
    report = (
        Report("curation <report>")
        .headline({"records in": 10, "kept": 7, "ratio": 0.7})
        .table([["<script>alert(1)</script>", 3, 0.5]], ["text", "count", "share"], element_id="funnel")
        .figure(figure, "funnel")
    )
    page = report.write(tmp_path / "report.html")
    text = page.read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text
    assert "data:image/png;base64," in text

    dom = rendered_dom(page)
    assert 'id="funnel"' in dom and "records in" in dom
