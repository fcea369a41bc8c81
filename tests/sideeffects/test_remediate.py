import copy

import numpy as np
import pandas as pd
import pytest
import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret.contexts import LatentContexts
from mneme_plugin.sideeffects import RemediateConfig, remediate, select_samples
from tests.helpers import make_hooked_transformer, make_tokenizer, synthetic_corpus


def _contexts(tokens: torch.Tensor) -> LatentContexts:
    return LatentContexts(
        latents=[3, 7, 9], tokens=tokens, locations=torch.zeros(0, 3, dtype=torch.long), values=torch.zeros(0),
        per_latent=[{"latent": 3, "top_rows": [0, 1, 2]}, {"latent": 7, "top_rows": [4, 5]},
                    {"latent": 9, "top_rows": [2, 3]}],
        n_tokens=int(tokens.numel()), n_contexts=len(tokens), background=np.zeros(0, dtype=np.int64),
    )


def test_samples_come_from_the_most_changed_collected_latents():
    tokens = torch.arange(60).view(6, 10)
    attribution = pd.DataFrame({"latent": [3, 7, 9, 11, 12],
                                "latent_class": ["suppressed", "amplified", "base_only", "base_only", "shared"],
                                "score": [0.4, -0.9, 0.8, 0.99, 0.01]})
    contexts = _contexts(tokens)
    # default: every changed class, largest |score| first; 11 was not collected, 12 is shared
    rows, latents = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=2))
    assert latents == [7, 9, 3]
    assert torch.equal(rows, tokens[[4, 5, 2, 3, 0, 1]])  # row 2 (latent 9 and 3) once
    # only the lost latents, and a cap on how many
    rows, latents = select_samples(contexts, attribution, RemediateConfig(classes=("base_only", "suppressed"),
                                                                          samples_per_latent=2, max_latents=1))
    assert latents == [9] and torch.equal(rows, tokens[[2, 3]])
    with pytest.raises(ConfigError, match="No collected latent"):
        select_samples(contexts, attribution, RemediateConfig(classes=("edited_only",)))
    with pytest.raises(ConfigError, match=r"classes must be attribution classes .*unknown: \['lost'\]"):
        RemediateConfig(classes=("suppressed", "lost"))


def test_remediation_lowers_the_loss_on_the_lost_material():
    tok = make_tokenizer()
    model = make_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    texts = synthetic_corpus(40, seed=9)
    ids = [tok.bos_token_id]
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
    samples = torch.tensor(ids[: 16 * 16]).view(16, 16)

    def evaluator(m):
        with torch.no_grad():
            return {"lost material": -m(samples, return_type="loss").item()}

    result = remediate(model, samples, RemediateConfig(steps=40, lr=3e-3, batch_size=8), evaluator=evaluator,
                       latents=[1], progress=False)
    assert result.after["lost material"] > result.before["lost material"] + 0.5
    assert list(result.table().columns) == ["category", "before_remediation", "after_remediation"]


# ------------------------------------------------------------------------------ remediation vs control

FACT_DOMAINS = ["biology", "cooking", "sports"]


@pytest.fixture(scope="module")
def unlearned_fact_lm():
    """A 3-domain fact LM and its RMU-unlearned copy (biology forgotten), ~15 s on one core."""
    from mneme_plugin.interventions import RMUConfig, rmu_unlearn
    from tests.helpers import make_fact_lm

    model, questions, edit = make_fact_lm(FACT_DOMAINS)
    forget = [t for d, t in edit if d == "biology"]
    retain = [t for d, t in edit if d != "biology"]
    cfg = RMUConfig(layer=1, steering_coef=30.0, alpha=3.0, lr=5e-3, steps=120, batch_size=8, context_length=32)
    return model, rmu_unlearn(model, forget, retain, cfg).model, questions, edit


def _token_stream(tok, texts) -> str:
    """The corpus as one comma-joined id stream (documents separated by EOS), for substring checks."""
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return "," + ",".join(map(str, ids)) + ","


def test_remediation_and_control_train_alike_and_report_measured_accuracies(unlearned_fact_lm, tmp_path):
    from mneme_plugin.activations.config import HarvestConfig
    from mneme_plugin.errors import CheckpointError
    from mneme_plugin.groundtruth import domain_accuracy
    from mneme_plugin.organism.models import deterministic
    from mneme_plugin.sideeffects import (
        corpus_windows,
        load_controlled_remediation,
        remediate_with_control,
        save_controlled_remediation,
    )

    base, edited, questions, edit = unlearned_fact_lm
    tok = edited.tokenizer
    corpus = [t for _, t in edit]  # task-agnostic: all three domains
    pool = corpus_windows(corpus, tok, HarvestConfig(layer=1, context_length=32), ctx_len=16)
    lost = corpus_windows([t for d, t in edit if d == "biology"], tok, HarvestConfig(layer=1, context_length=32), 16)
    samples = lost[:24]  # planted "top contexts": the forgotten domain's own text

    def evaluator(m):
        return domain_accuracy(m, questions)

    base_scores, edited_scores = evaluator(base), evaluator(edited)
    degraded = [c for c in FACT_DOMAINS if base_scores[c] - edited_scores[c] > 0.1]
    assert "biology" in degraded, (base_scores, edited_scores)
    weights = {n: p.clone() for n, p in edited.named_parameters()}
    cfg = RemediateConfig(steps=30, lr=3e-3, batch_size=8, seed=0)
    with deterministic():
        result = remediate_with_control(edited, samples, pool, evaluator, base_scores, degraded, cfg, progress=False)

    # The edited model is untouched; both arms trained on as many rows, the control's distinct rows of the pool.
    assert all(torch.equal(weights[n], p) for n, p in edited.named_parameters())
    assert result.n_samples == len(samples) == len(result.control_rows) == len(set(result.control_rows))
    assert result.steps == 30 and result.degraded == degraded
    # Every control row is real corpus text: a contiguous run of the corpus' token stream (BOS starts a window).
    stream = _token_stream(tok, corpus)
    for row in pool[result.control_rows].tolist():
        body = row[1:] if row[0] == tok.bos_token_id else row
        assert "," + ",".join(map(str, body)) + "," in stream
    # Each arm is exactly the shared training on its rows (same steps / lr / batch size): retraining reproduces it.
    for arm, rows in (("remediated_model", samples), ("control_model", pool[result.control_rows])):
        with deterministic():
            again = remediate(copy.deepcopy(edited), rows, cfg, progress=False).model
        assert all(torch.equal(a, b) for a, b in zip(again.parameters(), getattr(result, arm).parameters())), arm
    # The reported accuracies are those measured independently on the models.
    assert result.base == base_scores and result.edited == edited_scores
    assert result.remediated == evaluator(result.remediated_model)
    assert result.control == evaluator(result.control_model)
    for c in degraded:
        lost_acc = base_scores[c] - edited_scores[c]
        assert result.recovered("remediated")[c] == pytest.approx((result.remediated[c] - edited_scores[c]) / lost_acc)
        assert result.recovered("control")[c] == pytest.approx((result.control[c] - edited_scores[c]) / lost_acc)
    # Retraining on the forgotten facts' own text brings some of them back.
    assert result.remediated["biology"] > edited_scores["biology"]

    # Round trip through the files.
    save_controlled_remediation(result, tmp_path)
    loaded = load_controlled_remediation(tmp_path)
    assert (loaded.base, loaded.edited, loaded.remediated, loaded.control) == (result.base, result.edited,
                                                                               result.remediated, result.control)
    assert loaded.control_rows == result.control_rows and loaded.config == cfg.to_dict()
    assert loaded.mean_recovered("remediated") == pytest.approx(result.mean_recovered("remediated"))
    table = pd.read_csv(tmp_path / "remediation_vs_control.csv")
    assert sorted(table.loc[table["degraded"], "category"]) == sorted(degraded)
    (tmp_path / "remediation_vs_control.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a remediation-vs-control record"):
        load_controlled_remediation(tmp_path)

    with pytest.raises(ConfigError, match="fewer than"):
        remediate_with_control(edited, samples, pool[:5], evaluator, base_scores, degraded, cfg, progress=False)
    with pytest.raises(ConfigError, match="rows of 16 tokens"):
        remediate_with_control(edited, samples, pool.view(-1, 8), evaluator, base_scores, degraded, cfg,
                               progress=False)
