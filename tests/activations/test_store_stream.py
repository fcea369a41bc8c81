"""Store iteration (resumable shuffling) and on-the-fly streaming."""

from __future__ import annotations

import itertools

import pytest
import torch

from mneme_plugin.activations import HarvestConfig, harvest, harvest_stream


@pytest.fixture(scope="module")
def store(ht_pair, corpus, tmp_path_factory):
    config = HarvestConfig(layer=1, context_length=16, batch_size=4, rows_per_shard=64, normalization_tokens=300, dtype="float32")
    return harvest(*ht_pair, corpus, config, tmp_path_factory.mktemp("store") / "s", progress=False)


def test_start_step_gives_identical_batches(store):
    ref = list(itertools.islice(store.iter_batches(48, seed=3), 60))  # crosses epoch boundaries
    assert all(b.shape == (48, 2, 32) and b.dtype == torch.float32 for b in ref)
    for s in (1, 17, 41, 59):
        assert torch.equal(next(store.iter_batches(48, seed=3, start_step=s)), ref[s])
    other = next(store.iter_batches(48, seed=4))
    assert not torch.equal(other, ref[0])


def test_each_epoch_is_a_permutation(store):
    n = store.num_rows
    rows = torch.cat(list(itertools.islice(store.iter_batches(n, seed=0), 2)))
    everything = store.all_activations()
    key = lambda t: sorted(map(tuple, t.reshape(t.shape[0], -1)[:, :4].tolist()))  # noqa: E731
    assert key(rows[:n]) == key(everything) and key(rows[n:]) == key(everything)
    assert not torch.equal(rows[:n], everything)  # shuffled
    ordered = next(store.iter_batches(n, shuffle=False))
    assert torch.equal(ordered, everything)


def test_dtype_and_device(store):
    b = next(store.iter_batches(8, dtype=torch.bfloat16, device="cpu"))
    assert b.dtype == torch.bfloat16 and b.shape == (8, 2, 32)
    # The same rows as the float32 batch of that seed and step, rounded to bfloat16.
    assert torch.equal(b, next(store.iter_batches(8, device="cpu")).to(torch.bfloat16))


def test_stream_is_deterministic_and_matches_store(ht_pair, corpus, store):
    config = HarvestConfig.from_dict(store.manifest["config"])
    s1 = harvest_stream(*ht_pair, corpus, config, batch_size=32, shuffle_buffer_rows=256, seed=5)
    assert s1.d_model == 32
    assert torch.equal(s1.scale_factors, store.scale_factors)
    a = list(s1)
    b = list(harvest_stream(*ht_pair, corpus, config, batch_size=32, shuffle_buffer_rows=256, seed=5))
    assert len(a) == store.num_rows // 32 and all(x.shape == (32, 2, 32) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = next(iter(harvest_stream(*ht_pair, corpus, config, batch_size=32, shuffle_buffer_rows=256, seed=6)))
    assert not torch.equal(a[0], c)
    # Same rows as the store, in another order.
    got = torch.cat(a)
    norms_store = torch.sort(store.all_activations().norm(dim=-1)[:, 0]).values
    norms_stream = torch.sort(got.norm(dim=-1)[:, 0]).values
    assert torch.isin(norms_stream, norms_store).all()
