"""The HTML report of a run."""

from mneme_plugin.report.html import SECTIONS, Context, ReportData, render_report, write_report

__all__ = ["SECTIONS", "Context", "ReportData", "render_report", "write_report"]
