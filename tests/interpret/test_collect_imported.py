"""collect reads an imported science-of-finetuning crosscoder by path (their folder, not our format)."""

from __future__ import annotations

import torch

from mneme_plugin.activations import forward_to_hook, iter_windows
from tests.formats import reference as ref
from tests.helpers import sof_state_dict, write_sof_crosscoder
from tests.interpret.test_collect import brute_force

CODE_NORM = "SAE"


class PublishedEncoder:
    """Their inference rule (tests/formats/reference.py), for the brute force."""

    def __init__(self, sd):
        self.sd = sd

    def encode(self, x):
        return ref.sof_encode(self.sd, x, CODE_NORM)


def _threshold_on_real_activations(sd, ht_pair, corpus, layer):
    """A threshold that lets about a tenth of the (token, latent) saliences through."""
    base, edited = ht_pair
    hook = f"blocks.{layer}.hook_resid_post"
    xs = []
    for w in list(iter_windows(corpus, base.tokenizer, 32))[:8]:
        t = w.tokens[None]
        xs.append(torch.stack([forward_to_hook(base, t, hook)[0], forward_to_hook(edited, t, hook)[0]], dim=1))
    x = torch.cat(xs)
    scaled = ref.sof_pre(sd, x) * ref.sof_weight(sd, CODE_NORM)
    return float(torch.quantile(scaled.flatten(), 0.9))


def test_collect_on_a_science_of_finetuning_folder(tmp_path, ht_pair, collect_corpus):
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.interpret import CollectConfig, collect

    sd = sof_state_dict(d=32, m=40, k=4, code_normalization=CODE_NORM, seed=21)
    sd["threshold"] = torch.tensor(_threshold_on_real_activations(sd, ht_pair, collect_corpus, 1))
    folder = write_sof_crosscoder(tmp_path / "sof", sd, "hub", code_normalization=CODE_NORM, k=4)
    # The helper records layer 13 (a published gemma crosscoder) in its trainer config; the tiny models have 2.
    cfg = CollectConfig(latents=[1, 4, 9, 17, 30], n_top=5, n_random=2, n_non_activating=2, allow_hook_mismatch=True,
                        example_ctx_len=16, harvest=HarvestConfig(layer=1, context_length=32, batch_size=4))
    base, edited = ht_pair
    result = collect(base, edited, folder, collect_corpus, cfg, out_dir=tmp_path / "out", progress=False)

    _, vals = brute_force(ht_pair, PublishedEncoder(sd), collect_corpus, cfg)
    ctx_max = vals.amax(dim=1)
    assert (ctx_max > 0).any(dim=0).sum() >= 3, "the test crosscoder must make most chosen latents fire"
    for j, latent in enumerate(cfg.latents):
        expected = torch.sort(ctx_max[:, j], descending=True).values
        expected = expected[expected > 0][: cfg.n_top]
        info = result.per_latent[j]
        assert info["latent"] == latent and info["fire_tokens"] == int((vals[:, :, j] > 0).sum())
        torch.testing.assert_close(torch.tensor(info["top_values"]), expected, rtol=1e-4, atol=1e-5)
