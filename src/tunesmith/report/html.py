"""A small builder for self-contained HTML reports (no external assets, opens offline).

Stages build a Report section by section: headline numbers, tables, matplotlib figures
(embedded as PNG data URIs), and free text. Everything user-provided is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { display: flex; gap: 1rem; flex-wrap: wrap; }
.headline div { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; }
.headline b { display: block; font-size: 1.4rem; }
.warning { background: #fff4e0; border-left: 4px solid #f0a000; padding: 0.4rem 0.8rem; }
pre { white-space: pre-wrap; background: #f8f8f8; padding: 0.5rem; }
img { max-width: 100%; }
"""


def figure_to_data_uri(figure) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


class Report:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str, element_id: str | None = None) -> Report:
        anchor = f' id="{html.escape(element_id)}"' if element_id else ""
        self.parts.append(f"<h2{anchor}>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> Report:
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def preformatted(self, text: str) -> Report:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def warning(self, text: str) -> Report:
        self.parts.append(f'<p class="warning">{html.escape(text)}</p>')
        return self

    def headline(self, numbers: dict[str, Any]) -> Report:
        """Big numbers in boxes: {"records in": 1000, "kept": 950}."""
        shown = {label: f"{value:.4g}" if isinstance(value, float) else str(value) for label, value in numbers.items()}
        boxes = "".join(f"<div>{html.escape(label)}<b>{html.escape(value)}</b></div>" for label, value in shown.items())
        self.parts.append(f'<div class="headline">{boxes}</div>')
        return self

    def table(self, rows: Iterable[Sequence[Any]], columns: Sequence[str], element_id: str | None = None) -> Report:
        anchor = f' id="{html.escape(element_id)}"' if element_id else ""
        header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
        body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
        self.parts.append(f"<table{anchor}><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, figure, caption: str = "") -> Report:
        alt = html.escape(caption or "figure")
        self.parts.append(f'<figure><img alt="{alt}" src="{figure_to_data_uri(figure)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return self

    def render(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>\n"
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
