"""The two tests of the ``outlier_or_broad`` prediction rule: is the edit's change concentrated on a
few categories, and is it broader than a benign perturbation's?

An edit either moves a few capabilities (RMU of one subject: its latents change, the others do
not) or many at once (narrow fine-tuning that overwrites what the model knew: latents of every
subject change alike). The outlier rule sees only the first kind. These tests tell them apart:

- concentration: among the reference latents (a uniform sample of the live ones, mapped), is the
  share of changed latents the same in every category? A permutation test of the chi-square
  statistic of the category x changed table, exact for the small counts a taxonomy gives;
- breadth: is the edit's share of changed latents among all live latents larger than that of a
  control crosscoder, trained the same way between the base model and a copy that is only benignly
  perturbed (e.g. fine-tuned briefly on general text)? Fisher's one-sided exact test. Without a
  control, a share of changed latents has no scale (how many latents any fine-tuning changes
  depends on the crosscoder and the models), so breadth cannot be tested.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from mneme_plugin.stats import hypergeometric_sf


def changed_share(attribution: pd.DataFrame, changed_classes: Collection[str]) -> tuple[int, int]:
    """(changed, live) latent counts of an attribution table: latents of ``changed_classes`` among
    those not classified dead."""
    live = attribution[attribution["latent_class"] != "dead"]
    return int(live["latent_class"].isin(list(changed_classes)).sum()), len(live)


def broad_change_pvalue(changed: int, live: int, control_changed: int, control_live: int) -> float:
    """One-sided Fisher exact p-value that the edit changed a larger share of its live latents
    (``changed`` of ``live``) than the control did (``control_changed`` of ``control_live``)."""
    for name, value in (("changed", changed), ("live", live), ("control_changed", control_changed),
                        ("control_live", control_live)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if changed > live or control_changed > control_live:
        raise ValueError("A changed count cannot exceed its live count.")
    if live == 0 or control_live == 0 or changed == 0:
        return 1.0
    return hypergeometric_sf(changed, live + control_live, changed + control_changed, live)


def _chi_square(codes: np.ndarray, changed: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson's chi-square of the (group x changed) table for each row of ``changed`` (a batch of
    labelings with the same number of changed latents); groups are ``codes`` 0..n_groups-1."""
    sizes = np.bincount(codes, minlength=n_groups).astype(float)
    share = changed[0].sum() / codes.size
    observed = np.stack([np.bincount(codes, weights=row, minlength=n_groups) for row in changed])
    expected = sizes * share
    # Both columns of the table: the unchanged column's deviations are the changed one's, with
    # expectation sizes * (1 - share), so the sum is the changed column's divided by (1 - share).
    return ((observed - expected) ** 2 / expected).sum(axis=-1) / (1.0 - share)


def homogeneity_pvalue(categories: Sequence[str], changed: Sequence[bool], permutations: int = 2000,
                       seed: int = 0) -> float:
    """Permutation p-value of 'the share of changed latents is the same in every category'.

    ``categories[i]`` is latent i's category, ``changed[i]`` whether the edit changed it. The
    statistic is Pearson's chi-square of the category x changed table; its null distribution is
    drawn by permuting ``changed`` over the latents (``permutations`` draws, p = (1 + #{stat >=
    observed}) / (1 + permutations)). 1.0 when fewer than two categories or no latent (or every
    latent) changed: nothing can differ.
    """
    if len(categories) != len(changed):
        raise ValueError(f"categories ({len(categories)}) and changed ({len(changed)}) must have the same length.")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}.")
    codes, uniques = pd.factorize(pd.Series(list(categories), dtype=object))
    flags = np.asarray(changed, dtype=bool)
    if len(uniques) < 2 or not flags.any() or flags.all():
        return 1.0
    observed = _chi_square(codes, flags[None, :], len(uniques))[0]
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, 500):
        batch = min(500, permutations - start)
        shuffled = np.stack([rng.permutation(flags) for _ in range(batch)])
        exceed += int((_chi_square(codes, shuffled, len(uniques)) >= observed - 1e-9).sum())
    return (1 + exceed) / (1 + permutations)
