"""Place each latent on the suppressed .. shared .. amplified spectrum, and score it.

Rule (thresholds from ``AttributionConfig``; defaults in brackets), for a latent that fired:

1. By the relative decoder norm Delta (1 = base only, 0 = edited only):
   Delta > delta_base_only [0.9] -> ``base_only``;  0.5 + shared_band <= Delta <= 0.9 -> ``suppressed``;
   |Delta - 0.5| < shared_band [0.1] -> ``shared``;  delta_edited_only <= Delta <= 0.5 - shared_band ->
   ``amplified``;  Delta < delta_edited_only [0.1] -> ``edited_only``.
2. With ``use_betas``, an extreme must be confirmed by latent scaling (Minder et al.), else it is
   demoted one step (base_only -> suppressed, edited_only -> amplified):
   edited_only needs |nu_e| < nu_error_max [0.2] and |nu_r| < nu_reconstruction_max [0.5];
   base_only needs the mirrored ratios below the same thresholds: |nu_e_mirror| and |nu_r_mirror|
   (base decoder row as latent vector; ``base_specific_vector="base"``), or |1/nu_e| and |1/nu_r|
   (``"edited"``). Ratios that cannot be computed (NaN) do not demote: Delta decides.
   Absolute values: a strongly negative ratio means the other model carries the direction with
   the opposite sign, which is no evidence of specificity.
3. Latents that never fired (or whose decoder rows are both zero) are ``dead``.

Score, for ranking (in [-1, 1], NaN for dead latents): ``(2 Delta - 1) * c`` with the confidence
c = 1 - min(1, |nu_side^e|), nu_side^e being the error ratio of the side Delta points to
(nu_e_mirror or 1/nu_e for Delta >= 0.5, nu_e otherwise; c = 1 when it is NaN). Positive =
base-leaning (suppressed, lost by the edit), negative = edited-leaning (amplified). ``rank`` 1 is
the most base-specific latent (descending score, dead latents last).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mneme_plugin.attribution.config import BASE_LEANING, EDITED_LEANING, AttributionConfig


def most_specific_first(table: pd.DataFrame, latent_class: str) -> pd.DataFrame:
    """The latents of one class, most specific first: base-leaning classes by descending score,
    edited-leaning ones by ascending score, shared ones by ascending |score| (most shared first)."""
    rows = table[table["latent_class"] == latent_class]
    if latent_class in BASE_LEANING:
        return rows.sort_values("score", ascending=False, kind="stable")
    if latent_class in EDITED_LEANING:
        return rows.sort_values("score", ascending=True, kind="stable")
    return rows.reindex(rows["score"].abs().sort_values(kind="stable").index)


def _abs_below(values: np.ndarray, limit: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.abs(values) < limit


def _inverse(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / values


# Delta computed from decoder norms lands a rounding error off the band edges (norms (1, 0.8) give
# 0.6 as abs(0.6 - 0.5) = 0.0999..., (0.2, 1) give 0.09999...98): comparisons allow this much so the
# documented inclusive edges (0.6 suppressed, 0.4 amplified, 0.1 amplified, 0.9 suppressed) hold.
EDGE_TOLERANCE = 1e-9


def delta_bands(delta: np.ndarray, config: AttributionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base extreme, edited extreme, shared) masks of Delta by the thresholds alone (NaN in none),
    the band edges inclusive as documented: Delta > delta_base_only, Delta < delta_edited_only,
    |Delta - 0.5| < shared_band, each EDGE_TOLERANCE inside its edge."""
    delta = np.asarray(delta, dtype=float)
    with np.errstate(invalid="ignore"):
        return (delta > config.delta_base_only + EDGE_TOLERANCE,
                delta < config.delta_edited_only - EDGE_TOLERANCE,
                np.abs(delta - 0.5) < config.shared_band - EDGE_TOLERANCE)


def base_side_ratios(columns: dict[str, np.ndarray], config: AttributionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(nu^e, nu^r) used to confirm base-specific latents, per ``config.base_specific_vector``."""
    if config.base_specific_vector == "base":
        return np.asarray(columns["nu_e_mirror"], float), np.asarray(columns["nu_r_mirror"], float)
    return _inverse(np.asarray(columns["nu_e"], float)), _inverse(np.asarray(columns["nu_r"], float))


def classify(columns: dict[str, np.ndarray], config: AttributionConfig | None = None) -> dict[str, np.ndarray]:
    """Classes, beta confirmation, score and rank from the per-latent columns.

    ``columns`` needs ``delta``, ``fire_count``, ``nu_e``, ``nu_r``, ``nu_e_mirror``, ``nu_r_mirror``.
    Returns ``latent_class`` (str), ``betas_confirm`` (object: True/False/None where not an
    extreme by Delta or not computable), ``score`` (float) and ``rank`` (int, 1 = most base-specific).
    """
    cfg = config or AttributionConfig()
    delta = np.asarray(columns["delta"], dtype=float)
    fired = np.asarray(columns["fire_count"]) > 0
    nu_e, nu_r = np.asarray(columns["nu_e"], float), np.asarray(columns["nu_r"], float)
    base_e, base_r = base_side_ratios(columns, cfg)
    alive = fired & np.isfinite(delta)

    base_band, edited_band, shared_band = delta_bands(delta, cfg)
    is_base_extreme = alive & base_band
    is_edited_extreme = alive & edited_band
    is_shared = alive & shared_band
    with np.errstate(invalid="ignore"):
        leans_base = alive & (delta >= 0.5)

    base_known = ~np.isnan(base_e) & ~np.isnan(base_r)
    edited_known = ~np.isnan(nu_e) & ~np.isnan(nu_r)
    base_ok = _abs_below(base_e, cfg.nu_error_max) & _abs_below(base_r, cfg.nu_reconstruction_max)
    edited_ok = _abs_below(nu_e, cfg.nu_error_max) & _abs_below(nu_r, cfg.nu_reconstruction_max)

    confirm = np.full(delta.shape, None, dtype=object)
    confirm[is_base_extreme & base_known] = base_ok[is_base_extreme & base_known]
    confirm[is_edited_extreme & edited_known] = edited_ok[is_edited_extreme & edited_known]

    latent_class = np.full(delta.shape, "dead", dtype=object)
    latent_class[alive & leans_base] = "suppressed"
    latent_class[alive & ~leans_base] = "amplified"
    latent_class[is_shared] = "shared"
    keep_base = is_base_extreme & (~base_known | base_ok | (not cfg.use_betas))
    keep_edited = is_edited_extreme & (~edited_known | edited_ok | (not cfg.use_betas))
    latent_class[keep_base] = "base_only"
    latent_class[keep_edited] = "edited_only"

    side_e = np.where(leans_base, base_e, nu_e)
    with np.errstate(invalid="ignore"):
        conf = 1.0 - np.minimum(1.0, np.abs(side_e))
    conf = np.where(np.isnan(conf), 1.0, conf)
    score = np.where(alive, (2.0 * delta - 1.0) * conf, np.nan)

    order = np.argsort(np.where(np.isnan(score), np.inf, -score), kind="stable")
    rank = np.empty(delta.shape, dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return {"latent_class": latent_class, "betas_confirm": confirm, "score": score, "rank": rank}
