"""The attribution table: one row per latent, written as parquet + CSV, with a JSON summary.

Output directory layout::

    out_dir/
      attribution.parquet          one row per latent (columns: see COLUMNS)
      attribution.csv              the same table as CSV
      attribution_summary.json     counts per class, dead count, config, space, crosscoder metadata
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write, read_json

TABLE_PARQUET = "attribution.parquet"
TABLE_CSV = "attribution.csv"
SUMMARY_FILE = "attribution_summary.json"

COLUMNS = (
    "latent",
    "norm_base", "norm_edited", "delta", "cosine",
    "fire_count", "fire_freq", "mean_act",
    "beta_r_base", "beta_r_edited", "beta_e_base", "beta_e_edited", "nu_r", "nu_e",
    "mbeta_r_base", "mbeta_r_edited", "mbeta_e_base", "mbeta_e_edited", "nu_r_mirror", "nu_e_mirror",
    "betas_confirm", "latent_class", "score", "rank",
)


@dataclass
class AttributionResult:
    """The per-latent table (``table``, indexed 0..m-1 by latent) and its summary dict."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.summary.get("counts", {}))

    def ranked(self, side: str = "base", n: int | None = None) -> pd.DataFrame:
        """Latents that fired, most base-specific first (``side="base"``) or most edited-specific first."""
        if side not in ("base", "edited"):
            raise ValueError(f"side must be 'base' or 'edited', got {side!r}.")
        alive = self.table[self.table["latent_class"] != "dead"]
        out = alive.sort_values("score", ascending=(side == "edited"), kind="stable")
        return out if n is None else out.head(n)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Not JSON serialisable: {type(value).__name__}")


def save_attribution(result: AttributionResult, out_dir: str | os.PathLike[str]) -> Path:
    """Write the table (parquet + CSV) and summary into ``out_dir``, each file atomically, the summary last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The summary, written last, says the folder is whole: an earlier one goes first, so a save
    # stopped part-way leaves no old summary next to a new table.
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    table = result.table
    atomic_write(out_dir / TABLE_PARQUET, lambda p: table.to_parquet(p, index=False))
    atomic_write(out_dir / TABLE_CSV, lambda p: table.to_csv(p, index=False))
    text = json.dumps(result.summary, indent=2, default=_json_default)
    atomic_write(out_dir / SUMMARY_FILE, lambda p: p.write_text(text))
    result.out_dir = out_dir
    return out_dir


def load_attribution(path: str | os.PathLike[str]) -> AttributionResult:
    """Read an attribution written by ``attribute`` / ``save_attribution`` (parquet, else CSV)."""
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    if not summary_path.is_file():
        from mneme_plugin.describe import folder_kind

        kind = folder_kind(path)
        raise CheckpointError(f"{path} holds no attribution: " + (
            f"it is {kind}." if kind else f"{summary_path} does not exist (run `mneme attribute` first)."))
    summary = read_json(summary_path, "attribute again")
    parquet, csv = path / TABLE_PARQUET, path / TABLE_CSV
    try:
        if parquet.is_file():
            table = pd.read_parquet(parquet)
        elif csv.is_file():
            table = pd.read_csv(csv)
            table["betas_confirm"] = table["betas_confirm"].astype("boolean")
        else:
            raise CheckpointError(f"{path} holds neither {TABLE_PARQUET} nor {TABLE_CSV}.")
    except CheckpointError:
        raise
    except Exception as err:  # pyarrow / pandas parser errors
        raise CheckpointError(f"The attribution table in {path} could not be read: {err}") from err
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise CheckpointError(f"The attribution table in {path} lacks columns {missing}.")
    return AttributionResult(table=table, summary=summary, out_dir=path)


def format_counts(summary: dict[str, Any]) -> str:
    """One line per class with its count (and the never-fired count)."""
    counts = summary.get("counts", {})
    width = max((len(k) for k in counts), default=0)
    lines = [f"{name:<{width}}  {n:>8,}" for name, n in counts.items()]
    lines.append(f"{'total':<{width}}  {summary.get('n_latents', sum(counts.values())):>8,}"
                 f"   (never fired: {summary.get('n_never_fired', summary.get('n_dead', 0)):,};"
                 f" tokens: {summary.get('n_tokens', 0):,})")
    return "\n".join(lines)


def format_delta_histogram(summary: dict[str, Any], width: int = 50) -> str:
    """Text histogram of Delta over latents that fired (1 = base only, 0 = edited only)."""
    hist = summary.get("delta_histogram") or {}
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    if not counts:
        return "(no latent fired: empty histogram)"
    top = max(max(counts), 1)
    lines = ["Delta (relative decoder norm; 0 edited-only, 0.5 shared, 1 base-only), latents that fired:"]
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        bar = "#" * int(round(width * n / top))
        if n and not bar:
            bar = "."
        lines.append(f"  {lo:4.2f}-{hi:4.2f} | {bar:<{width}} {n:,}")
    return "\n".join(lines)
