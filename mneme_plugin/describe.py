"""What a path on disk holds: an activation store, a crosscoder, a training run, an edited model or a
run directory (``mneme info``)."""

from __future__ import annotations

from pathlib import Path

from mneme_plugin.errors import CheckpointError


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


def _crosscoder_summary(path: Path) -> list[str]:
    from mneme_plugin.crosscoder import CrossCoder

    model = CrossCoder.from_pretrained(path)
    cfg = model.cfg
    threshold = float(model.threshold)
    lines = [
        f"Crosscoder {path}",
        f"  {type(model).__name__}: d={cfg.activation_dim}, latents={cfg.dict_size}, k={cfg.k}, "
        f"salience={cfg.salience}, dtype={cfg.dtype}",
        f"  inference threshold: {threshold:.4g}" if threshold >= 0 else "  inference threshold: not estimated",
        "  activation scale: " + ", ".join(f"{s:.4g}" for s in model.activation_scale.tolist()) + " (base, edited)",
    ]
    for key, value in cfg.metadata.items():
        lines.append(f"  {key}: {value}")
    return lines


def _pipeline_summary(path: Path) -> list[str]:
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.layout import CACHE_DIR, RunLayout
    from mneme_plugin.pipeline import read_stage_markers
    from mneme_plugin.sideeffects import load_evaluations

    layout = RunLayout(path)
    lines = [f"MNEME run {path}"]
    for marker in read_stage_markers(path):
        lines.append(f"  stage {marker.stage:<10} done in {marker.seconds:.1f} s (config {marker.fingerprint})")
    if layout.evaluation.is_dir():
        try:
            evaluations = load_evaluations(layout.evaluation)
        except MnemeError as err:
            lines.append(f"  evaluation: unreadable ({err})")
            evaluations = {}
        for name, evaluation in evaluations.items():
            if name:
                lines.append(f"  ground truth {name} (taxonomy {evaluation.taxonomy}):")
            lines.append(f"  degraded: {', '.join(evaluation.true_set) or '(none)'}; "
                         f"predicted: {', '.join(evaluation.predicted.get('MNEME', [])) or '(none)'}")
            for method, m in evaluation.rows.items():
                lines.append(f"  {method:<7} Acc {m.accuracy:.3f}  P {m.precision:.3f}  R {m.recall:.3f}  F1 {m.f1:.3f}")
    if layout.report.is_file():
        lines.append(f"  report: {layout.report}")
    cache = layout.root / CACHE_DIR
    if cache.is_dir():
        sizes = {stage.name: sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
                 for stage in sorted(cache.iterdir()) if stage.is_dir()}
        if sizes:
            lines.append(f"  cache: {cache} ({', '.join(f'{name} {_mib(size)}' for name, size in sizes.items())}; "
                         "kept when stages are redone; deleting it costs only time)")
    return lines


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _training_run_summary(path: Path) -> list[str]:
    from mneme_plugin.crosscoder.training import CHECKPOINT_DIR, FINAL_DIR, load_training_metrics

    lines = [f"Training run {path}"]
    if (path / FINAL_DIR).is_dir():
        lines += ["  " + line for line in _crosscoder_summary(path / FINAL_DIR)]
        metrics = load_training_metrics(path)
        lines.append("  metrics: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        ))
    else:
        lines.append("  not finished: no final crosscoder yet")
    checkpoints = sorted((path / CHECKPOINT_DIR).glob("step_*"))
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(p.name for p in checkpoints)}")
    return lines


def _unfinished_intervention_summary(path: Path) -> list[str]:
    """An interrupted `mneme intervene` / intervention stage: its output folder holds checkpoints only."""
    from mneme_plugin.interventions.checkpoints import read_checkpoint_info, unfinished

    info = read_checkpoint_info(path) if unfinished(path) else None
    if info is None:
        return []
    return [f"Unfinished intervention {path} ({info.get('kind')})",
            f"  checkpoint at step {info.get('step')} of {info.get('total_steps')}; run the intervention again "
            "(same config) to resume it, or pass --no-resume to start over"]


def _edited_model_summary(path: Path) -> list[str]:
    """A model folder written by `mneme intervene` / the intervention stage (``mneme_intervention.yaml``)."""
    import json

    import yaml

    from mneme_plugin.interventions.hf_models import INTERVENTION_CONFIG, TRAINING_LOG

    try:
        record = yaml.safe_load((path / INTERVENTION_CONFIG).read_text()) or {}
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} looks like an edited model folder but cannot be read ({err}).") from err
    config = record.get("config") or {}
    log = path / TRAINING_LOG
    steps = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0
    architecture = ", ".join(hf.get("architectures") or []) or hf.get("model_type", "?")
    lines = [f"Edited model {path} ({record.get('kind', '?')})",
             f"  from:          {config.get('model', '?')}",
             f"  architecture:  {architecture}: d_model {hf.get('hidden_size', '?')}, "
             f"{hf.get('num_hidden_layers', '?')} layers",
             f"  training log:  {steps} steps ({TRAINING_LOG})"]
    data = config.get("data") or config.get("forget_corpora")
    if data:
        lines.append(f"  data:          {data}")
    return lines


def describe_path(path: str | Path) -> str:
    """A human-readable summary of a store, a crosscoder, a training run or a ``mneme run`` directory."""
    from mneme_plugin.activations.store import MANIFEST
    from mneme_plugin.crosscoder.model import CONFIG_FILE, WEIGHTS_FILE
    from mneme_plugin.crosscoder.training import CHECKPOINT_DIR, FINAL_DIR
    from mneme_plugin.interventions.hf_models import INTERVENTION_CONFIG
    from mneme_plugin.layout import RunLayout

    path = Path(path)
    if RunLayout(path).stages.is_dir():
        return "\n".join(_pipeline_summary(path))
    if (path / MANIFEST).is_file():
        return "\n".join(_store_summary(path))
    if (path / INTERVENTION_CONFIG).is_file():  # an HF folder: its config.json is no crosscoder's
        return "\n".join(_edited_model_summary(path))
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "\n".join(_crosscoder_summary(path))
    intervention = _unfinished_intervention_summary(path)
    if intervention:
        return "\n".join(intervention)
    if (path / FINAL_DIR).is_dir() or (path / CHECKPOINT_DIR).is_dir():
        return "\n".join(_training_run_summary(path))
    raise CheckpointError(
        f"{path} holds no activation store ({MANIFEST}), crosscoder ({CONFIG_FILE} + {WEIGHTS_FILE}), "
        f"training run ({FINAL_DIR}/, {CHECKPOINT_DIR}/) or mneme run directory (.stages/)."
    )
