"""The interpret package's file names (collect's contexts, explain's explanations, map's categories) and
the writer of its tables: what can be told about a folder from its files alone, without torch or
pandas (`mneme info`, a contexts folder clearing the tables of its earlier contexts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mneme_plugin.files import atomic_write

CONTEXTS_FILE = "contexts.json"  # collect's summary, written last: the folder is whole
BACKGROUND_FILE = "background_counts.npy"
TOKENIZER_DIR = "tokenizer"
EXPLANATIONS_STEM = "explanations"
EXPLANATIONS_PARQUET = f"{EXPLANATIONS_STEM}.parquet"
EXPLANATIONS_CSV = f"{EXPLANATIONS_STEM}.csv"
CATEGORIES_STEM = "categories"
CATEGORIES_PARQUET = f"{CATEGORIES_STEM}.parquet"


def write_table(table: Any, out_dir: str | os.PathLike[str], stem: str) -> Path:
    """``<stem>.parquet`` and ``<stem>.csv`` of a DataFrame in ``out_dir``, each atomically (tmp file +
    rename); returns the parquet file. An earlier parquet goes first: the readers prefer it, so a write
    stopped after the CSV leaves the new CSV alone, not beside the old parquet."""
    out_dir = Path(out_dir)
    (out_dir / f"{stem}.parquet").unlink(missing_ok=True)
    atomic_write(out_dir / f"{stem}.csv", lambda p: table.to_csv(p, index=False))
    return atomic_write(out_dir / f"{stem}.parquet", lambda p: table.to_parquet(p, index=False))


def remove_table(out_dir: str | os.PathLike[str], stem: str) -> bool:
    """Remove what ``write_table`` wrote under ``stem`` in ``out_dir``; whether there was any."""
    found = False
    for suffix in (".parquet", ".csv"):
        path = Path(out_dir) / f"{stem}{suffix}"
        found |= path.exists()
        path.unlink(missing_ok=True)
    return found
