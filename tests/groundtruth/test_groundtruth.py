import pytest
import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth import (
    accuracy_drop,
    domain_accuracy,
    question_correct,
    read_scores_csv,
    save_scores,
    scores_dict,
    scores_table,
)
from mneme_plugin.sideeffects import EvaluateConfig, degraded_categories
from mneme_plugin.organism import generate_corpus, question_set, tiny_hooked_transformer, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer([t for _, t in generate_corpus(200, seed=0)])
    model = tiny_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    with torch.no_grad():  # a random model has flat logits; make them spread so both modes vary
        model.unembed.W_U.mul_(50)
    return model, question_set(0)


def _brute_force(model, questions, mode):
    tok = model.tokenizer
    hits = {}
    for q in questions:
        ids = [tok.bos_token_id] + tok(q.prompt, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids]))[0, -1]
        answer = tok.convert_tokens_to_ids(q.answer)
        if mode == "top1":
            ok = logits.argmax().item() == answer
        else:
            cands = tok.convert_tokens_to_ids(list(q.candidates))
            ok = max(cands, key=lambda c: logits[c].item()) == answer
        hits.setdefault(q.domain, []).append(ok)
    return {d: sum(v) / len(v) for d, v in hits.items()}


@pytest.mark.parametrize("mode", ["top1", "choice"])
def test_domain_accuracy_matches_a_brute_force_loop(tiny, mode):
    model, questions = tiny
    got = domain_accuracy(model, questions, mode)
    assert got == pytest.approx(_brute_force(model, questions, mode))
    assert list(got) == list(dict.fromkeys(q.domain for q in questions))


def test_accuracy_is_one_for_a_model_that_knows_the_answers(tiny):
    model, questions = tiny
    answers = {q.prompt: q.answer for q in questions}

    class Oracle:
        training = False
        tokenizer = model.tokenizer

        def eval(self):
            pass

        def __call__(self, tokens, return_type="logits"):
            out = torch.zeros(tokens.shape[0], tokens.shape[1], len(self.tokenizer))
            for i, row in enumerate(tokens.tolist()):
                prompt = self.tokenizer.decode(row[1:])
                out[i, -1, self.tokenizer.convert_tokens_to_ids(answers[prompt])] = 1.0
            return out

    assert all(question_correct(Oracle(), questions))
    assert set(domain_accuracy(Oracle(), questions, "choice").values()) == {1.0}
    with pytest.raises(ConfigError, match="mode"):
        domain_accuracy(model, questions, "exact")


def test_drop_threshold_and_round_trip_through_the_table(tmp_path):
    before = {"biology": 0.9, "law": 0.8, "cooking": 0.7}
    after = {"biology": 0.2, "law": 0.75, "cooking": 0.8}
    drop = accuracy_drop(before, after)
    assert drop == pytest.approx({"biology": 0.7, "law": 0.05, "cooking": -0.1})
    truth = degraded_categories(scores_table(before, after), EvaluateConfig(drop_threshold=0.1))
    assert truth.loc[truth["degraded"], "category"].tolist() == ["biology"]
    path = save_scores(scores_table(before, after), tmp_path / "gt.csv")
    assert scores_dict(read_scores_csv(path)) == (before, after)
    with pytest.raises(ConfigError, match="different categories"):
        accuracy_drop(before, {"biology": 0.1})
    with pytest.raises(ConfigError, match="different categories"):
        scores_table(before, {"biology": 0.1})
    (tmp_path / "bad.csv").write_text("category,score\nx,1\n")
    with pytest.raises(ConfigError, match="lacks column"):
        read_scores_csv(tmp_path / "bad.csv")
    (tmp_path / "extra.csv").write_text("category,before,after,n\nmmlu_virology,0.5,0.3,166\n")
    assert scores_dict(read_scores_csv(tmp_path / "extra.csv")) == ({"mmlu_virology": 0.5}, {"mmlu_virology": 0.3})


def test_ground_truth_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "text.csv").write_text("category,before,after\nlaw,0.9,high\nhistory,0.8,0.7\n")
    with pytest.raises(ConfigError, match=r"'after' must hold numbers.*law"):
        read_scores_csv(tmp_path / "text.csv")
    (tmp_path / "twice.csv").write_text("category,before,after\nlaw,0.9,0.1\nlaw,0.8,0.7\n")
    with pytest.raises(ConfigError, match="more than once"):
        read_scores_csv(tmp_path / "twice.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        read_scores_csv(tmp_path / "missing.csv")
