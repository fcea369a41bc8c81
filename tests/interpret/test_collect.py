"""collect: exact top contexts vs brute force, bounded memory, the Delphi cache read by Delphi."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mneme_plugin.activations import forward_to_hook, iter_windows
from mneme_plugin.errors import CheckpointError
from mneme_plugin.interpret import TopContextCollector, load_contexts


def brute_force(ht_pair, cc, corpus, cfg):
    """Every context's per-token values of the chosen latents, computed without the collector."""
    base, edited = ht_pair
    tok = base.tokenizer
    hook = f"blocks.{cfg.harvest.layer}.hook_resid_post"
    special = torch.tensor(sorted({int(i) for i in tok.all_special_ids} | {tok.bos_token_id}))
    all_tokens, all_vals = [], []
    for w in iter_windows(corpus, tok, cfg.harvest.context_length):
        t = w.tokens[None]
        x = torch.stack([forward_to_hook(base, t, hook)[0], forward_to_hook(edited, t, hook)[0]], dim=1)
        f = cc.encode(x)[:, cfg.latents]
        valid = w.mask & ~torch.isin(w.tokens, special)
        f = f * valid[:, None]
        all_tokens.append(w.tokens.reshape(-1, cfg.example_ctx_len))
        all_vals.append(f.reshape(-1, cfg.example_ctx_len, len(cfg.latents)))
    return torch.cat(all_tokens), torch.cat(all_vals)


def test_top_contexts_equal_brute_force(collected, ht_pair, thresholded_crosscoder, collect_corpus):
    out, cfg, result = collected
    tokens, vals = brute_force(ht_pair, thresholded_crosscoder, collect_corpus, cfg)
    assert result.n_contexts == tokens.shape[0]
    ctx_max = vals.amax(dim=1)  # (C, L)
    assert (ctx_max > 0).any(dim=0).sum() >= 4, "the test crosscoder must make most chosen latents fire"
    assert ((ctx_max > 0).sum(dim=0) > cfg.n_top).any(), "some latent must fire in more contexts than n_top"
    for j, latent in enumerate(cfg.latents):
        expected = torch.sort(ctx_max[:, j], descending=True).values
        expected = expected[expected > 0][: cfg.n_top]
        info = result.per_latent[j]
        assert info["latent"] == latent
        assert info["fire_contexts"] == int((ctx_max[:, j] > 0).sum())
        assert info["fire_tokens"] == int((vals[:, :, j] > 0).sum())
        got = torch.tensor(info["top_values"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # The stored rows hold the right tokens and per-token activations.
        top_tokens, top_acts, _ = result.top_examples(latent)
        for r in range(len(got)):
            matches = [c for c in range(tokens.shape[0]) if torch.equal(tokens[c], top_tokens[r])
                       and torch.allclose(vals[c, :, j], top_acts[r], atol=1e-6)]
            assert matches, f"latent {latent}: kept context {r} matches no real context"
        for r in info["non_activating_rows"]:
            assert float(result.dense(latent, [r]).max()) == 0.0


def test_collector_memory_is_bounded():
    L, ctx, n_top, n_rand, n_non = 4, 8, 3, 2, 2
    col = TopContextCollector(list(range(L)), ctx, n_top, n_rand, n_non, seed=0, vocab_size=50)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        toks = torch.randint(0, 50, (16, ctx), generator=gen)
        acts = torch.relu(torch.randn(16, ctx, L, generator=gen) - 1.5)
        col.update(toks, acts, torch.ones(16, ctx, dtype=torch.bool))
        assert len(col.contexts) <= L * (n_top + n_rand + n_non)
    res = col.result()
    assert res.tokens.shape[0] <= L * (n_top + n_rand + n_non)
    assert all(len(p["top_rows"]) <= n_top and len(p["random_rows"]) <= n_rand for p in res.per_latent)
    assert res.n_contexts == 960 and int(res.background.sum()) == 960 * ctx


def test_cache_layout_and_round_trip(collected):
    out, cfg, result = collected
    module = out / "latents" / "blocks.1.hook_resid_post"
    cfg_json = json.loads((module / "config.json").read_text())
    for key in ("dataset_repo", "dataset_split", "dataset_name", "dataset_column", "batch_size", "cache_ctx_len",
                "n_tokens", "n_splits", "model_name"):
        assert key in cfg_json
    from safetensors.numpy import load_file

    data = load_file(str(module / "0_47.safetensors"))
    assert data["locations"].shape[1] == 3 and data["activations"].dtype == np.float16
    assert data["tokens"].shape == tuple(result.tokens.shape)
    back = load_contexts(out)
    assert back.latents == result.latents and torch.equal(back.tokens, result.tokens)
    torch.testing.assert_close(back.values, result.values.half().float())


def test_contexts_rewritten_in_place_and_stopped_are_not_read_half_new(collected, tiny_tokenizer, tmp_path):
    """Contexts saved over an earlier collect's, stopped part-way (here the background counts cannot be
    written, after the cache): the old contexts.json must not stay next to the new cache, read as one collect."""
    import shutil

    out, cfg, result = collected
    folder = tmp_path / "contexts"
    shutil.copytree(out, folder)
    (folder / "background_counts.npy").unlink()
    (folder / "background_counts.npy").mkdir()
    keep = result.latents[:2]
    fewer = type(result)(latents=keep, tokens=result.tokens, locations=result.locations[result.locations[:, 2] < 2],
                         values=result.values[result.locations[:, 2] < 2], per_latent=result.per_latent[:2],
                         n_tokens=result.n_tokens, n_contexts=result.n_contexts, background=result.background,
                         meta=result.meta)
    with pytest.raises(OSError):
        fewer.save(folder, "blocks.1.hook_resid_post", width=48, tokenizer=tiny_tokenizer)
    with pytest.raises(CheckpointError, match="holds no collected contexts"):
        load_contexts(folder)


def test_delphi_latent_dataset_reads_our_cache(collected, tiny_tokenizer):
    from mneme_plugin.interpret import iter_records_delphi

    out, cfg, result = collected
    records = {r.latent.latent_index: r for r in iter_records_delphi(out, tiny_tokenizer)}
    assert len(records) >= 4
    assert set(records) == {p["latent"] for p in result.per_latent if p["top_rows"]}
    for info in result.per_latent:
        if not info["top_rows"]:
            continue
        rec = records[info["latent"]]
        delphi_max = [float(e.max_activation) for e in rec.examples[: len(info["top_values"])]]
        expected = [float(np.float16(v)) for v in info["top_values"]]
        assert delphi_max == pytest.approx(expected, rel=1e-3)
        top_tokens, _, _ = result.top_examples(info["latent"])
        # Same contexts, except where fp16 rounding ties a kept context with the Nth one.
        cut = min(expected)
        ours = {tuple(t.tolist()) for t in top_tokens}
        for e in rec.examples[: len(delphi_max)]:
            if float(e.max_activation) > cut:
                assert tuple(e.tokens.tolist()) in ours


def test_collect_reads_the_windows_the_crosscoder_records(thresholded_crosscoder):
    """Without a reading config, collect reads the recorded layer, hook and window length (the demo's
    crosscoders record 64 tokens, where the harvest default of 128 is longer than its models read)."""
    import copy

    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.interpret import CollectConfig
    from mneme_plugin.interpret.contexts import reading_config

    cc = copy.deepcopy(thresholded_crosscoder)
    cc.cfg.metadata = {"layer": 1, "hook_name": "blocks.1.hook_resid_post", "context_length": 64}
    reading = reading_config(CollectConfig(latents=[0]), cc)
    assert (reading.layer, reading.context_length) == (1, 64)
    cc.cfg.metadata = {"layer": 1}  # nothing recorded: the harvest default
    assert reading_config(CollectConfig(latents=[0]), cc).context_length == HarvestConfig(layer=1).context_length != 64


def test_the_collect_bar_has_a_total_when_the_budget_is_known(ht_pair, thresholded_crosscoder, collect_corpus,
                                                              tmp_path, capsys):
    """collect reads the corpus in the harvest's windows, up to its max_tokens (rounded up to whole windows):
    its bar has the number of forward batches as its total (it had none)."""
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.interpret import CollectConfig, collect
    from tests.helpers import last_progress

    cfg = CollectConfig(latents=[0, 3], n_top=2, n_random=1, n_non_activating=1, example_ctx_len=16,
                        harvest=HarvestConfig(layer=1, context_length=32, batch_size=4, max_tokens=300))
    collect(*ht_pair, thresholded_crosscoder, collect_corpus, cfg, out_dir=tmp_path / "out", progress=True)
    assert last_progress(capsys.readouterr().err, "collect") == (3, 3)  # 10 windows of 32 tokens, 4 a batch


def test_collect_refuses_the_models_swapped_and_warns_on_others(llama_dir, thresholded_crosscoder, collect_corpus,
                                                                  tmp_path, caplog):
    """Base and edited given the other way round were read silently: each model through the other's decoder
    and normalisation. Now refused before either loads; another spelling of the same folder is fine, another
    model a warning."""
    import copy

    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret import CollectConfig, collect
    from tests.helpers import save_finetuned_llama

    edited = save_finetuned_llama(llama_dir, tmp_path / "edited", collect_corpus[:20])
    cc = copy.deepcopy(thresholded_crosscoder)
    cc.cfg.metadata = {"layer": 1, "hook_name": "blocks.1.hook_resid_post", "context_length": 32,
                       "base_model": str(llama_dir), "edited_model": str(edited)}
    cfg = CollectConfig(latents=[0, 3], n_top=2, n_random=1, n_non_activating=1, example_ctx_len=16)
    with pytest.raises(ConfigError, match="The base and edited models of the collect are swapped: the crosscoder "
                                          f"was trained with base '{llama_dir}'"):
        collect(str(edited), str(llama_dir), cc, collect_corpus[:10], cfg, progress=False)
    caplog.set_level("WARNING", logger="mneme_plugin")
    respelt = str(edited.parent / "." / edited.name)
    collect(str(llama_dir), respelt, cc, collect_corpus[:10], cfg, progress=False)
    assert not [r for r in caplog.records if "the crosscoder was trained with" in r.getMessage()]
    collect(str(llama_dir), str(llama_dir), cc, collect_corpus[:10], cfg, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"The edited model of the collect is '{llama_dir}', the crosscoder was trained with "
                            f"'{edited}'") for m in messages), messages
    assert any(m.startswith(f"The base and the edited model are the same ({llama_dir})") for m in messages), messages


def test_more_cache_splits_than_latents_are_refused_before_the_corpus_is_read(ht_pair, thresholded_crosscoder,
                                                                            collect_corpus, tmp_path):
    """n_splits above the crosscoder's width wrote files of empty latent ranges (0_-1.safetensors, ...), whose
    bounds Delphi's LatentDataset took for others' and asked for files that did not exist: explain failed with a
    FileNotFoundError from inside Delphi. Refused before any forward pass, and by the cache writer itself."""
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret import CollectConfig, collect, write_delphi_cache

    width = int(thresholded_crosscoder.dict_size)
    cfg = CollectConfig(latents=[0, 3], n_top=2, n_random=1, n_non_activating=1, example_ctx_len=16, n_splits=width + 1,
                        harvest=HarvestConfig(layer=1, context_length=32, batch_size=4, max_tokens=300))
    with pytest.raises(ConfigError, match="n_splits"):
        collect(*ht_pair, thresholded_crosscoder, collect_corpus, cfg, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "latents").exists()
    col = TopContextCollector([1, 3], 4, 1, 0, 0, vocab_size=8)
    col.update(torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="n_splits"):
        write_delphi_cache(col.result(), tmp_path / "cache", "hook", width=4, n_splits=5)


def test_one_cache_split_per_latent_is_read_by_delphi(tmp_path, tiny_tokenizer):
    """n_splits equal to the width (one latent per file) is the most Delphi reads; selected latents included."""
    from mneme_plugin.interpret import iter_records_delphi

    col = TopContextCollector([1, 3], 4, 2, 0, 0, vocab_size=len(tiny_tokenizer))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        col.update(torch.randint(5, len(tiny_tokenizer), (4, 4), generator=gen), torch.rand(4, 4, 2, generator=gen),
                   torch.ones(4, 4, dtype=torch.bool))
    col.result().save(tmp_path, "hook", width=4, n_splits=4, tokenizer=tiny_tokenizer)
    records = iter_records_delphi(tmp_path, tiny_tokenizer, constructor={"min_examples": 1, "n_non_activating": 0},
                                  latents=[3])
    assert [r.latent.latent_index for r in records] == [3]
