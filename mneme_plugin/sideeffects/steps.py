"""The predict and evaluate steps of a run directory: one function each, called by ``mneme run``
and by the ``mneme predict`` / ``mneme evaluate`` commands alike.

They read the earlier stages' outputs only through those stages' loaders (attribution, mapping,
ground truth) and write through ``save_prediction`` / ``save_evaluation``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mneme_plugin.groundtruth.table import GroundTruthConfig, load_ground_truth
from mneme_plugin.interpret.config import MapConfig
from mneme_plugin.layout import RunLayout
from mneme_plugin.sideeffects.config import EvaluateConfig, PredictConfig
from mneme_plugin.sideeffects.evaluate import Evaluation, evaluate, save_evaluation
from mneme_plugin.sideeffects.predict import Prediction, load_prediction, predict, save_prediction


def predict_run(run_dir: str | os.PathLike[str], config: PredictConfig, taxonomy: str) -> Prediction:
    """Predict the affected categories of ``taxonomy`` from the run's attribution and mapping; save them."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.mapping import category_links, latent_descriptions, load_mapping
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    layout = RunLayout(Path(run_dir))
    tax = load_taxonomy(taxonomy)
    mapping = load_mapping(layout.mapping)
    prediction = predict(load_attribution(layout.attribution).table, category_links(mapping, tax.name), tax.ids(),
                         config, latent_descriptions(mapping))
    save_prediction(prediction, layout.prediction)
    return prediction


def naive_prediction(intervention: str, map_config: MapConfig, n: int) -> list[str]:
    """The naive baseline: the ``n`` categories the run's mapper puts closest to a plain-text
    description of the intervention (the first taxonomy of ``map_config``)."""
    import numpy as np

    from mneme_plugin.interpret.mapping import EmbeddingMapper, LexicalMapper
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(map_config.taxonomies[0])
    if map_config.method == "embedding":
        mapper: LexicalMapper | EmbeddingMapper = EmbeddingMapper(taxonomy, str(map_config.embedding_model))
    else:
        mapper = LexicalMapper(taxonomy)
    scores = mapper.scores(intervention)
    order = np.argsort(-scores, kind="stable")[:n]
    return [taxonomy.entries[i].id for i in order if scores[i] > 0]


def evaluate_run(run_dir: str | os.PathLike[str], config: EvaluateConfig, ground_truth: GroundTruthConfig,
                 map_config: MapConfig, intervention: str = "") -> Evaluation:
    """Score the run's prediction against the ground truth, with the baselines; save the evaluation.

    ``intervention``: a plain-text description of the edit for the naive baseline (none without it).
    """
    layout = RunLayout(Path(run_dir))
    truth = load_ground_truth(ground_truth)
    prediction = load_prediction(layout.prediction)
    naive = naive_prediction(intervention, map_config, max(1, len(prediction.predicted))) if intervention else None
    evaluation = evaluate(prediction.predicted, truth, prediction.scores["category"].tolist(),
                          naive_predicted=naive, config=config)
    save_evaluation(evaluation, layout.evaluation)
    return evaluation
