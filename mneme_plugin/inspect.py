"""What a path on disk holds: an activation store, a crosscoder, or a training run (``mneme info``)."""

from __future__ import annotations

import json
from pathlib import Path

from mneme_plugin.errors import CheckpointError


def _store_summary(path: Path) -> list[str]:
    from mneme_plugin.activations import ActivationStore

    store = ActivationStore(path)
    m = store.manifest
    norm = m.get("normalization", {})
    lines = [
        f"Activation store {path} ({'complete' if m.get('complete') else 'PARTIAL: resume the harvest'})",
        f"  base model:    {m.get('base_model')}",
        f"  edited model:  {m.get('edited_model')}",
        f"  hook:          {m.get('hook_name')} (layer {m.get('layer')}), d_model {m.get('d_model')}",
        f"  corpus:        {m.get('corpus')}",
        f"  rows:          {m.get('n_tokens'):,} in {len(m.get('shards', []))} shards ({m.get('dtype')}), "
        f"{m.get('n_windows'):,} windows of {m.get('context_length')} tokens",
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
    from mneme_plugin.layout import RunLayout

    layout = RunLayout(path)
    lines = [f"MNEME run {path}"]
    for marker in sorted((path / ".stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
        info = json.loads(marker.read_text())
        lines.append(f"  stage {info['stage']:<10} done in {info.get('seconds', 0):.1f} s (config {info['fingerprint']})")
    if (layout.evaluation / "evaluation.json").is_file():
        evaluation = json.loads((layout.evaluation / "evaluation.json").read_text())
        lines.append(f"  degraded: {', '.join(evaluation['true']) or '(none)'}; "
                     f"predicted: {', '.join(evaluation['predicted'].get('MNEME', [])) or '(none)'}")
        for method, m in evaluation["metrics"].items():
            lines.append(f"  {method:<7} Acc {m['accuracy']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}")
    if layout.report.is_file():
        lines.append(f"  report: {layout.report}")
    return lines


def describe_path(path: str | Path) -> str:
    """A human-readable summary of a store, a crosscoder, a training run or a ``mneme run`` directory."""
    path = Path(path)
    if (path / ".stages").is_dir():
        return "\n".join(_pipeline_summary(path))
    if (path / "manifest.json").is_file():
        return "\n".join(_store_summary(path))
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "\n".join(_crosscoder_summary(path))
    if (path / "crosscoder").is_dir() or (path / "checkpoints").is_dir():
        lines = [f"Training run {path}"]
        if (path / "crosscoder").is_dir():
            lines += ["  " + line for line in _crosscoder_summary(path / "crosscoder")]
        else:
            lines.append("  not finished: no final crosscoder yet")
        checkpoints = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
        if checkpoints:
            lines.append(f"  checkpoints: {', '.join(p.name for p in checkpoints)}")
        if (path / "metrics.json").is_file():
            metrics = json.loads((path / "metrics.json").read_text())
            lines.append("  metrics: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            ))
        return "\n".join(lines)
    raise CheckpointError(
        f"{path} holds no activation store (manifest.json), crosscoder (config.json + model.safetensors), "
        "training run (crosscoder/, checkpoints/) or mneme run directory (.stages/)."
    )
