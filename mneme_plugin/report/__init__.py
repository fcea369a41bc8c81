"""The HTML report of a run."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.report.html": ("SECTIONS", "Context", "ReportData", "render_report", "write_report"),
})
