"""Pooling predictions over crosscoders trained with different seeds on the same model pair.

Two crosscoders trained on the same activations with different seeds find different latents, and
a side effect that rests on one or two latents can appear in one and not in the other. Each run
predicts on its own; the pooled prediction keeps the categories that at least ``min_votes`` of
them predicted (default: a majority), so a category one crosscoder names by chance drops out and
one that most of them name stays. The pooled prediction is a :class:`Prediction` (``scores``: one
row per category with its ``votes``), saved where a run keeps its own (``prediction/``), so
``mneme evaluate --run-dir OUT`` scores it like any run's.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mneme_plugin.errors import ConfigError
from mneme_plugin.sideeffects.predict import Prediction


def majority(n_runs: int) -> int:
    """Votes needed for a strict majority of ``n_runs``."""
    return n_runs // 2 + 1


def pool_predictions(predictions: Sequence[Prediction], min_votes: int | None = None,
                     names: Sequence[str] | None = None) -> Prediction:
    """The categories predicted by at least ``min_votes`` of ``predictions`` (default: a majority).

    Every prediction must score the same categories (the same taxonomy). ``names`` (e.g. the run
    directories) are recorded in the pooled prediction's ``tests``.
    """
    if len(predictions) < 2:
        raise ConfigError(f"Pooling needs at least 2 predictions, got {len(predictions)}.")
    needed = majority(len(predictions)) if min_votes is None else min_votes
    if not 1 <= needed <= len(predictions):
        raise ConfigError(f"min_votes must be between 1 and the number of runs ({len(predictions)}), got {needed}.")
    categories = list(predictions[0].scores["category"])
    for i, prediction in enumerate(predictions[1:], 1):
        if set(prediction.scores["category"]) != set(categories):
            raise ConfigError(f"Prediction {i} scores other categories than prediction 0: pool runs that predict "
                              "over the same taxonomy.")
    votes = pd.Series(0, index=categories, dtype=int)
    for prediction in predictions:
        votes[list(prediction.predicted)] += 1
    # ``score``, the share of runs naming the category, is what every prediction's scores have (the report ranks by it).
    scores = pd.DataFrame({"category": categories, "votes": votes.to_numpy(), "score": votes.to_numpy() / len(predictions)})
    scores["predicted"] = scores["votes"] >= needed
    scores = scores.sort_values(["votes"], ascending=False, kind="stable").reset_index(drop=True)
    tests = {"verdict": f"pooled: {needed} of {len(predictions)} runs", "min_votes": needed,
             "runs": list(names) if names is not None else [str(i) for i in range(len(predictions))],
             "run_verdicts": [p.tests.get("verdict", "") for p in predictions]}
    recorded = {p.taxonomy for p in predictions}  # the same categories; one name unless some file lacks it
    return Prediction(scores=scores, predicted=scores.loc[scores["predicted"], "category"].tolist(),
                      config=predictions[0].config, tests=tests,
                      taxonomy=next(iter(recorded)) if len(recorded) == 1 else None)
