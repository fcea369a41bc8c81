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
    with pytest.raises(ConfigError, match=r"classes names unknown attribution class\(es\) \['lost'\]"):
        RemediateConfig(classes=("suppressed", "lost"))


def test_sample_budget_is_spread_over_the_chosen_latents_and_never_exceeded():
    tokens = torch.arange(150).view(15, 10)
    contexts = LatentContexts(
        latents=[3, 7, 9], tokens=tokens, locations=torch.zeros(0, 3, dtype=torch.long), values=torch.zeros(0),
        per_latent=[{"latent": 3, "top_rows": [0, 1, 2, 3, 4]}, {"latent": 7, "top_rows": [5, 6, 7, 8, 9]},
                    {"latent": 9, "top_rows": [10, 11, 12, 13, 14]}],
        n_tokens=int(tokens.numel()), n_contexts=len(tokens), background=np.zeros(0, dtype=np.int64),
    )
    attribution = pd.DataFrame({"latent": [3, 7, 9], "latent_class": ["suppressed", "amplified", "base_only"],
                                "score": [0.4, -0.9, 0.8]})
    # 7 samples over 3 latents: up to ceil(7 / 3) = 3 each, strongest first, cut at 7.
    rows, latents = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=1, max_samples=7))
    assert latents == [7, 9, 3] and torch.equal(rows, tokens[[5, 6, 7, 10, 11, 12, 0]])
    # Without a budget: exactly samples_per_latent each.
    rows, _ = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=1, max_samples=None))
    assert torch.equal(rows, tokens[[5, 10, 0]])
    # Restricted to the latents behind a prediction: the whole budget goes to them.
    rows, latents = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=1, max_samples=7),
                                   latents=[3, 9])
    assert latents == [9, 3] and torch.equal(rows, tokens[[10, 11, 12, 13, 0, 1, 2]])
    with pytest.raises(ConfigError, match="among the 1 latents behind the prediction"):
        select_samples(contexts, attribution, RemediateConfig(), latents=[42])
    with pytest.raises(ConfigError, match="max_samples must be None or >= samples_per_latent"):
        RemediateConfig(samples_per_latent=8, max_samples=4)
    with pytest.raises(ConfigError, match="target must be one of"):
        RemediateConfig(target="everything")


def test_the_predicted_target_retrains_on_the_latents_behind_the_prediction(tmp_path):
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects import NothingToRemediate, remediation_latents
    from mneme_plugin.sideeffects.config import PredictConfig
    from mneme_plugin.sideeffects.predict import predict, save_prediction

    # Latents 1, 2 are mapped to law, 3 to cooking, 4 (shared: unchanged) to law.
    attribution = pd.DataFrame({"latent": [1, 2, 3, 4], "latent_class": ["suppressed", "amplified", "base_only", "shared"],
                                "score": [0.3, -0.6, 0.5, 0.0]})
    links = pd.DataFrame({"latent": [1, 2, 3, 4], "category": ["law", "law", "cooking", "law"],
                          "similarity": [1.0, 0.8, 0.2, 1.0]})
    prediction = predict(attribution, links, ["law", "cooking", "sports"], PredictConfig(rule="top_k", k=1))
    assert prediction.predicted == ["law"]  # 0.3 * 1.0 + 0.6 * 0.8 against 0.5 * 0.2
    # strongest contribution |score| x similarity first (0.48, then 0.3); the shared latent 4 is no evidence
    assert prediction.latents_behind() == [2, 1]
    assert prediction.latents_behind(["cooking"]) == [3]
    run = tmp_path / "run"
    save_prediction(prediction, RunLayout(run).prediction)
    assert remediation_latents(run, RemediateConfig()) == [2, 1]
    assert remediation_latents(run, RemediateConfig(target="changed")) is None
    nothing = predict(attribution, links, ["law", "cooking", "sports"], PredictConfig(rule="min_score", min_score=5.0))
    save_prediction(nothing, RunLayout(run).prediction)
    with pytest.raises(NothingToRemediate, match="names no affected category"):
        remediation_latents(run, RemediateConfig())


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


def test_a_budget_below_latents_times_samples_per_latent_is_spread_and_only_contributing_latents_are_named():
    """max_samples=16 with samples_per_latent=8 over 5 latents took 8 rows from each of the first 2 latents
    and still named all 5 as the samples' source."""
    tokens = torch.arange(400).view(40, 10)
    n = 5
    contexts = LatentContexts(
        latents=list(range(n)), tokens=tokens, locations=torch.zeros(0, 3, dtype=torch.long), values=torch.zeros(0),
        per_latent=[{"latent": k, "top_rows": list(range(8 * k, 8 * k + 8))} for k in range(n)],
        n_tokens=int(tokens.numel()), n_contexts=len(tokens), background=np.zeros(0, dtype=np.int64),
    )
    # strongest |score| first: 4, 3, 2, 1, 0
    attribution = pd.DataFrame({"latent": list(range(n)), "latent_class": ["suppressed"] * n,
                                "score": [0.1, 0.2, 0.3, 0.4, 0.5]})
    rows, latents = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=8, max_samples=16))
    # ceil(16 / 5) = 4 rows per latent, in rank order, cut at 16: the four strongest latents give 4 each
    expected = [r for k in (4, 3, 2, 1) for r in range(8 * k, 8 * k + 4)]
    assert torch.equal(rows, tokens[expected])
    assert latents == [4, 3, 2, 1]  # latent 0 gave no row

    # A latent whose top contexts were all taken by a stronger one gives no row, so it is not named either.
    contexts.per_latent[3]["top_rows"] = list(range(32, 40))  # latent 3's contexts are latent 4's
    rows, latents = select_samples(contexts, attribution, RemediateConfig(samples_per_latent=2, max_samples=None))
    assert torch.equal(rows, tokens[[32, 33, 16, 17, 8, 9, 0, 1]])
    assert latents == [4, 2, 1, 0]


def _tiny_controlled_setup():
    """A tiny LM, 8 sample rows, a 16-row control pool and an evaluator (negative loss on two row sets) that
    records every model it is called on."""
    tok = make_tokenizer()
    model = make_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    ids = [tok.bos_token_id]
    for t in synthetic_corpus(60, seed=4):
        ids += tok(t, add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: 32 * 16]).view(32, 16)
    samples, pool, probe = rows[:8], rows[8:24], rows[24:]
    calls = []

    def evaluator(m):
        calls.append(m)
        with torch.no_grad():
            return {"a": -m(probe[:4], return_type="loss").item(), "b": -m(probe[4:], return_type="loss").item()}

    return model, samples, pool, evaluator, calls


def test_controlled_remediation_measures_the_edited_model_once():
    """Each arm measured its own unmodified copy again before training: two extra benchmark runs, same scores."""
    from mneme_plugin.sideeffects import remediate_with_control

    edited, samples, pool, evaluator, calls = _tiny_controlled_setup()
    cfg = RemediateConfig(steps=3, lr=1e-3, batch_size=4, seed=0)
    base_scores = {"a": 0.0, "b": 0.0}
    result = remediate_with_control(edited, samples, pool, evaluator, base_scores, ["a"], cfg, progress=False)
    # the edited model once, then each retrained arm once
    assert len(calls) == 3
    assert calls[0] is edited and calls[1] is result.remediated_model and calls[2] is result.control_model

    # The same figures as measuring each arm on its own (the remediation with an evaluator, before and after).
    expected = {}
    for arm, rows in (("remediated", samples), ("control", pool[result.control_rows])):
        alone = remediate(copy.deepcopy(edited), rows, cfg, evaluator=evaluator, progress=False)
        assert alone.before == result.edited
        assert all(torch.equal(a, b) for a, b in zip(alone.model.parameters(),
                                                      getattr(result, f"{arm}_model").parameters())), arm
        expected[arm] = alone.after
    assert result.remediated == expected["remediated"] and result.control == expected["control"]
    assert result.edited == evaluator(edited)


def test_a_degraded_category_the_evaluator_does_not_score_is_refused_before_training():
    """It passed the base-score check, both arms trained, and only writing the record raised KeyError."""
    from mneme_plugin.sideeffects import remediate_with_control

    edited, samples, pool, evaluator, calls = _tiny_controlled_setup()
    weights = {n: p.clone() for n, p in edited.named_parameters()}
    cfg = RemediateConfig(steps=3, lr=1e-3, batch_size=4, seed=0)
    base_scores = {"a": 0.0, "b": 0.0, "c": 0.0}
    with pytest.raises(ConfigError, match=r"Degraded categories \['c'\] are not scored by the evaluator"):
        remediate_with_control(edited, samples, pool, evaluator, base_scores, ["a", "c"], cfg, progress=False)
    assert len(calls) == 1  # only the edited model was measured: nothing trained
    assert all(torch.equal(weights[n], p) for n, p in edited.named_parameters())
