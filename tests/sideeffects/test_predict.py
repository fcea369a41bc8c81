import pandas as pd
import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.sideeffects import PredictConfig, load_prediction, predict, save_prediction

CATEGORIES = ["biology", "medicine", "law", "cooking"]


def _attribution():
    return pd.DataFrame({
        "latent": [0, 1, 2, 3, 4, 5],
        "latent_class": ["base_only", "suppressed", "shared", "edited_only", "suppressed", "dead"],
        "score": [0.9, 0.6, 0.0, -0.8, 0.1, float("nan")],
    })


def _links():
    return pd.DataFrame({
        "latent": [0, 0, 1, 1, 2, 3, 4],
        "category": ["biology", "medicine", "medicine", "biology", "law", "cooking", "law"],
        "similarity": [0.9, 0.5, 0.8, 0.3, 1.0, 0.9, 0.7],
    })


def test_scores_are_weighted_sums_over_supporting_latents():
    p = predict(_attribution(), _links(), CATEGORIES, PredictConfig(categories_per_latent=1, rule="relative",
                                                                       relative_threshold=0.5, side="suppressed"))
    s = p.scores.set_index("category")
    assert s.loc["biology", "suppressed_score"] == pytest.approx(0.9 * 0.9)
    assert s.loc["medicine", "suppressed_score"] == pytest.approx(0.6 * 0.8)
    assert s.loc["law", "suppressed_score"] == pytest.approx(0.1 * 0.7)  # the shared latent 2 does not count
    assert s.loc["cooking", "amplified_score"] == pytest.approx(0.8 * 0.9) and s.loc["cooking", "suppressed_score"] == 0
    assert p.predicted == ["biology", "medicine"]  # law is below half of the best
    assert [e["latent"] for e in p.evidence["biology"]] == [0]


def test_rules_and_min_latents():
    p = predict(_attribution(), _links(), CATEGORIES, PredictConfig(categories_per_latent=2, rule="top_k", k=1,
                                                                       side="suppressed"))
    assert p.predicted == ["biology"]
    both = predict(_attribution(), _links(), CATEGORIES, PredictConfig(rule="relative", relative_threshold=0.5))
    assert both.predicted == ["biology", "cooking", "medicine"]  # cooking on its amplified evidence (0.72)
    p = predict(_attribution(), _links(), CATEGORIES, PredictConfig(categories_per_latent=2, rule="min_score",
                                                                       min_score=0.0, min_latents=2, side="suppressed"))
    assert set(p.predicted) == {"biology", "medicine"}
    p = predict(_attribution(), _links(), CATEGORIES, PredictConfig(side="amplified", rule="top_k", k=3))
    assert p.predicted == ["cooking"]


def test_a_registered_rule_without_its_branch_is_an_error_not_another_rule(monkeypatch):
    """A rule added to RULES but not to predict ran as `min_score` without a word."""
    import mneme_plugin.sideeffects.config as config

    monkeypatch.setattr(config, "RULES", (*config.RULES, "top_n"))
    with pytest.raises(ConfigError, match="Rule 'top_n' is registered .* but predict has no branch for it"):
        predict(_attribution(), _links(), CATEGORIES, PredictConfig(rule="top_n"))


def test_round_trip_and_bad_links(tmp_path):
    p = predict(_attribution(), _links(), CATEGORIES)
    save_prediction(p, tmp_path)
    loaded = load_prediction(tmp_path)
    assert loaded.predicted == p.predicted and loaded.config == p.config
    with pytest.raises(ConfigError, match="outside the taxonomy"):
        predict(_attribution(), _links(), ["biology"])
    with pytest.raises(ConfigError, match="lacks columns"):
        predict(_attribution(), _links().rename(columns={"similarity": "sim"}), CATEGORIES)


def test_outlier_rule_predicts_categories_that_stand_out_of_the_noise_floor():
    categories = [f"c{i}" for i in range(10)]
    attribution = pd.DataFrame({"latent": range(10), "latent_class": ["suppressed"] * 10,
                                "score": [0.9, 0.5, 0.05, 0.06, 0.04, 0.05, 0.07, 0.05, 0.06, 0.04]})
    links = pd.DataFrame({"latent": range(10), "category": categories, "similarity": [1.0] * 10})
    p = predict(attribution, links, categories, PredictConfig(rule="outlier", outlier_z=3.0))
    assert p.predicted == ["c0", "c1"]
    flat = attribution.assign(score=[0.05] * 10)
    assert predict(flat, links, categories, PredictConfig(rule="outlier")).predicted == []


def test_a_zero_similarity_link_is_no_evidence_for_its_category():
    # The lexical mapper gives similarity 0 to a description that shares no word with any category;
    # its top link then names the taxonomy's first category. Such latents must not count for it.
    categories = ["biology", "law", "cooking"]
    attribution = pd.DataFrame({"latent": range(8), "latent_class": ["suppressed"] * 6 + ["shared"] * 2,
                                "score": [0.5] * 8})
    unmapped = pd.DataFrame({"latent": range(6), "category": ["biology"] * 6, "similarity": [0.0] * 6})
    mapped = pd.DataFrame({"latent": [6, 7], "category": ["law", "cooking"], "similarity": [0.8, 0.8]})
    links = pd.concat([unmapped, mapped], ignore_index=True)
    for rule in ("min_score", "enrichment"):
        p = predict(attribution, links, categories, PredictConfig(rule=rule, min_score=0.0), reference=range(8))
        scores = p.scores.set_index("category")
        assert scores.loc["biology", "n_suppressed_latents"] == 0
        assert p.predicted == [] and p.evidence["biology"] == []


def test_mneme_predict_on_a_run_folder_built_by_hand(tmp_path):
    """One stage's command on stage outputs built by tests.helpers (no pipeline run): the planted
    category, the only one whose latents the edit suppressed, is predicted. (Without a config.yaml the
    run's own taxonomy is the one its mapping holds: its prediction goes to prediction/, where
    `mneme evaluate` and the report read it.)"""
    from click.testing import CliRunner

    from mneme_plugin.cli import main
    from mneme_plugin.layout import RunLayout

    from tests.helpers import write_attribution, write_mapping

    run = RunLayout(tmp_path / "run")
    domains = ["biology", "chemistry", "cooking", "history", "law", "medicine", "security", "sports"]
    classes = ["suppressed"] * 4 + ["shared"] * 16
    links = {i: [("law", 0.9)] for i in range(4)} | {4 + i: [(domains[i % 8], 0.8)] for i in range(16)}
    write_attribution(run.attribution, classes)
    write_mapping(run.mapping, links, "organism")
    result = CliRunner().invoke(main, ["predict", "--run-dir", str(run.root), "--taxonomy", "organism",
                                       "--rule", "top_k", "-k", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "Predicted: law"
    assert load_prediction(run.prediction).predicted == ["law"]


def test_the_latents_behind_a_prediction_are_those_of_the_side_it_scored():
    """With side="suppressed" latents_behind also returned the amplified latents linked to the predicted
    category, which add nothing to its score; remediation then retrained on their contexts too."""
    attribution = pd.DataFrame({"latent": [0, 1, 2], "latent_class": ["suppressed", "edited_only", "shared"],
                                "score": [0.9, -0.8, 0.0]})
    links = pd.DataFrame({"latent": [0, 1, 2], "category": ["biology", "biology", "law"], "similarity": [0.9] * 3})
    behind = {}
    for side in ("suppressed", "amplified", "both"):
        p = predict(attribution, links, CATEGORIES, PredictConfig(rule="top_k", k=1, side=side))
        assert p.predicted == ["biology"]
        behind[side] = p.latents_behind()
        # What each latent behind adds to the predicted category's score sums to that score.
        score = p.scores.set_index("category").loc["biology", "score"]
        assert score == pytest.approx(sum({0: 0.9 * 0.9, 1: 0.8 * 0.9}[latent] for latent in behind[side]))
    assert behind == {"suppressed": [0], "amplified": [1], "both": [0, 1]}
