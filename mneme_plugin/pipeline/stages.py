"""The stages of ``mneme run``, in order. Each is a thin call of the stage's public function."""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.run import PipelineContext, Stage

logger = logging.getLogger("mneme_plugin")


def _harvest(ctx: PipelineContext) -> None:
    from mneme_plugin.activations import harvest

    harvest(ctx.model("base"), ctx.model("edited"), ctx.corpus(), ctx.config.harvest, ctx.layout.activations,
            progress=ctx.progress)


def _train(ctx: PipelineContext) -> None:
    from mneme_plugin.crosscoder.training import train

    train(ctx.layout.activations, ctx.layout.crosscoder_run, ctx.config.crosscoder, ctx.config.training,
          progress=ctx.progress)


def _attribute(ctx: PipelineContext) -> None:
    from mneme_plugin.attribution import attribute

    attribute(ctx.layout.crosscoder_run, ctx.layout.activations, ctx.config.attribution, ctx.layout.attribution,
              progress=ctx.progress)


def collect_config(ctx: PipelineContext) -> Any:
    """The collect section, reading the same hook and windows as the harvest."""
    h = ctx.config.harvest
    return ctx.config.collect.replace(layer=h.layer, hook_name=h.hook_name, device=h.device,
                                      model_dtype=h.model_dtype, text_field=h.text_field,
                                      messages_field=h.messages_field)


def _collect(ctx: PipelineContext) -> None:
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import collect

    collect(ctx.model("base"), ctx.model("edited"), ctx.layout.crosscoder_run, ctx.corpus(), collect_config(ctx),
            ctx.layout.contexts, attribution=load_attribution(ctx.layout.attribution), progress=ctx.progress)


def _explain(ctx: PipelineContext) -> None:
    from mneme_plugin.interpret.explain import explain

    tokenizer = ctx.models["base"].tokenizer if "base" in ctx.models else None
    explain(ctx.layout.contexts, ctx.config.explain, ctx.layout.explanations, tokenizer=tokenizer)


def _map(ctx: PipelineContext) -> None:
    from mneme_plugin.interpret.mapping import map_descriptions

    map_descriptions(ctx.layout.explanations, ctx.config.map, ctx.layout.mapping)


def category_links(mapping: pd.DataFrame, taxonomy: str | None = None) -> pd.DataFrame:
    """The mapping table's ranked entries in long form: (latent, category, similarity)."""
    rows = []
    for row in mapping.itertuples(index=False):
        if taxonomy is not None and row.taxonomy != taxonomy:
            continue
        for category, similarity in json.loads(row.top_k):
            rows.append({"latent": int(row.latent), "category": category, "similarity": float(similarity)})
    return pd.DataFrame(rows, columns=["latent", "category", "similarity"])


def load_mapping(layout: RunLayout) -> pd.DataFrame:
    """The mapping stage's table (latent, description, label, taxonomy, category, score, top_k)."""
    from mneme_plugin.errors import CheckpointError

    path = layout.mapping / "categories.parquet"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the map stage (`mneme map`) first.")
    return pd.read_parquet(path)


def _prediction_inputs(layout: RunLayout, map_config: Any) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(map_config.taxonomies[0])
    mapping = load_mapping(layout)
    return taxonomy, mapping, category_links(mapping, taxonomy.name)


def _predict(ctx: PipelineContext) -> None:
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.sideeffects import predict, save_prediction

    taxonomy, mapping, links = _prediction_inputs(ctx.layout, ctx.config.map)
    descriptions = {int(r.latent): str(r.description) for r in mapping.itertuples(index=False)}
    prediction = predict(load_attribution(ctx.layout.attribution).table, links, taxonomy.ids(), ctx.config.predict,
                         descriptions)
    save_prediction(prediction, ctx.layout.prediction)


def naive_prediction(intervention: str, map_config: Any, n: int) -> list[str]:
    """The naive baseline: the n categories the same mapper puts closest to the intervention's description."""
    import numpy as np

    from mneme_plugin.interpret.mapping import EmbeddingMapper, LexicalMapper
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(map_config.taxonomies[0])
    if map_config.method == "embedding":
        mapper: Any = EmbeddingMapper(taxonomy, map_config.embedding_model)
    else:
        mapper = LexicalMapper(taxonomy)
    scores = mapper.scores(intervention)
    order = np.argsort(-scores, kind="stable")[:n]
    return [taxonomy.entries[i].id for i in order if scores[i] > 0]


def read_ground_truth(gt: Any) -> pd.DataFrame:
    """(category, before, after, n) from a ``GroundTruthConfig``."""
    from mneme_plugin.sideeffects import read_scores_csv, scores_from_lm_eval

    if gt.scores_csv:
        return read_scores_csv(gt.scores_csv)
    return scores_from_lm_eval(gt.lm_eval_before, gt.lm_eval_after)


def _evaluate(ctx: PipelineContext) -> None:
    from mneme_plugin.sideeffects import evaluate, load_prediction, save_evaluation

    prediction = load_prediction(ctx.layout.prediction)
    intervention = ctx.config.models.intervention
    naive = (naive_prediction(intervention, ctx.config.map, max(1, len(prediction.predicted)))
             if intervention else None)
    evaluation = evaluate(prediction.predicted, read_ground_truth(ctx.config.ground_truth), prediction.scores["category"].tolist(),
                          naive_predicted=naive, config=ctx.config.evaluate)
    save_evaluation(evaluation, ctx.layout.evaluation)
    logger.info("\n%s", evaluation.markdown())


def _report(ctx: PipelineContext) -> None:
    from mneme_plugin.report.build import build_report

    build_report(ctx.layout.root)


STAGES: list[Stage] = [
    Stage("harvest", ("models", "corpus", "harvest"), lambda l: l.activations, _harvest),
    Stage("train", ("crosscoder", "training"), lambda l: l.crosscoder_run, _train),
    Stage("attribute", ("attribution",), lambda l: l.attribution, _attribute),
    Stage("collect", ("collect", "harvest", "corpus"), lambda l: l.contexts, _collect),
    Stage("explain", ("explain",), lambda l: l.explanations, _explain),
    Stage("map", ("map",), lambda l: l.mapping, _map),
    Stage("predict", ("predict", "map"), lambda l: l.prediction, _predict),
    Stage("evaluate", ("evaluate", "ground_truth", "models"), lambda l: l.evaluation, _evaluate,
          enabled=lambda c: c.ground_truth.available),
    Stage("report", (), lambda l: l.report, _report),
]
