"""The calibrated null of the ``enrichment`` prediction rule: is a category over-represented among
the latents an edit changed, compared with its share among all live latents?

For one side (suppressed or amplified) and one category c, the latents fall in a 2 x 2 table:
changed on that side or not (among the reference latents), linked to c or not. Under the null that
the edit changed latents regardless of their category, the number of changed latents linked to c
is hypergeometric; the one-sided p-value is Fisher's exact test. The p-values of all (category,
side) tests are corrected together with Benjamini-Hochberg, so ``alpha`` is a false discovery
rate over the whole taxonomy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from mneme_plugin.stats import hypergeometric_sf


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order."""
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def enrichment_table(links: pd.DataFrame, changed: dict[str, Collection[int]], reference: Collection[int],
                     categories: Sequence[str]) -> pd.DataFrame:
    """One row per category: for each side, the changed latents linked to it (``n_<side>``), the
    number expected from its share of the reference (``expected_<side>``), Fisher's one-sided
    p-value (``p_<side>``) and the BH q-value over all tests (``q_<side>``).

    ``links``: (latent, category) pairs, a latent linked to one or more categories.
    ``changed``: the changed latents of each side. ``reference``: a uniform sample of the live
    latents (or all of them); only latents with links count. Each side is compared with the
    reference latents outside it.
    """
    linked = set(int(v) for v in links["latent"])
    reference_linked = {int(v) for v in reference} & linked
    members_of = links.groupby("category")["latent"].agg(lambda s: {int(v) for v in s})
    out = pd.DataFrame(index=pd.Index(list(categories), name="category"))
    p_columns = []
    for side, side_latents in changed.items():
        latents = {int(v) for v in side_latents} & linked
        # The side's latents against a uniform sample of the others: a two-sample exact test.
        population = reference_linked | latents
        hits, expected, p_values = [], [], []
        for category in out.index:
            members = members_of.get(category, set()) & population
            k = len(members & latents)
            hits.append(k)
            expected.append(len(latents) * len(members) / len(population) if population else 0.0)
            p_values.append(hypergeometric_sf(k, len(population), len(members), len(latents)) if k else 1.0)
        out[f"n_{side}"] = hits
        out[f"expected_{side}"] = expected
        out[f"p_{side}"] = p_values
        p_columns.append(f"p_{side}")
    q = benjamini_hochberg(out[p_columns].to_numpy().ravel()).reshape(len(out), len(p_columns))
    for j, column in enumerate(p_columns):
        out["q_" + column[2:]] = q[:, j]
    return out.reset_index()
