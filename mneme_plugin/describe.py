"""What a path on disk holds (``mneme info``): an activation store, a crosscoder, a training run, a
model folder, a run directory (of ``mneme run``, or assembled by the stage commands or ``mneme pool``),
one stage's output (attribution, contexts, explanations, mapping, prediction, evaluation), or a
``mneme demo`` case folder (``organism.demo``: recipe, ground truth, ``run/``) or output folder.

``folder_kind`` names what a folder is in a few words, for the errors of a command given the wrong
folder (a run directory where a store or a crosscoder was wanted, say)."""

from __future__ import annotations

from pathlib import Path

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import size_text
from mneme_plugin.sideeffects.metrics import metric_text


def _store_summary(path: Path) -> list[str]:
    from mneme_plugin.activations import ActivationStore

    store = ActivationStore(path)
    m = store.manifest
    norm = m.get("normalization", {})
    problems = store.shard_problems()
    if problems:
        state = "DAMAGED: " + "; ".join(problems) + " (harvest again with --overwrite)"
    else:
        state = "complete" if m.get("complete") else "PARTIAL: resume the harvest"
    lines = [
        f"Activation store {path} ({state})",
        f"  base model:    {m.get('base_model')}",
        f"  edited model:  {m.get('edited_model')}",
        f"  hook:          {m.get('hook_name')} (layer {m.get('layer')}), d_model {m.get('d_model')}",
        f"  corpus:        {m.get('corpus')}",
        f"  rows:          {m.get('n_tokens') or 0:,} in {len(m.get('shards', []))} shards ({m.get('dtype')}), "
        f"{m.get('n_windows') or 0:,} windows of {m.get('context_length')} tokens",
        f"  dropped:       {m.get('outliers_dropped', 0):,} outliers, {m.get('special_tokens_dropped', 0):,} special, "
        f"{m.get('padding_dropped', 0):,} padding",
    ]
    if norm:
        lines.append(
            "  normalisation: scale factors "
            + ", ".join(f"{s:.4g}" for s in norm.get("scale_factors", []))
            + " (base, edited); median norms "
            + ", ".join(f"{s:.4g}" for s in norm.get("median_norms", []))
        )
    return lines


def _crosscoder_summary(path: Path, fmt: str | None = None) -> list[str]:
    """A crosscoder folder: ours, or (``fmt``) one of another registered format, read by ``load_crosscoder``."""
    from mneme_plugin.crosscoder import CrossCoder

    if fmt is None:
        model = CrossCoder.from_pretrained(path)
    else:
        from mneme_plugin.formats import load_crosscoder
        from mneme_plugin.formats.load import FORMAT_REGISTRY

        model = load_crosscoder(path)
    cfg = model.cfg
    threshold = float(model.threshold)
    lines = [
        f"Crosscoder {path}" + (f" ({FORMAT_REGISTRY[fmt].title}: load_crosscoder reads it; `mneme import {path} "
                                f"--out DIR` converts it)" if fmt else ""),
        f"  {type(model).__name__}: d={cfg.activation_dim}, latents={cfg.dict_size}, k={cfg.k}, "
        f"salience={cfg.salience}, dtype={cfg.dtype}",
        f"  inference threshold: {threshold:.4g}" if threshold >= 0 else "  inference threshold: not estimated",
        "  activation scale: " + ", ".join(f"{s:.4g}" for s in model.activation_scale.tolist()) + " (base, edited)",
    ]
    for key, value in cfg.metadata.items():
        lines.append(f"  {key}: {value}")
    return lines


def _pipeline_summary(path: Path) -> list[str]:
    from mneme_plugin.layout import CACHE_DIR, RunLayout
    from mneme_plugin.pipeline import read_stage_markers

    layout = RunLayout(path)
    lines = [f"MNEME run {path}"]
    markers = read_stage_markers(path)
    for marker in markers:
        lines.append(f"  stage {marker.stage:<10} done in {marker.seconds:.1f} s (config {marker.fingerprint})")
    if not markers:
        lines.append("  no stage done yet")
    lines += _unfinished_stages(layout, {marker.stage for marker in markers})
    lines += _stages_not_done(layout, {marker.stage for marker in markers})
    if layout.evaluation.is_dir():
        lines += _evaluation_lines(layout.evaluation)
    if layout.report.is_file():
        lines.append(f"  report: {layout.report}")
    sizes: dict[str, int] = {}
    for entry in layout.cache_entries():
        sizes[entry.stage] = sizes.get(entry.stage, 0) + entry.size
    if sizes:
        lines.append(f"  cache: {layout.root / CACHE_DIR} ({', '.join(f'{name} {size_text(size)}' for name, size in sizes.items())}; "
                     f"kept when stages are redone; deleting it costs only time: `mneme clean {path} --cache`)")
    lines += _finished_checkpoints(layout)
    return lines


def _finished_checkpoints(layout) -> list[str]:  # noqa: ANN001
    """The checkpoints a finished training left (earlier versions, or ``keep_finished_checkpoints``)."""
    from mneme_plugin.checkpoints import CHECKPOINT_DIR
    from mneme_plugin.crosscoder.files import remove_finished_checkpoints, training_finished

    run = layout.crosscoder_run
    size = remove_finished_checkpoints(run, dry_run=True) if training_finished(run) else 0
    if not size:
        return []
    return [f"  training checkpoints: {run / CHECKPOINT_DIR} ({size_text(size)}) of a finished "
            f"training; only resuming reads them: `mneme clean {layout.root} --checkpoints`"]


def _evaluation_lines(folder: Path) -> list[str]:
    """The evaluation(s) of an ``evaluation/`` folder: truth, prediction and each method's metrics (and whether
    the prediction beside it, in a run directory, is still the one they scored)."""
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline.config import load_run_config
    from mneme_plugin.sideeffects import load_evaluations, load_prediction, prediction_folder
    from mneme_plugin.sideeffects.evaluate import evaluated_other_prediction
    from mneme_plugin.sideeffects.predict import PREDICTIONS_JSON

    try:
        evaluations = load_evaluations(folder)
    except MnemeError as err:
        return [f"  evaluation: unreadable ({err})"]
    lines = []
    root = folder.parent
    try:
        taxonomies = load_run_config(root).taxonomies() if RunLayout(root).config.is_file() else None
    except MnemeError:  # `_stages_not_done` says the config is unreadable
        taxonomies = None
    for name, evaluation in evaluations.items():
        if name:
            lines.append(f"  ground truth {name} (taxonomy {evaluation.taxonomy}):")
        lines.append(f"  degraded: {', '.join(evaluation.true_set) or '(none)'}; "
                     f"predicted: {', '.join(evaluation.predicted.get('MNEME', [])) or '(none)'}")
        beside = RunLayout(root).prediction
        if name and evaluation.taxonomy:  # a named table's prediction: where the predict stage keeps its taxonomy's
            beside = prediction_folder(root, evaluation.taxonomy, taxonomies or [evaluation.taxonomy])
        if folder.name == "evaluation" and (beside / PREDICTIONS_JSON).is_file():
            try:
                now = load_prediction(beside).predicted
            except MnemeError:
                now = None
            if now is not None and evaluated_other_prediction(evaluation, now):
                lines.append(f"  (this evaluation scored an earlier prediction; {beside} now predicts "
                             f"{', '.join(now) or '(none)'}: score it with `mneme evaluate --run-dir {root}`)")
        for method, m in evaluation.rows.items():
            lines.append(f"  {method:<7} Acc {metric_text(m.accuracy)}  P {metric_text(m.precision)}  "
                         f"R {metric_text(m.recall)}  F1 {metric_text(m.f1)}")
    return lines


def _unfinished_stages(layout, done: set[str]) -> list[str]:  # noqa: ANN001
    """The long stages a run left unfinished (an interrupted `mneme run`): where they stopped."""
    from mneme_plugin.activations.manifest import MANIFEST, read_manifest
    from mneme_plugin.checkpoints import latest_checkpoint
    from mneme_plugin.crosscoder.files import FINAL_DIR
    from mneme_plugin.errors import MnemeError

    lines = []
    intervention = _unfinished_intervention_summary(layout.edited_model) if "intervention" not in done else []
    if intervention:
        lines.append("  stage intervention not finished: " + intervention[1].strip())
    if "harvest" not in done and (layout.activations / MANIFEST).is_file():
        try:
            rows = f"{int(read_manifest(layout.activations).get('n_tokens') or 0):,} rows so far"
        except MnemeError:
            rows = "its manifest unreadable"
        lines.append(f"  stage harvest    not finished ({rows}): `mneme run` again resumes it")
    newest = latest_checkpoint(layout.crosscoder_run)
    if "train" not in done and newest is not None and not (layout.crosscoder_run / FINAL_DIR).is_dir():
        lines.append(f"  stage train      not finished (newest checkpoint {newest.name}): "
                     "`mneme run` again resumes it")
    return lines


def _stages_not_done(layout, done: set[str]) -> list[str]:  # noqa: ANN001
    """The stages the run's config runs that have no marker (a run that stopped, or one with ``--only``)."""
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.pipeline.config import load_run_config
    from mneme_plugin.pipeline.stages import STAGES

    if not layout.config.is_file():
        return []
    try:
        config = load_run_config(layout.root)
    except MnemeError as err:
        return [f"  config: unreadable, so the stages still to run are unknown ({err})"]
    missing = [stage.name for stage in STAGES
               if stage.present(config) and stage.enabled(config) and stage.name not in done]
    if not missing:
        return []
    return [f"  stages not done: {', '.join(missing)}" + (" (the run stopped before them, or --only left them out)" if done else "")]


def _training_run_summary(path: Path) -> list[str]:
    from mneme_plugin.checkpoints import checkpoint_dirs
    from mneme_plugin.crosscoder.training import FINAL_DIR, load_training_metrics

    lines = [f"Training run {path}"]
    if (path / FINAL_DIR).is_dir():
        lines += ["  " + line for line in _crosscoder_summary(path / FINAL_DIR)]
        metrics = load_training_metrics(path)
        lines.append("  metrics: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        ))
    else:
        lines.append("  not finished: no final crosscoder yet")
    checkpoints = checkpoint_dirs(path)
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(p.name for p in checkpoints)}")
    return lines


def _unfinished_intervention_summary(path: Path) -> list[str]:
    """An interrupted `mneme intervene` / intervention stage: its output folder holds checkpoints only."""
    from mneme_plugin.interventions.checkpoints import read_checkpoint_info, unfinished

    info = read_checkpoint_info(path) if unfinished(path) else None
    if info is None:
        return []
    from mneme_plugin.layout import RunLayout

    layout = RunLayout(path.parent)
    in_run = layout.edited_model == path and layout.looks_like_run()  # a `mneme run` intervention stage's
    start_over = (f"delete {path} to start over" if in_run else "pass --no-resume to start over")
    return [f"Unfinished intervention {path} ({info.get('kind')})",
            f"  checkpoint at step {info.get('step')} of {info.get('total_steps')}; run "
            f"{'`mneme run`' if in_run else 'the intervention'} again (same config) to resume it, or {start_over}"]


def _edited_model_summary(path: Path) -> list[str]:
    """A model folder written by `mneme intervene` / the intervention stage (``mneme_intervention.yaml``)."""
    import yaml

    from mneme_plugin.interventions.hf_models import INTERVENTION_CONFIG, TRAINING_LOG

    try:
        record = yaml.safe_load((path / INTERVENTION_CONFIG).read_text()) or {}
        architecture, d, layers = _model_shape(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} looks like an edited model folder but cannot be read ({err}).") from err
    config = record.get("config") or {}
    log = path / TRAINING_LOG
    steps = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0
    lines = [f"Edited model {path} ({record.get('kind', '?')})",
             f"  from:          {config.get('model', '?')}",
             f"  architecture:  {architecture}: d_model {d}, {layers} layers",
             f"  training log:  {steps} steps ({TRAINING_LOG})"]
    data = config.get("data") or config.get("forget_corpora")
    if data:
        lines.append(f"  data:          {data}")
    return lines


def _model_shape(path: Path) -> tuple[str, object, object]:
    """(architecture, d_model, layers) from a Hugging Face model folder's config.json ("?" where it
    names none); OSError / ValueError when it cannot be read."""
    import json

    hf = json.loads((path / "config.json").read_text())
    architecture = ", ".join(hf.get("architectures") or []) or hf.get("model_type", "?")
    d = hf.get("hidden_size") or hf.get("d_model") or hf.get("n_embd") or "?"
    layers = hf.get("num_hidden_layers") or hf.get("n_layer") or hf.get("n_layers") or "?"
    return architecture, d, layers


def _hf_model_summary(path: Path) -> list[str]:
    """A Hugging Face model folder not written by `mneme intervene` (a base model, say)."""
    try:
        architecture, d, layers = _model_shape(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/config.json cannot be read ({err}).") from err
    return [f"Hugging Face model {path}",
            f"  architecture:  {architecture}: d_model {d}, {layers} layers (harvest layers 0..{layers - 1 if isinstance(layers, int) else '?'})"]


def _ground_truth_summary(path: Path) -> list[str]:
    """`mneme groundtruth lm-eval|judge`'s output folder: its table, or what a measurement that did not finish left."""
    from mneme_plugin.groundtruth.harness import CONFIG_FILE as LM_EVAL_CONFIG
    from mneme_plugin.groundtruth.table import SCORES_CSV, read_scores_csv

    command = "lm-eval" if (path / LM_EVAL_CONFIG).is_file() else "judge"
    if not (path / SCORES_CSV).is_file():
        return [f"Unfinished ground truth {path} (`mneme groundtruth {command}`): no {SCORES_CSV} yet; run the same "
                "command again (what it measured is kept and not measured again)"]
    table = read_scores_csv(path / SCORES_CSV)
    drops = (table["before"] - table["after"]).sort_values(ascending=False)
    largest = ", ".join(f"{table.loc[i, 'category']} {drops[i]:+.3f}" for i in drops.index[:5])
    return [f"Ground truth {path} (`mneme groundtruth {command}`): {SCORES_CSV}, `mneme evaluate --scores-csv`",
            f"  categories:    {len(table)}; largest drops (before - after): {largest}"]


def _attribution_summary(path: Path) -> list[str]:
    from mneme_plugin.attribution.table import SUMMARY_FILE, format_counts
    from mneme_plugin.files import read_json

    summary = read_json(path / SUMMARY_FILE, "attribute again")
    return [f"Attribution {path} (`mneme attribute`): every latent's class"] + [
        "  " + line for line in format_counts(summary).splitlines()]


def _contexts_summary(path: Path) -> list[str]:
    from mneme_plugin.files import read_json
    from mneme_plugin.interpret.files import CONTEXTS_FILE

    data = read_json(path / CONTEXTS_FILE, "collect again (`mneme collect`)")
    meta = data.get("meta") or {}
    per_latent = data.get("per_latent") or []
    fired = sum(1 for p in per_latent if p.get("top_rows"))
    return [f"Collected contexts {path} (`mneme collect`, Delphi cache)",
            f"  latents:       {len(data.get('latents') or [])} ({fired} fired) of {data.get('width')}",
            f"  read:          {int(data.get('n_tokens') or 0):,} tokens at {data.get('hookpoint')}, "
            f"examples of {data.get('ctx_len')} tokens",
            f"  base model:    {meta.get('base_model')}",
            f"  edited model:  {meta.get('edited_model')}",
            f"  corpus:        {meta.get('corpus')}"]


def _explanations_summary(path: Path) -> list[str]:
    from mneme_plugin.interpret.config import SCORERS
    from mneme_plugin.interpret.explain import has_explanation, load_explanations

    table = load_explanations(path)
    explained = has_explanation(table)
    lines = [f"Explanations {path} (`mneme explain`): {len(table)} latents"]
    if not explained.all():
        lines.append(f"  unparsed:      {int((~explained).sum())} latents (no explanation; not mapped)")
    for name in SCORERS:
        failed = table.get(f"{name}_failed")
        if failed is not None and failed.sum() > 0:
            lines.append(f"  {name + ':':<14} {int(failed.sum())} failed scorer calls "
                         f"({int((failed > 0).sum())} latents scored on fewer samples)")
    for row, has in zip(table.head(5).itertuples(), explained.head(5)):
        lines.append(f"  {row.latent:>8}  {row.explanation if has else '(unparsed answer: no explanation)'}")
    if len(table) > 5:
        lines.append(f"  ... ({len(table) - 5} more)")
    return lines


def _mapping_summary(path: Path) -> list[str]:
    from mneme_plugin.interpret.mapping import load_mapping

    table = load_mapping(path)
    lines = [f"Mapping {path} (`mneme map`)"]
    for taxonomy, rows in table.groupby("taxonomy", sort=False):
        mapped = rows["category"].dropna()
        common = ", ".join(f"{name} ({n})" for name, n in mapped.value_counts().head(5).items())
        lines.append(f"  {taxonomy}: {len(mapped)} of {len(rows)} latents matched a category"
                     + (f"; most often {common}" if common else ""))
    return lines


def _prediction_folders(path: Path) -> list[tuple[str, Path]]:
    """(taxonomy label, folder) of each prediction in a prediction/ folder (the run's own, then one per
    other taxonomy in a subfolder)."""
    from mneme_plugin.sideeffects.predict import PREDICTIONS_JSON

    found = [("", path)] if (path / PREDICTIONS_JSON).is_file() else []
    if path.is_dir():
        found += [(p.name, p) for p in sorted(path.iterdir()) if (p / PREDICTIONS_JSON).is_file()]
    return found


def _prediction_line(folder: Path) -> str:
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.sideeffects.predict import load_prediction

    try:
        prediction = load_prediction(folder)
    except MnemeError as err:  # the rest of the summary still says what the folder holds
        return f"unreadable ({err})"
    verdict = prediction.tests.get("verdict")
    return (f"rule {prediction.config.rule}" + (f", change: {verdict}" if verdict else "")
            + f"; predicted: {', '.join(prediction.predicted) or '(none)'}")


def _prediction_summary(path: Path) -> list[str]:
    return [f"Prediction {path} (`mneme predict`)"] + [
        f"  {'taxonomy ' + label + ': ' if label else ''}{_prediction_line(folder)}"
        for label, folder in _prediction_folders(path)]


def _assembled_run_summary(path: Path) -> list[str]:
    """A run directory without stage markers: stage folders the stage commands (or `mneme pool`) wrote."""
    from mneme_plugin.layout import STAGE_FOLDERS, RunLayout

    layout = RunLayout(path)
    present = [name for name in STAGE_FOLDERS if (path / name).exists()]
    lines = [f"Run directory {path} (no stage markers: written by the stage commands or `mneme pool`)",
             f"  stage folders: {', '.join(present) or '(none)'}"]
    for label, folder in _prediction_folders(layout.prediction):
        lines.append(f"  prediction{' (taxonomy ' + label + ')' if label else ''}: {_prediction_line(folder)}")
    if layout.evaluation.is_dir():
        lines += _evaluation_lines(layout.evaluation)
    if layout.report.is_file():
        lines.append(f"  report: {layout.report}")
    return lines


def _demo_case_intervention(path: Path) -> str:
    """What a demo case's recipe says its edit is (its `mneme run` config's models.intervention)."""
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.organism.demo import RECIPE_FILE
    from mneme_plugin.pipeline.config import RunConfig

    try:
        models = RunConfig.from_yaml(path / RECIPE_FILE).models
    except MnemeError as err:
        return f"(its recipe cannot be read: {err})"
    return models.intervention or f"edited model {models.edited}"


def _demo_case_summary(path: Path) -> list[str]:
    """A `mneme demo` case's folder: the edit, its measured ground truth, the run inside (through the
    run's own summary) and what the demo added beside it (remediation, intersection analysis)."""
    from mneme_plugin.groundtruth.table import SCORES_CSV, read_scores_csv
    from mneme_plugin.organism.demo import CASE_RUN, KNOWLEDGE_SCORES_CSV, RECIPE_FILE
    from mneme_plugin.sideeffects.harmful import INTERSECTION_JSON, load_harmful_intersection
    from mneme_plugin.sideeffects.remediate import CONTROLLED_JSON, load_controlled_remediation

    lines = [f"Demo case {path} (`mneme demo`): {_demo_case_intervention(path)}",
             f"  recipe:        {path / RECIPE_FILE} (the run's `mneme run` config)"]
    for name in (SCORES_CSV, KNOWLEDGE_SCORES_CSV):
        if (path / name).is_file():
            table = read_scores_csv(path / name)
            drops = sorted(zip(table["category"], table["before"] - table["after"]), key=lambda item: -item[1])
            lines.append(f"  ground truth:  {name}, measured drop per category: "
                         + ", ".join(f"{category} {drop:+.2f}" for category, drop in drops))
    if (path / CONTROLLED_JSON).is_file():
        remediation = load_controlled_remediation(path)
        lines.append(f"  remediation:   share of the lost accuracy recovered: remediation "
                     f"{metric_text(remediation.mean_recovered('remediated'))}, control "
                     f"{metric_text(remediation.mean_recovered('control'))} ({CONTROLLED_JSON})")
    else:
        lines.append(f"  remediation:   none ({_no_remediation_reason(path)})")
    if (path / INTERSECTION_JSON).is_file():
        lines.append(f"  intersection:  {load_harmful_intersection(path).summary()}")
    lines += ["  " + line for line in describe_path(path / CASE_RUN).splitlines()]
    return lines


def _no_remediation_reason(path: Path) -> str:
    """Why a demo case folder holds no remediation: the behaviour cases have none, nothing degraded, MNEME
    named nothing to reverse, or the demo stopped before it (the run's evaluation tells)."""
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.organism.catalog import BEHAVIOUR_INTERVENTIONS
    from mneme_plugin.organism.demo import CASE_RUN
    from mneme_plugin.sideeffects.evaluate import load_evaluations

    if path.name in BEHAVIOUR_INTERVENTIONS:  # `mneme demo` names a case's folder by its intervention
        return "the behaviour cases are not remediated"
    try:
        evaluation = next(iter(load_evaluations(RunLayout(path / CASE_RUN).evaluation).values()))
    except (MnemeError, StopIteration):
        return "the case's run has no evaluation yet: the demo stopped before it; run `mneme demo` again to finish"
    if not evaluation.true_set:
        return "nothing degraded, so there is no lost accuracy to recover"
    if not evaluation.predicted.get("MNEME"):
        return f"{', '.join(evaluation.true_set)} degraded, but MNEME named no side effect, so there is nothing to retrain on"
    return ("the demo stopped before it, or no changed latent had contexts to retrain on (its log says which); "
            "run `mneme demo` again to finish")


def _demo_output_summary(path: Path, cases: list[Path]) -> list[str]:
    """`mneme demo --out`'s folder: its cases (and control runs), each described by `mneme info CASE`."""
    folders = f"{len(cases)} case folder" + ("" if len(cases) == 1 else "s")
    lines = [f"Demo output {path} (`mneme demo`): {folders} (`mneme info {cases[0]}` describes one)"]
    lines += [f"  {case.name + ':':<18} {_demo_case_intervention(case)}" for case in cases]
    return lines


def _demo_cases(path: Path) -> list[Path]:
    from mneme_plugin.organism.demo import is_case_folder

    return [child for child in sorted(path.iterdir()) if is_case_folder(child)] if path.is_dir() else []


def _stage_output_kinds(path: Path) -> list[str]:
    """Which stages' outputs the folder ``path`` holds (by their files): one, or several where `mneme
    explain` and `mneme map` wrote beside the contexts (their default)."""
    from mneme_plugin.attribution.table import SUMMARY_FILE
    from mneme_plugin.interpret.files import CATEGORIES_PARQUET, CONTEXTS_FILE, EXPLANATIONS_CSV, EXPLANATIONS_PARQUET
    from mneme_plugin.sideeffects import load_evaluations

    from mneme_plugin.groundtruth.harness import CONFIG_FILE as LM_EVAL_CONFIG
    from mneme_plugin.groundtruth.judge import CONFIG_FILE as JUDGE_CONFIG

    found = {
        # by the command's config (a demo case keeps a ground_truth.csv of its own beside other things)
        "ground_truth": any((path / name).is_file() for name in (LM_EVAL_CONFIG, JUDGE_CONFIG)),
        "attribution": (path / SUMMARY_FILE).is_file(),
        "contexts": (path / CONTEXTS_FILE).is_file(),
        "explanations": (path / EXPLANATIONS_PARQUET).is_file() or (path / EXPLANATIONS_CSV).is_file(),
        "mapping": (path / CATEGORIES_PARQUET).is_file(),
        "prediction": bool(_prediction_folders(path)),
        "evaluation": path.is_dir() and bool(load_evaluations(path)),
    }
    return [kind for kind, here in found.items() if here]


def _is_assembled_run(path: Path) -> bool:
    from mneme_plugin.layout import CONFIG_FILE as RUN_CONFIG, STAGE_FOLDERS

    return (path / RUN_CONFIG).is_file() or any((path / name).is_dir() for name in STAGE_FOLDERS)


def folder_kind(path: str | Path) -> str | None:
    """What ``path`` is, in a few words with where its parts are (for an error naming a wrong folder):
    e.g. "a `mneme run` directory (its store: RUN/activations, its crosscoder: RUN/crosscoder_run)".
    None when it is none of the things mneme writes."""
    from mneme_plugin.activations.models import is_hf_model_config
    from mneme_plugin.activations.manifest import MANIFEST
    from mneme_plugin.checkpoints import latest_checkpoint
    from mneme_plugin.crosscoder.files import CONFIG_FILE, FINAL_DIR, WEIGHTS_FILE
    from mneme_plugin.layout import RunLayout

    path = Path(path)
    if not path.is_dir():
        return None
    layout = RunLayout(path)
    if layout.stages.is_dir() or _is_assembled_run(path):
        parts = []
        if (layout.activations / MANIFEST).is_file():
            parts.append(f"its store: {layout.activations}")
        if (layout.crosscoder_run / FINAL_DIR).is_dir():
            parts.append(f"its crosscoder: {layout.crosscoder_run}")
        elif layout.crosscoder_run.is_dir():
            parts.append(f"its crosscoder's training, not finished: {layout.crosscoder_run}")
        if layout.attribution.is_dir():
            parts.append(f"its attribution: {layout.attribution}")
        return "a run directory" + (f" ({'; '.join(parts)})" if parts else "")
    if (path / MANIFEST).is_file():
        return "an activation store (`mneme harvest`; give it as --store)"
    if (path / "config.json").is_file() and is_hf_model_config(path / "config.json"):
        return "a Hugging Face model folder (give it as --base / --edited)"
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "a crosscoder (give it as --crosscoder)"
    if (path / FINAL_DIR).is_dir():
        return f"a training run (its crosscoder: {path / FINAL_DIR}; give it as --crosscoder)"
    newest = latest_checkpoint(path)
    if newest is not None:
        return (f"a training run that has not finished (newest checkpoint: {newest}): run the same "
                "`mneme train` again to finish it, or give that checkpoint")
    stages = _stage_output_kinds(path)
    if stages:
        return "the output of " + " and ".join(f"`mneme {_STAGE_COMMANDS[stage]}`" for stage in stages)
    from mneme_plugin.organism.demo import CASE_RUN, is_case_folder

    if is_case_folder(path):
        return f"a `mneme demo` case (its run directory: {path / CASE_RUN})"
    return None


def describe_path(path: str | Path) -> str:
    """A human-readable summary of what ``path`` holds (see the module docstring)."""
    from mneme_plugin.activations.models import is_hf_model_config
    from mneme_plugin.activations.manifest import MANIFEST
    from mneme_plugin.checkpoints import CHECKPOINT_DIR
    from mneme_plugin.crosscoder.files import CONFIG_FILE, FINAL_DIR, WEIGHTS_FILE
    from mneme_plugin.interventions.hf_models import INTERVENTION_CONFIG
    from mneme_plugin.layout import RunLayout

    path = Path(path)
    # config.yaml: only `mneme run` writes it, before its first stage (a run stopped in it has no marker yet)
    if RunLayout(path).stages.is_dir() or RunLayout(path).config.is_file():
        return "\n".join(_pipeline_summary(path))
    if (path / MANIFEST).is_file():
        return "\n".join(_store_summary(path))
    if (path / INTERVENTION_CONFIG).is_file():  # an HF folder: its config.json is no crosscoder's
        return "\n".join(_edited_model_summary(path))
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        if is_hf_model_config(path / CONFIG_FILE):
            return "\n".join(_hf_model_summary(path))
        from mneme_plugin.formats import detect_format

        # A science-of-finetuning hub folder has these two file names too (its config.json: their init kwargs).
        fmt = detect_format(path)
        return "\n".join(_crosscoder_summary(path, fmt if fmt not in (None, "mneme") else None))
    intervention = _unfinished_intervention_summary(path)
    if intervention:
        return "\n".join(intervention)
    if (path / FINAL_DIR).is_dir() or (path / CHECKPOINT_DIR).is_dir():
        return "\n".join(_training_run_summary(path))
    if (path / "config.json").is_file() and is_hf_model_config(path / "config.json"):
        return "\n".join(_hf_model_summary(path))
    if path.is_dir() and _is_assembled_run(path):
        return "\n".join(_assembled_run_summary(path))
    stages = _stage_output_kinds(path)
    if stages:
        return "\n".join(line for stage in stages for line in _STAGE_SUMMARIES[stage](path))
    from mneme_plugin.organism.demo import is_case_folder

    if is_case_folder(path):
        return "\n".join(_demo_case_summary(path))
    cases = _demo_cases(path)
    if cases:
        return "\n".join(_demo_output_summary(path, cases))
    from mneme_plugin.formats import detect_format

    fmt = detect_format(path) if path.is_dir() else None
    if fmt is not None:  # an SAE-Lens export, a trainSAE output, a published crosscoder's folder
        return "\n".join(_crosscoder_summary(path, fmt))
    from mneme_plugin.sideeffects.remediate import REMEDIATED_MODEL

    if (path / REMEDIATED_MODEL / "config.json").is_file():
        return "\n".join(_remediation_summary(path))
    if path.is_file() and path.parent != path:
        return f"{path} is a file; the folder it is in:\n" + describe_path(path.parent)
    steps = sorted(p.name for p in path.glob("step_*") if (p / CONFIG_FILE).is_file())
    if steps:
        return "\n".join([f"Training checkpoints {path}: {', '.join(steps)}",
                          f"  each is a crosscoder (`mneme info {path / steps[-1]}`); the finished one is "
                          f"{path.parent / FINAL_DIR}"])
    raise CheckpointError(
        f"{path} holds nothing mneme writes: no activation store ({MANIFEST}), crosscoder ({CONFIG_FILE} + "
        f"{WEIGHTS_FILE}), training run ({FINAL_DIR}/, {CHECKPOINT_DIR}/), model folder (config.json), run "
        "directory (.stages/ or stage folders) or stage output (ground truth, attribution, contexts, explanations, "
        "mapping, prediction, evaluation)."
    )


def _remediation_summary(path: Path) -> list[str]:
    from mneme_plugin.sideeffects.remediate import REMEDIATED_MODEL, load_remediation_scores

    lines = [f"Remediation output {path} (`mneme remediate`)", f"  retrained model: {path / REMEDIATED_MODEL} "
             "(a Hugging Face model folder: measure it as the edited one, e.g. with lm-eval)"]
    table = load_remediation_scores(path)
    if table is not None:
        lines += [f"  {row.category}: {row.before_remediation:.3f} -> {row.after_remediation:.3f}"
                  for row in table.itertuples(index=False)]
    return lines


def _evaluation_summary(path: Path) -> list[str]:
    return [f"Evaluation {path} (`mneme evaluate`)"] + _evaluation_lines(path)


_STAGE_COMMANDS = {"ground_truth": "groundtruth lm-eval|judge", "attribution": "attribute", "contexts": "collect",
                   "explanations": "explain", "mapping": "map", "prediction": "predict", "evaluation": "evaluate"}
_STAGE_SUMMARIES = {"ground_truth": _ground_truth_summary, "attribution": _attribution_summary, "contexts": _contexts_summary,
                    "explanations": _explanations_summary, "mapping": _mapping_summary,
                    "prediction": _prediction_summary, "evaluation": _evaluation_summary}
