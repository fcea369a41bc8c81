"""``attribute``: the per-latent table of a crosscoder in one streaming pass over activations."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mneme_plugin.activations.store import ActivationStore
from mneme_plugin.attribution.classify import classify, delta_bands
from mneme_plugin.attribution.config import CLASSES
from mneme_plugin.attribution.config import AttributionConfig
from mneme_plugin.attribution.decoder_norms import decoder_stats
from mneme_plugin.attribution.latent_scaling import LatentScalingAccumulator
from mneme_plugin.attribution.table import COLUMNS, SUMMARY_FILE, TABLE_PARQUET, AttributionResult, save_attribution
from mneme_plugin.crosscoder.base import CrossCoder
from mneme_plugin.crosscoder.provenance import check_same_source
from mneme_plugin.devices import resolve_device
from mneme_plugin.errors import EmptyCorpusError, ModelMismatchError, NonFiniteActivationError
from mneme_plugin.files import holds_output_lock

logger = logging.getLogger("mneme_plugin")

AttributionData = Union[str, os.PathLike, ActivationStore, torch.Tensor, Iterable[torch.Tensor]]
CrossCoderLike = Union[CrossCoder, str, os.PathLike]

SPACE_NOTE = (
    "normalised: activations multiplied by the crosscoder's activation_scale (E||x|| = sqrt(d) per model), "
    "the space its decoder rows live in; decoder norms are of the stored rows"
)
HISTOGRAM_BINS = 20


def resolve_crosscoder(crosscoder: CrossCoderLike) -> CrossCoder:
    """A crosscoder object as is; a path (any format ``load_crosscoder`` reads, or a run directory) loaded."""
    if isinstance(crosscoder, (str, os.PathLike)):
        from mneme_plugin.formats import load_crosscoder

        return load_crosscoder(crosscoder)
    return crosscoder


def _check_batch(x: Any, d: int, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected (batch, 2, d) tensors from the data, got {type(x).__name__} ({where}).")
    if x.ndim != 3 or x.shape[1] != 2:
        raise ModelMismatchError(
            f"Expected stacked activations of shape (batch, 2, {d}) [index 0 base, 1 edited], got {tuple(x.shape)} ({where})."
        )
    if x.shape[2] != d:
        raise ModelMismatchError(
            f"The activations have d_model={x.shape[2]} but the crosscoder expects activation_dim={d} ({where}): "
            "use the activation store the crosscoder was trained on (same models and layer)."
        )
    return x


def _iter_batches(data: AttributionData, d: int, batch_size: int, progress: bool) -> tuple[Iterator[torch.Tensor], str]:
    """Batches (B, 2, d) covering every row once, and a description of the data."""
    if isinstance(data, (str, os.PathLike)):
        data = ActivationStore(data, cache_shards=1)
    if isinstance(data, ActivationStore):
        store = data
        if store.d_model != d:
            raise ModelMismatchError(
                f"The activation store {store.path} has d_model={store.d_model} but the crosscoder expects "
                f"activation_dim={d}: use the store the crosscoder was trained on (same models and layer)."
            )

        def from_store() -> Iterator[torch.Tensor]:
            for i in tqdm(range(store.num_shards), desc="attribute (shards)", unit="shard", disable=not progress):
                acts = store.load_shard(i)["activations"]
                for chunk in acts.split(batch_size):
                    yield _check_batch(chunk, d, f"shard {i} of {store.path}")

        return from_store(), f"store {store.path}"
    if isinstance(data, torch.Tensor):
        x = _check_batch(data, d, "tensor")
        return iter(x.split(batch_size)), f"tensor of {x.shape[0]} rows"

    def from_iterable() -> Iterator[torch.Tensor]:
        for i, x in enumerate(tqdm(data, desc="attribute (batches)", unit="batch", disable=not progress)):
            yield _check_batch(x, d, f"batch {i}")

    return from_iterable(), "stream"


def _check_scales(crosscoder: CrossCoder, data: Any) -> None:
    scale = getattr(data, "scale_factors", None)
    if scale is None:
        return
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    own = crosscoder.activation_scale.detach().float().cpu()
    if scale.shape == own.shape and not torch.allclose(scale, own, rtol=1e-3):
        logger.warning(
            "The data's normalisation factors %s differ from the crosscoder's %s: was it trained on other "
            "activations? The crosscoder's own factors are used.", scale.tolist(), own.tolist(),
        )


def delta_histogram(delta: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    values = delta[np.isfinite(delta)]
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def build_table(columns: dict[str, np.ndarray], config: AttributionConfig) -> pd.DataFrame:
    cols = dict(columns)
    cols.update(classify(cols, config))
    table = pd.DataFrame({name: cols[name] for name in COLUMNS if name != "latent" and name in cols})
    table.insert(0, "latent", np.arange(len(table), dtype=np.int64))
    table["betas_confirm"] = pd.array(list(table["betas_confirm"]), dtype="boolean")
    return table[list(COLUMNS)]


def summarize(table: pd.DataFrame, config: AttributionConfig, n_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    counts = {name: int((table["latent_class"] == name).sum()) for name in CLASSES}
    delta = table["delta"].to_numpy(dtype=float)
    fired = table["fire_count"].to_numpy() > 0
    confirm = table["betas_confirm"]
    base_band, edited_band, _ = delta_bands(delta, config)  # the bands classify placed the latents by
    demoted_base = int((base_band & fired & (table["latent_class"] == "suppressed")).sum())
    demoted_edited = int((edited_band & fired & (table["latent_class"] == "amplified")).sum())
    return {
        "n_latents": int(len(table)),
        "n_tokens": int(n_tokens),
        "n_dead": counts["dead"],
        "n_never_fired": int((~fired).sum()),
        "counts": counts,
        "demoted_by_betas": {"base_only": demoted_base, "edited_only": demoted_edited},
        "betas_confirmed": int(confirm.fillna(False).sum()),
        "fired_with_nan_nu_e": int((fired & table["nu_e"].isna().to_numpy()).sum()),
        "delta_histogram": delta_histogram(delta[fired]),
        "space": SPACE_NOTE,
        "latent_vector": "beta_*: edited decoder row for every target; mbeta_*: base decoder row (mirror)",
        "score": "(2*delta - 1) * (1 - min(1, |nu_e of the side delta points to|)); rank 1 = most base-specific",
        "config": config.to_dict(),
        **extra,
    }


@torch.no_grad()
@holds_output_lock("out_dir", "attribution folder (--out)")
def attribute(
    crosscoder: CrossCoderLike,
    data: AttributionData,
    config: AttributionConfig | dict[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    allow_partial: bool = False,
) -> AttributionResult:
    """Decoder norms, latent-scaling betas and a class for every latent of ``crosscoder``.

    ``data``: an activation store (or its path), a (n, 2, d) tensor, or an iterable of raw
    (B, 2, d) batches; every row is used once, in one pass, with memory O(m d). Betas are computed
    in the crosscoder's normalised space. With ``out_dir`` the table and summary are written there
    (the folder is locked meanwhile: a second attribution into it fails, OutputLockedError). A store
    whose harvest did not finish (or with damaged shards) is refused unless ``allow_partial``.
    """
    cfg = AttributionConfig.of(config)
    cc = resolve_crosscoder(crosscoder)
    device = resolve_device(cfg.device)
    if cc.W_dec.device != device:
        cc = copy.deepcopy(cc).to(device)
    was_training = cc.training
    cc.eval()
    d = int(cc.activation_dim)
    use_threshold = bool(cc.threshold >= 0)
    if not use_threshold:
        logger.warning(
            "The crosscoder has no inference threshold: codes come from BatchTopK over each batch of %d rows, "
            "so they depend on batch composition.", cfg.batch_size,
        )
    store = ActivationStore(data, cache_shards=1) if isinstance(data, (str, os.PathLike)) else data
    if isinstance(store, ActivationStore):
        store.require_complete(allow_partial, use="attribution")
        check_same_source(cc, store.manifest, what=f"the store {store.path}", allow=cfg.allow_store_mismatch,
                          override="--allow-store-mismatch (attribution.allow_store_mismatch: true)")
    batches, data_desc = _iter_batches(store, d, cfg.batch_size, progress)
    _check_scales(cc, store)

    acc = LatentScalingAccumulator.from_crosscoder(cc, device=device)
    try:
        for x in batches:
            if x.shape[0] == 0:  # a zero-row shard or stream batch adds nothing (and BatchTopK cannot encode it)
                continue
            x = x.to(device=device, dtype=cc.W_enc.dtype)
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"The activations ({data_desc}) contain NaN or inf after {acc.n_tokens} rows; re-harvest them."
                )
            acc.update(x)
    finally:
        cc.train(was_training)
    if acc.n_tokens == 0:
        raise EmptyCorpusError(f"The data ({data_desc}) yielded no rows to attribute.")

    columns = {k: v.numpy() for k, v in decoder_stats(cc.W_dec).items()}
    columns.update({k: v.numpy() for k, v in acc.finalize().items()})
    table = build_table(columns, cfg)
    extra = {
        "data": data_desc,
        "encoding": "threshold" if use_threshold else f"batch_topk (batch_size {cfg.batch_size})",
        "crosscoder": {
            "activation_dim": d,
            "dict_size": int(cc.dict_size),
            "k": int(cc.k),
            "salience": cc.cfg.salience,
            "threshold": float(cc.threshold),
            "activation_scale": [float(s) for s in cc.activation_scale.tolist()],
            "metadata": cc.cfg.metadata,
        },
    }
    summary = summarize(table, cfg, acc.n_tokens, extra)
    result = AttributionResult(table=table, summary=summary)
    logger.info(
        "Attributed %d latents over %d tokens: %s.", summary["n_latents"], acc.n_tokens,
        ", ".join(f"{k} {v}" for k, v in summary["counts"].items()),
    )
    if out_dir is not None:
        save_attribution(result, out_dir)
        logger.info("Attribution table written to %s (parquet + CSV), summary to %s.",
                    Path(out_dir) / TABLE_PARQUET, Path(out_dir) / SUMMARY_FILE)
    return result
