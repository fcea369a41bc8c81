"""attribute() end to end: planted lost features rank first, files, dead latents, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mneme_plugin.attribution import CLASSES, AttributionConfig, attribute, load_attribution
from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig
from mneme_plugin.errors import CheckpointError, ModelMismatchError, NonFiniteActivationError
from tests.helpers import write_activation_store


def _best_latents(crosscoder, planted):
    decoder = crosscoder.W_dec.detach()
    latents = torch.nn.functional.normalize(torch.cat([decoder[0], decoder[1]], dim=-1), dim=-1)
    truth = torch.nn.functional.normalize(planted.directions.reshape(len(planted.kind), -1), dim=-1)
    best_cos, best = (truth @ latents.T).max(dim=1)
    return best_cos, best


def test_lost_features_are_suppressed_and_ranked_first(planted, planted_crosscoder, tmp_path):
    result = attribute(planted_crosscoder, planted.x, AttributionConfig(device="cpu"), out_dir=tmp_path, progress=False)
    table = result.table
    best_cos, best = _best_latents(planted_crosscoder, planted)
    kinds = np.array(planted.kind)
    lost = sorted({int(best[i]) for i in np.nonzero(kinds == "base_only")[0] if best_cos[i] > 0.8})
    gained = sorted({int(best[i]) for i in np.nonzero(kinds == "edited_only")[0] if best_cos[i] > 0.8})
    shared = sorted({int(best[i]) for i in np.nonzero(kinds == "shared")[0] if best_cos[i] > 0.9})
    assert len(lost) >= 4 and len(gained) >= 4 and len(shared) >= 12

    assert set(table.loc[lost, "latent_class"]) <= {"base_only", "suppressed"}
    assert (table.loc[lost, "latent_class"] == "base_only").mean() >= 0.75
    assert set(table.loc[gained, "latent_class"]) <= {"edited_only", "amplified"}
    assert (table.loc[shared, "latent_class"] == "shared").all()
    # The lost features are the top of the ranking, the gained ones the bottom of the live ones.
    assert set(table.loc[lost, "rank"]) == set(range(1, len(lost) + 1))
    assert set(result.ranked("base", n=len(lost))["latent"]) == set(lost)
    assert set(result.ranked("edited", n=len(gained))["latent"]) == set(gained)

    # Dead latents: NaN betas, counted in the summary.
    dead = table["fire_count"] == 0
    assert dead.sum() > 0 and result.summary["n_dead"] == int(dead.sum()) == result.counts["dead"]
    assert table.loc[dead, ["beta_r_base", "beta_e_edited", "nu_e", "mean_act", "score"]].isna().all().all()
    assert sum(result.counts.values()) == len(table) == planted_crosscoder.dict_size
    assert result.summary["n_tokens"] == planted.x.shape[0]
    assert sum(result.summary["delta_histogram"]["counts"]) == int((~dead).sum())

    # Written files round-trip.
    assert {p.name for p in tmp_path.iterdir()} == {"attribution.parquet", "attribution.csv", "attribution_summary.json"}
    loaded = load_attribution(tmp_path)
    assert loaded.summary == json.loads((tmp_path / "attribution_summary.json").read_text())
    assert list(loaded.table.columns) == list(table.columns)
    assert (loaded.table["latent_class"] == table["latent_class"]).all()
    np.testing.assert_allclose(loaded.table["nu_e"], table["nu_e"], equal_nan=True)
    (tmp_path / "attribution.parquet").unlink()
    from_csv = load_attribution(tmp_path)
    np.testing.assert_allclose(from_csv.table["score"], table["score"], rtol=1e-12, equal_nan=True)
    assert set(result.counts) == set(CLASSES)


def test_loads_crosscoder_and_store_from_paths(planted, planted_crosscoder, tmp_path):
    planted_crosscoder.save_pretrained(tmp_path / "cc")
    store = write_activation_store(tmp_path / "store", planted.x[:5000], rows_per_shard=2000, scale_factors=[1.0, 1.0])
    from_paths = attribute(tmp_path / "cc", store, {"device": "cpu", "batch_size": 999}, progress=False)
    direct = attribute(planted_crosscoder, planted.x[:5000], AttributionConfig(device="cpu"), progress=False)
    np.testing.assert_allclose(from_paths.table["beta_e_base"], direct.table["beta_e_base"], rtol=1e-5, equal_nan=True)  # float32 encoding, other batch sizes
    assert from_paths.summary["data"].startswith("store ")


def test_mismatched_width_is_a_clear_error(planted_crosscoder, tmp_path):
    x = torch.randn(100, 2, 16)
    store = write_activation_store(tmp_path / "store16", x, rows_per_shard=50)
    with pytest.raises(ModelMismatchError, match="d_model=16.*activation_dim=32"):
        attribute(planted_crosscoder, store, progress=False)
    with pytest.raises(ModelMismatchError, match="d_model=16"):
        attribute(planted_crosscoder, x, progress=False)
    with pytest.raises(ModelMismatchError, match=r"shape \(batch, 2, 32\)"):
        attribute(planted_crosscoder, [torch.randn(10, 3, 32)], progress=False)


def test_non_finite_and_missing_inputs(planted_crosscoder, tmp_path):
    x = torch.randn(10, 2, 32)
    x[3, 1, 5] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        attribute(planted_crosscoder, x, progress=False)
    with pytest.raises(CheckpointError):
        load_attribution(tmp_path)


def test_an_attribution_rewritten_in_place_and_stopped_is_not_read_half_new(planted, planted_crosscoder, tmp_path):
    """attribute into a folder holding an earlier attribution, stopped while it writes (here the CSV
    cannot be written): the old summary must not stay next to the new table, read as one attribution."""
    x = planted.x[:3000]
    attribute(planted_crosscoder, x, AttributionConfig(device="cpu"), tmp_path, progress=False)
    (tmp_path / "attribution.csv").unlink()
    (tmp_path / "attribution.csv").mkdir()  # the write of the CSV fails after the parquet's
    with pytest.raises(OSError):
        attribute(planted_crosscoder, x[:1000], AttributionConfig(device="cpu"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="holds no attribution"):
        load_attribution(tmp_path)


def test_untrained_crosscoder_falls_back_to_batch_topk_and_counts_dead(caplog):
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=256, k=1))
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        result = attribute(cc, torch.randn(64, 2, 8), {"device": "cpu"}, progress=False)
    assert "no inference threshold" in caplog.text
    never = int((result.table["fire_count"] == 0).sum())
    assert never > 0 and result.summary["n_never_fired"] == never == result.counts["dead"]
    assert result.summary["encoding"].startswith("batch_topk")


@pytest.mark.parametrize("encoding", ["threshold", "batch_topk"])
def test_zero_row_batches_and_shards_are_skipped(random_crosscoder, encoding, tmp_path):
    """A zero-row batch in a stream (or a zero-row shard of a store) failed with a raw RuntimeError from a
    reshape; it adds nothing, so the table equals the one without it."""
    import copy

    import pandas.testing as pd_testing

    from mneme_plugin.activations.manifest import read_manifest, write_manifest
    from mneme_plugin.activations.store import write_shard
    from tests.helpers import random_activation_pairs

    cc = copy.deepcopy(random_crosscoder)
    if encoding == "batch_topk":
        cc.threshold.fill_(-1.0)
    x = random_activation_pairs(300, 16, seed=4)
    empty = torch.zeros(0, 2, 16)
    parts = list(x.split(100))  # the batches of the store below too: BatchTopK codes depend on them
    reference = attribute(cc, parts, {"device": "cpu"}, progress=False)
    streamed = attribute(cc, [empty, parts[0], empty, *parts[1:]], {"device": "cpu"}, progress=False)
    assert streamed.summary["n_tokens"] == 300
    pd_testing.assert_frame_equal(streamed.table, reference.table)

    store = write_activation_store(tmp_path / "store", x, rows_per_shard=100, scale_factors=[0.5, 2.0])
    manifest = read_manifest(store)  # a zero-row shard in the middle of the store
    name = write_shard(store, 3, {"activations": empty, "tokens": torch.zeros(0, dtype=torch.int64),
                                  "positions": torch.zeros(0, dtype=torch.int64),
                                  "windows": torch.zeros(0, dtype=torch.int64)})
    manifest["shards"].insert(1, {"file": name, "n_rows": 0, "windows_end": 1})
    write_manifest(store, manifest)
    from_store = attribute(cc, store, {"device": "cpu", "batch_size": 100}, progress=False)
    assert from_store.summary["n_tokens"] == 300
    pd_testing.assert_frame_equal(from_store.table, reference.table)
