"""HTML reports shared by every stage: one self-contained file with tables and embedded plots."""

from tunesmith.report.html import Report, figure_to_data_uri

__all__ = ["Report", "figure_to_data_uri"]
