"""The paper's intersection analysis of harmful fine-tuning: which latents did the edit amplify, which
latents are mapped to harmful categories, and how many are both.

Three stages: (1) the amplified latents (attribution classes ``amplified`` / ``edited_only``); (2) the
latents whose best category (the mapping's top link, similarity > 0) is one of the harmful categories;
(3) their intersection, per category, beside the share of harmful latents among a uniform reference
sample of live latents (the collect stage's ``reference_latents``): the amplified latents are enriched
in harmful features when their harmful share exceeds the reference share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write_text, read_json
from mneme_plugin.sideeffects.metrics import percent_text

INTERSECTION_JSON = "harmful_intersection.json"
AMPLIFIED_CLASSES = ("amplified", "edited_only")


@dataclass
class HarmfulIntersection:
    amplified: list[int]
    harmful: dict[int, str]  # latent -> its harmful category (every mapped latent that has one)
    intersection: dict[str, list[int]]  # harmful category -> amplified latents mapped to it
    reference_size: int  # mapped latents of the reference sample (or every mapped latent)
    reference_harmful: int  # of which mapped to a harmful category
    categories: list[str] = field(default_factory=list)

    @property
    def n_intersection(self) -> int:
        return sum(len(v) for v in self.intersection.values())

    @property
    def amplified_share(self) -> float:
        """Share of the amplified latents that are harmful (nan without amplified latents)."""
        return self.n_intersection / len(self.amplified) if self.amplified else float("nan")

    @property
    def reference_share(self) -> float:
        return self.reference_harmful / self.reference_size if self.reference_size else float("nan")

    def summary(self) -> str:
        per = ", ".join(f"{c} {len(v)}" for c, v in self.intersection.items() if v) or "none"
        return (f"{len(self.amplified)} amplified latents, {self.n_intersection} of them mapped to a harmful category "
                f"({percent_text(self.amplified_share)}; {percent_text(self.reference_share)} of {self.reference_size} reference latents): "
                f"{per}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["harmful"] = {str(k): v for k, v in self.harmful.items()}
        return out


def harmful_intersection(attribution: pd.DataFrame, links: pd.DataFrame, harmful_categories: Iterable[str],
                         reference: Collection[int] | None = None,
                         amplified_classes: Collection[str] = AMPLIFIED_CLASSES) -> HarmfulIntersection:
    """The three stages (module doc) from the attribution table and the mapping's category links."""
    categories = list(dict.fromkeys(harmful_categories))
    best = (links[links["similarity"] > 0].sort_values(["latent", "similarity"], ascending=[True, False], kind="stable")
            .drop_duplicates("latent"))
    top = {int(r.latent): str(r.category) for r in best.itertuples(index=False)}
    harmful = {latent: category for latent, category in top.items() if category in categories}
    amplified = sorted(int(v) for v in attribution.loc[attribution["latent_class"].isin(amplified_classes), "latent"])
    intersection = {c: [latent for latent in amplified if harmful.get(latent) == c] for c in categories}
    mapped = set(links["latent"].astype(int))
    pool = [latent for latent in (reference if reference else mapped) if latent in mapped]
    return HarmfulIntersection(amplified, harmful, intersection, len(pool),
                               sum(latent in harmful for latent in pool), categories)


def save_harmful_intersection(result: HarmfulIntersection, out_dir: str | os.PathLike[str]) -> Path:
    path = Path(out_dir) / INTERSECTION_JSON
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    return path


def load_harmful_intersection(out_dir: str | os.PathLike[str]) -> HarmfulIntersection:
    path = Path(out_dir) / INTERSECTION_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the intersection analysis first.")
    data = read_json(path, "run the intersection analysis again")
    data["harmful"] = {int(k): v for k, v in data["harmful"].items()}
    return HarmfulIntersection(**data)
