"""Small inline-SVG charts, so the report is one self-contained file with no plotting dependency."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

WIDTH, HEIGHT = 560, 300
MARGIN = {"left": 56, "right": 16, "top": 28, "bottom": 48}
PALETTE = ("#4269d0", "#ff725c", "#6cc5b0", "#efb118", "#a463f2", "#97bbf5", "#9c6b4e", "#3ca951")


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _frame(title: str, x_label: str, y_label: str, body: list[str]) -> str:
    w, h, m = WIDTH, HEIGHT, MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{m["left"]}" y1="{h - m["bottom"]}" x2="{w - m["right"]}" y2="{h - m["bottom"]}" stroke="#333"/>',
        f'<line x1="{m["left"]}" y1="{m["top"]}" x2="{m["left"]}" y2="{h - m["bottom"]}" stroke="#333"/>',
        f'<text x="{(m["left"] + w - m["right"]) / 2}" y="{h - 8}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="14" y="{(m["top"] + h - m["bottom"]) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(m["top"] + h - m["bottom"]) / 2})">{html.escape(y_label)}</text>',
    ]
    return "\n".join(parts + body + ["</svg>"])


def _scale(lo: float, hi: float, a: float, b: float):
    span = hi - lo if hi > lo else 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _axis_ticks(lo: float, hi: float, sx, y0: float, vertical: bool = False, sy=None, x0: float = 0.0) -> list[str]:
    out = []
    for t in _ticks(lo, hi):
        label = f"{t:.3g}"
        if vertical:
            out.append(f'<text x="{x0 - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{label}</text>')
        else:
            out.append(f'<text x="{sx(t):.1f}" y="{y0 + 14}" text-anchor="middle">{label}</text>')
    return out


def histogram(values: Sequence[float], bins: int, title: str, x_label: str, lo: float | None = None,
              hi: float | None = None, log_y: bool = False) -> str:
    data = _finite(values)
    lo = min(data, default=0.0) if lo is None else lo
    hi = max(data, default=1.0) if hi is None else hi
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = [0] * bins
    for v in data:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    heights = [math.log10(c + 1) if log_y else c for c in counts]
    m, w, h = MARGIN, WIDTH, HEIGHT
    sx = _scale(lo, hi, m["left"], w - m["right"])
    top = max(heights, default=1) or 1
    sy = _scale(0, top, h - m["bottom"], m["top"])
    body = [
        f'<rect x="{sx(lo + i * width):.1f}" y="{sy(v):.1f}" width="{max(sx(lo + width) - sx(lo) - 1, 1):.1f}" '
        f'height="{h - m["bottom"] - sy(v):.1f}" fill="{PALETTE[0]}"><title>{counts[i]}</title></rect>'
        for i, v in enumerate(heights)
    ]
    body += _axis_ticks(lo, hi, sx, h - m["bottom"])
    body += _axis_ticks(0, top, None, 0, vertical=True, sy=sy, x0=m["left"])
    return _frame(title, x_label, "log10(count + 1)" if log_y else "count", body)


def scatter(xs: Sequence[float], ys: Sequence[float], groups: Sequence[str], title: str, x_label: str,
            y_label: str, clip: float = 2.0) -> str:
    points = [(max(-clip, min(clip, float(x))), max(-clip, min(clip, float(y))), g)
              for x, y, g in zip(xs, ys, groups) if math.isfinite(float(x)) and math.isfinite(float(y))]
    m, w, h = MARGIN, WIDTH, HEIGHT
    sx = _scale(-clip, clip, m["left"], w - m["right"])
    sy = _scale(-clip, clip, h - m["bottom"], m["top"])
    names = sorted({g for _, _, g in points})
    color = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(names)}
    body = [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color[g]}" fill-opacity="0.7"/>' for x, y, g in points]
    body += [f'<text x="{w - m["right"] - 90}" y="{m["top"] + 12 * (i + 1)}" fill="{color[g]}">● {html.escape(g)}</text>'
             for i, g in enumerate(names)]
    body += _axis_ticks(-clip, clip, sx, h - m["bottom"])
    body += _axis_ticks(-clip, clip, None, 0, vertical=True, sy=sy, x0=m["left"])
    return _frame(title + f" (clipped to ±{clip:g})", x_label, y_label, body)


def bars(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, y_label: str) -> str:
    """Grouped bars: one group per label, one bar per series."""
    m, w, h = MARGIN, WIDTH, HEIGHT
    values = [float(v) for vs in series.values() for v in vs if math.isfinite(float(v))]
    lo, hi = min(0.0, min(values, default=0.0)), max(0.0, max(values, default=1.0)) or 1.0
    sy = _scale(lo, hi, h - m["bottom"], m["top"])
    n_groups, n_series = max(len(labels), 1), max(len(series), 1)
    group_w = (w - m["left"] - m["right"]) / n_groups
    bar_w = max(group_w * 0.8 / n_series, 1)
    body = []
    for s, (name, vs) in enumerate(series.items()):
        for i, v in enumerate(vs):
            v = float(v) if math.isfinite(float(v)) else 0.0
            x = m["left"] + i * group_w + group_w * 0.1 + s * bar_w
            y0, y1 = sy(max(v, 0)), sy(min(v, 0))
            body.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" height="{max(y1 - y0, 0.5):.1f}" '
                        f'fill="{PALETTE[s % len(PALETTE)]}"><title>{html.escape(labels[i])}: {v:.3g}</title></rect>')
        body.append(f'<text x="{w - m["right"] - 120}" y="{m["top"] + 12 * (s + 1)}" fill="{PALETTE[s % len(PALETTE)]}">'
                    f'■ {html.escape(name)}</text>')
    for i, label in enumerate(labels):
        x = m["left"] + (i + 0.5) * group_w
        body.append(f'<text x="{x:.1f}" y="{h - m["bottom"] + 12}" text-anchor="end" font-size="9" '
                    f'transform="rotate(-35 {x:.1f} {h - m["bottom"] + 12})">{html.escape(label[:18])}</text>')
    body.append(f'<line x1="{m["left"]}" y1="{sy(0):.1f}" x2="{w - m["right"]}" y2="{sy(0):.1f}" stroke="#999"/>')
    body += _axis_ticks(lo, hi, None, 0, vertical=True, sy=sy, x0=m["left"])
    return _frame(title, "", y_label, body)
