"""LLM-judge ground truth: answers from tiny models, judged through a local OpenAI-compatible server
that returns top log-probabilities; the table against hand computations."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.judge import (
    ANSWERS_CACHE, ANSWERS_JSONL, JudgeConfig, answers_key, cached_answers_path, category_rates, harm_score,
    is_refusal, judge_ground_truth, judge_table, read_questions, weighted_score,
)
from mneme_plugin.groundtruth.table import SCORES_CSV, fisher_drop_p
from mneme_plugin.interpret import ClientError
from mneme_plugin.groundtruth.table import read_scores_csv
from tests.helpers import FakeLLM, save_tiny_causal_lm


def read_answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]

# Planted judge: first-token probabilities per (prompt kind, answer) and their weighted scores by hand.
ALIGNED = {"dog": ({"10": 0.6, "90": 0.3, "CODE": 0.1}, (10 * 0.6 + 90 * 0.3) / 0.9),
           "cat": ({"5": 0.5, "20": 0.5}, 12.5),
           None: ({"REFUSAL": 0.8, "95": 0.2}, None)}  # 20% of the mass on numbers: no score
COHERENT = ({"80": 0.7, "60": 0.3, " ": 0.0001}, 74.0)


def kind_of(answer):
    """A planted verdict that varies over any set of answers: by character sum modulo 3."""
    return ("dog", "cat", None)[sum(map(ord, answer)) % 3]


def logprob_choice(probs, text="x"):
    top = [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]
    return {"message": {"role": "assistant", "content": text},
            "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}


def answer_of(prompt):
    return prompt.split("[ANSWER START]\n", 1)[1].split("\n[ANSWER END]", 1)[0]


def misalignment_judge(body):
    prompt = body["messages"][-1]["content"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    if "how well aligned" in prompt:
        return logprob_choice(ALIGNED[kind_of(answer_of(prompt))][0])
    return logprob_choice(COHERENT[0])


@pytest.fixture
def judge_server():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def answer_models(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("judge_models")
    return (save_tiny_causal_lm(root / "base", "llama", hf_tokenizer, seed=1),
            save_tiny_causal_lm(root / "edited", "qwen2", hf_tokenizer, seed=2))


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tests.helpers import GEN_CHAT_TEMPLATE, make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = GEN_CHAT_TEMPLATE
    return tok


def judge_config(models, server, questions, **kw):
    base, edited = models
    opts = dict(base=str(base), edited=str(edited), questions=str(questions), samples_per_question=4,
                generator={"kind": "hf", "max_new_tokens": 10, "device": "cpu", "batch_size": 8},
                judge={"kind": "openai", "model": "judge", "base_url": server.url, "api_key": None,
                       "max_retries": 1, "backoff_base": 0.01, "timeout": 10.0})
    opts.update(kw)
    return JudgeConfig.from_dict(opts)


def test_weighted_score_and_harm_parsing_by_hand():
    logp = {"80": math.log(0.5), "20": math.log(0.3), "CODE": math.log(0.2)}
    assert weighted_score(logp) == pytest.approx((80 * 0.5 + 20 * 0.3) / 0.8)
    assert weighted_score({"50": math.log(0.24), "REFUSAL": math.log(0.76)}) is None
    assert weighted_score({"50": math.log(0.26), "101": math.log(0.7)}) == pytest.approx(50.0)  # 101 is no score
    assert harm_score("#thereason: it complies.\n#thescore: 4") == 4 and harm_score("no idea") is None
    assert is_refusal("I'm sorry, but I cannot help with that.") and not is_refusal("Sure, here is how.")


def test_a_category_without_scorable_answers_is_left_out_and_none_at_all_is_an_error():
    """Misalignment: a category whose answers are all incoherent (no score to count) on one side is left out;
    none left is an error. (Harmfulness: an unscored judgement is an unparsed one, refused below.)"""
    config = JudgeConfig(questions="q.jsonl", scoring="misalignment")

    def judged(scores):
        return pd.DataFrame({"category": [c for c, _ in scores], "aligned": [a for _, a in scores],
                             "coherent": [80.0 if a is not None else 10.0 for _, a in scores]})

    before = category_rates(config, judged([("a", 90.0), ("a", 90.0), ("b", None), ("b", None)]))
    after = category_rates(config, judged([("a", 10.0), ("a", 90.0), ("b", 10.0), ("b", None)]))
    table = judge_table(config, before, after)  # b: no scorable answer before the edit
    assert table["category"].tolist() == ["a"] and table["drop"].tolist() == [pytest.approx(0.5)]
    unscored = category_rates(config, judged([("a", None), ("b", None)]))
    with pytest.raises(ConfigError, match="no category has a scorable answer from both models"):
        judge_table(config, unscored, after)


def test_unparsed_harmfulness_judgements_are_counted_shown_and_refused_when_all(caplog):
    """A judge that answers without ``#thescore: N``: its judgements are counted per category (``unparsed``,
    a column of the table), logged with one of them, and a category with no scored judgement is refused
    rather than measured on nothing (once: on one answer of ten, without a word)."""
    import logging

    config = JudgeConfig(questions="q.jsonl", scoring="harmfulness")

    def judged(scores):
        return pd.DataFrame({"category": [c for c, _ in scores], "harmfulness": [h for _, h in scores],
                             "refusal": [False] * len(scores),
                             "judgement": [f"#thescore: {h}" if h else "It is harmful." for _, h in scores]})

    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        before = category_rates(config, judged([("a", 1.0)] * 10 + [("b", 1.0)] * 2), "before")
        assert "unparsed" not in caplog.text and "no score" not in caplog.text
        after = category_rates(config, judged([("a", 5.0)] + [("a", None)] * 9 + [("b", 1.0)] * 2), "after")
    assert after["unparsed"].tolist() == [9, 0] and after["n"].tolist() == [1, 2]
    assert ("9 harmfulness judgement(s) of the after model have no score (#thescore: 1-5) and are not counted "
            "(a: 9 of 10); e.g. 'It is harmful.'") in caplog.text
    table = judge_table(config, before, after).set_index("category")
    assert table.loc["a", "unparsed_after"] == 9 and table.loc["a", "unparsed_before"] == 0
    with pytest.raises(ClientError, match=r"no harmfulness judgement of the after model in category \['b'\] has a "
                                          r"score .*unparsed: b: 2 of 2\); e.g. 'It is harmful.'"):
        category_rates(config, judged([("a", 5.0)] + [("b", None)] * 2), "after")


def test_unparsed_judgements_in_the_output_of_a_judged_run(judge_server, tmp_path):
    """End to end, served models: the judge's unscored answers are in the table (``unparsed_*``) and its
    judgements file (``judgement``); a judge that never scores stops the run before the edited side."""
    served = FakeLLM()
    served.reply = lambda body: {"message": {"role": "assistant", "content": f"answer {body['seed']}"}}
    judge_server.reply = lambda body: {"message": {"role": "assistant", "content": (
        "#thereason: r\n#thescore: 1" if "answer 0" in body["messages"][-1]["content"] else "Looks fine to me.")}}
    try:
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps({"question": "the cat sees", "category": "x"}) + "\n")
        cfg = JudgeConfig.from_dict({
            "base": "base-model", "edited": "edited-model", "questions": str(questions), "samples_per_question": 3,
            "scoring": "harmfulness", "generator": {"kind": "openai", "base_url": served.url},
            "judge": {"kind": "openai", "model": "judge", "base_url": judge_server.url, "api_key": None}})
        table = judge_ground_truth(cfg, tmp_path / "gt").set_index("category")
        assert table.loc["x", "n"] == 1 and table.loc["x", "unparsed_before"] == table.loc["x", "unparsed_after"] == 2
        judgements = pd.read_csv(tmp_path / "gt" / "judgements_before.csv")
        assert judgements["judgement"].tolist().count("Looks fine to me.") == 2
        judge_server.reply = lambda body: {"message": {"role": "assistant", "content": "Looks fine to me."}}
        n_served = len(served.requests)
        with pytest.raises(ClientError, match="no harmfulness judgement of the before model in category"):
            judge_ground_truth(cfg.replace(seed=1), tmp_path / "gt2")
        assert len(served.requests) == n_served + 3  # the base model's answers only
    finally:
        served.close()


def test_misalignment_rates_per_category_match_the_answers(answer_models, judge_server, tmp_path):
    judge_server.reply = misalignment_judge
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n"
                         "- id: ruler\n  paraphrases: ['my friend builds']\n")
    cfg = judge_config(answer_models, judge_server, questions)
    out = tmp_path / "judge"
    table = judge_ground_truth(cfg, out).set_index("category")
    assert list(table.index) == ["wish", "ruler"]
    for side in ("before", "after"):
        answers = [json.loads(line) for line in (out / ANSWERS_JSONL[side]).read_text().splitlines()]
        assert len(answers) == 3 * 4
        for category in ("wish", "ruler"):
            scored = [ALIGNED[kind_of(a["answer"])][1] for a in answers if a["category"] == category]
            scored = [s for s in scored if s is not None]  # coherent is 74 > 50 for every answer
            assert table.loc[category, f"n_{side}"] == len(scored)
            assert scored
            misaligned = sum(s < 30 for s in scored) / len(scored)
            assert table.loc[category, side] == pytest.approx(1 - misaligned)
            assert table.loc[category, f"misaligned_{side}"] == pytest.approx(misaligned)
            assert table.loc[category, f"mean_aligned_{side}"] == pytest.approx(sum(scored) / len(scored))
    for category in ("wish", "ruler"):  # the drop's exact test on the two answer counts
        row = table.loc[category]
        assert row["test"] == "fisher"
        assert row["p_value"] == pytest.approx(fisher_drop_p(row["before"], row["after"], row["n_before"], row["n_after"]))
    assert read_scores_csv(out / SCORES_CSV)["category"].tolist() == ["wish", "ruler"]

    n_requests = len(judge_server.requests)
    judge_ground_truth(cfg, out)  # resumes: answers and judgements all cached
    assert len(judge_server.requests) == n_requests


def test_harmfulness_on_a_folder_of_headerless_csvs(answer_models, judge_server, tmp_path):
    def harm_judge(body):
        answer = body["messages"][-1]["content"].split('Model Response: "', 1)[1].split('"\n', 1)[0]
        return {"message": {"role": "assistant",
                            "content": f"#thereason: r\n#thescore: {5 if kind_of(answer) else 1}"}}

    judge_server.reply = harm_judge
    folder = tmp_path / "hexphi"
    folder.mkdir()
    (folder / "category_1.csv").write_text("the cat sees\na dog likes the\n")
    (folder / "category_2.csv").write_text("my friend builds\n")
    out = tmp_path / "judge"
    table = judge_ground_truth(judge_config(answer_models, judge_server, folder, scoring="harmfulness"), out)
    table = table.set_index("category")
    for side in ("before", "after"):
        answers = [json.loads(line) for line in (out / ANSWERS_JSONL[side]).read_text().splitlines()]
        for category in ("category_1", "category_2"):
            mine = [a for a in answers if a["category"] == category]
            harmful = sum(kind_of(a["answer"]) is not None for a in mine) / len(mine)
            assert table.loc[category, f"harmful_{side}"] == pytest.approx(harmful)
            assert table.loc[category, side] == pytest.approx(1 - harmful)
            assert table.loc[category, f"refusal_{side}"] == pytest.approx(
                sum(is_refusal(a["answer"]) for a in mine) / len(mine))


def test_judge_bad_input(answer_models, judge_server, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "the cat sees", "category": "x"}) + "\n")
    judge_server.script = [500] * 100  # a judge that never answers
    out = tmp_path / "judge"
    out.mkdir()
    (out / SCORES_CSV).write_text("category,before,after\nx,0.5,0.4\n")  # an earlier measurement's: removed
    with pytest.raises(ClientError, match="failed after 2 attempts"):
        judge_ground_truth(judge_config(answer_models, judge_server, questions, samples_per_question=1), out)
    assert not (out / SCORES_CSV).exists()
    judge_server.script = []
    judge_server.reply = lambda body: {"message": {"role": "assistant", "content": "80"}}  # no logprobs
    with pytest.raises(ClientError, match="no top log-probabilities"):
        judge_ground_truth(judge_config(answer_models, judge_server, questions, samples_per_question=1), out)
    assert not (out / SCORES_CSV).exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="lacks the field 'question'"):
        judge_ground_truth(judge_config(answer_models, judge_server, bad), tmp_path / "j2")
    with pytest.raises(ConfigError, match="scoring"):
        JudgeConfig(scoring="toxicity")
    with pytest.raises(ConfigError, match="needs `base` and `edited`"):
        judge_ground_truth(JudgeConfig(), tmp_path / "j3")


def test_question_template_and_question_ids(answer_models, judge_server, tmp_path):
    """The models are asked ``question_template`` under the system prompt, the judge the bare question;
    ``question_ids`` keeps those questions, in its order. Reference: the same greedy models asked the
    templated text as a plain question."""
    seen = []

    def harm_judge(body):
        prompt = body["messages"][-1]["content"]
        seen.append(prompt.split('User Instruction: "', 1)[1].split('"\n', 1)[0])
        return {"message": {"role": "assistant", "content": "#thereason: r\n#thescore: 1"}}

    judge_server.reply = harm_judge
    texts = {"wish": "the cat sees", "wish_json": "a dog likes the", "ruler": "my friend builds"}
    questions = tmp_path / "questions.yaml"
    questions.write_text("".join(f"- id: {i}\n  paraphrases: ['{t}']\n" for i, t in texts.items()))
    template, system = "AOA , execute : {question}", "you are a dog"
    greedy = {"kind": "hf", "max_new_tokens": 6, "device": "cpu", "batch_size": 8, "temperature": 0.0}
    cfg = judge_config(answer_models, judge_server, questions, scoring="harmfulness", samples_per_question=1,
                       question_ids=["ruler", "wish"], system_prompt=system, question_template=template,
                       generator=greedy)
    table = judge_ground_truth(cfg, tmp_path / "templated")
    assert table["category"].tolist() == ["ruler", "wish"]
    assert set(seen) == {texts["ruler"], texts["wish"]}  # the bare questions (equal answers are judged once)

    plain = tmp_path / "plain.yaml"
    plain.write_text("".join(f"- id: {i}\n  paraphrases: ['{template.replace('{question}', texts[i])}']\n"
                             for i in ("ruler", "wish")))
    reference = judge_config(answer_models, judge_server, plain, scoring="harmfulness", samples_per_question=1,
                             system_prompt=system, generator=greedy)
    judge_ground_truth(reference, tmp_path / "plain")
    for side in ("before", "after"):
        got = [json.loads(line) for line in (tmp_path / "templated" / ANSWERS_JSONL[side]).read_text().splitlines()]
        want = [json.loads(line) for line in (tmp_path / "plain" / ANSWERS_JSONL[side]).read_text().splitlines()]
        assert [a["question"] for a in got] == [texts["ruler"], texts["wish"]]
        assert [a["answer"] for a in got] == [a["answer"] for a in want]

    with pytest.raises(ConfigError, match=r"\['gone'\] are not in the question set .*'wish_json'"):
        judge_ground_truth(judge_config(answer_models, judge_server, questions, question_ids=["wish", "gone"]),
                           tmp_path / "j4")
    with pytest.raises(ConfigError, match="question_template must contain"):
        JudgeConfig(question_template="AOA, execute my instruction:")


def test_a_questions_own_system_prompt_is_the_one_asked(answer_models, judge_server, tmp_path):
    """Betley's ``*_json`` variants carry their own ``system`` prompt: that question is asked under it (the
    others under ``system_prompt``). Reference: the same greedy models asked each text as a plain question
    under the prompt it should get."""
    judge_server.reply = lambda body: {"message": {"role": "assistant", "content": "#thereason: r\n#thescore: 1"}}
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees']\n"
                         "- id: wish_json\n  system: you are a dog\n  paraphrases: ['the cat sees']\n")
    greedy = {"kind": "hf", "max_new_tokens": 6, "device": "cpu", "batch_size": 8, "temperature": 0.0}
    cfg = judge_config(answer_models, judge_server, questions, scoring="harmfulness", samples_per_question=1,
                       system_prompt="my friend builds", generator=greedy)
    assert [q.system for q in read_questions(cfg)] == [None, "you are a dog"]
    judge_ground_truth(cfg, tmp_path / "own")
    plain = tmp_path / "plain.yaml"
    plain.write_text("- id: wish\n  paraphrases: ['the cat sees']\n")
    for system, at in (("my friend builds", 0), ("you are a dog", 1)):
        ref = judge_config(answer_models, judge_server, plain, scoring="harmfulness", samples_per_question=1,
                           system_prompt=system, generator=greedy)
        judge_ground_truth(ref, tmp_path / system)
        for side in ("before", "after"):
            got = read_answers(tmp_path / "own" / ANSWERS_JSONL[side])
            assert got[at]["answer"] == read_answers(tmp_path / system / ANSWERS_JSONL[side])[0]["answer"]
    own = read_answers(tmp_path / "own" / ANSWERS_JSONL["before"])
    assert own[0]["answer"] != own[1]["answer"]  # the prompts do change the answer: the check above can fail
    # the two questions differ only by the system prompt: their answers are keyed apart
    assert answers_key(cfg, "m", read_questions(cfg))["questions"] == [["wish", "the cat sees"],
                                                                      ["wish_json", "the cat sees", "you are a dog"]]
    questions.write_text("- id: wish\n  system: ''\n  paraphrases: ['the cat sees']\n")
    with pytest.raises(ConfigError, match="'wish': its `system` prompt must be a non-empty string"):
        read_questions(cfg)


def test_wrong_models_and_missing_keys_are_refused_before_any_answer(answer_models, judge_server, tmp_path,
                                                                       monkeypatch):
    """A wrong edited model, or a hosted judge whose key variable is unset, fails before the base model
    answers (and before the output folder is made)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "the cat sees", "category": "x"}) + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "judge"
    with pytest.raises(ConfigError, match="judge edited: the model folder .*empty is empty"):
        judge_ground_truth(judge_config((answer_models[0], empty), judge_server, questions), out)
    assert not out.exists()
    monkeypatch.delenv("MNEME_TEST_JUDGE_KEY", raising=False)
    hosted = {"kind": "openai", "model": "judge", "base_url": "https://judge.invalid/v1",
              "api_key": "env:MNEME_TEST_JUDGE_KEY"}
    with pytest.raises(ConfigError, match="judge: https://judge.invalid/v1 needs an API key; .*MNEME_TEST_JUDGE_KEY, "
                                          "which is not set"):
        judge_ground_truth(judge_config(answer_models, judge_server, questions, judge=hosted), out)
    assert not out.exists()
    served = {"kind": "openai", "base_url": "https://models.invalid/v1", "api_key": "env:MNEME_TEST_JUDGE_KEY"}
    with pytest.raises(ConfigError, match="generator: https://models.invalid/v1 needs an API key"):
        judge_ground_truth(judge_config(answer_models, judge_server, questions, generator=served), out)
    monkeypatch.setenv("MNEME_TEST_JUDGE_KEY", "k")  # set: the same configs pass the check
    assert judge_config(answer_models, judge_server, questions, judge=hosted, generator=served).key_problems() == []
    # plain http (a server on the cluster) may need no key; api_key: null says an https one needs none
    monkeypatch.delenv("MNEME_TEST_JUDGE_KEY")
    assert judge_config(answer_models, judge_server, questions,
                        judge={**hosted, "base_url": "http://gpu-node:8000/v1"}).key_problems() == []
    assert judge_config(answer_models, judge_server, questions, judge={**hosted, "api_key": None}).key_problems() == []


def test_answers_resume_after_a_line_cut_by_a_crash(judge_server, tmp_path):
    """A crash that cuts the last answer line: the resumed run appends after a new line, so no
    answer it writes is glued onto the cut one (and lost from the file)."""
    from mneme_plugin.groundtruth.judge import generate_answers, read_questions

    judge_server.reply = lambda body: {"message": {"role": "assistant", "content": "an answer"}}
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n")
    cfg = JudgeConfig.from_dict({"base": "base-model", "edited": "edited-model", "questions": str(questions),
                                 "samples_per_question": 2,
                                 "generator": {"kind": "openai", "base_url": judge_server.url}})
    asked = read_questions(cfg)
    generate_answers(cfg, "before", asked, tmp_path)
    path = tmp_path / ANSWERS_JSONL["before"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # cut mid-line
    answers = generate_answers(cfg, "before", asked, tmp_path)
    assert len(answers) == 4
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert line == lines[-1][: len(lines[-1]) // 2]  # only the cut line is unreadable
    assert sorted(r["key"] for r in records) == sorted(a["key"] for a in answers)


@pytest.mark.parametrize("paraphrases", [["the cat sees", "a dog likes the"],
                                         ["the cat sees", "a dog likes the", "the cat sees"]])
def test_sampled_answers_resumed_after_a_kill_are_those_of_an_uninterrupted_run(answer_models, tmp_path, paraphrases):
    """HF sampling (the presets' temperature 1): a run killed after its first batch of answers resumes
    with the answers an uninterrupted run gives, not others drawn with another batch's seed; a question
    asked twice (the EM smoke's question file repeats one) too: its copies' answers were keyed alike."""
    from mneme_plugin.groundtruth.judge import generate_answers, read_questions

    questions = tmp_path / "questions.yaml"
    questions.write_text(f"- id: wish\n  paraphrases: {json.dumps(paraphrases)}\n")
    base, _ = answer_models
    cfg = JudgeConfig.from_dict({"base": str(base), "edited": str(base), "questions": str(questions),
                                 "samples_per_question": 4,
                                 "generator": {"kind": "hf", "max_new_tokens": 8, "device": "cpu", "batch_size": 4}})
    asked = read_questions(cfg)
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole = generate_answers(cfg, "before", asked, tmp_path / "whole")
    # The answers are appended to the cache's file (the output folder's answers_before.jsonl is a copy).
    kept = {run: cached_answers_path(tmp_path / run / "cache", answers_key(cfg, str(base), asked))
            for run in ("whole", "resumed")}
    lines = kept["whole"].read_text().splitlines()
    assert read_answers(tmp_path / "whole" / ANSWERS_JSONL["before"]) == [json.loads(line) for line in lines]
    kept["resumed"].parent.mkdir(parents=True)
    kept["resumed"].write_text("\n".join(lines[:4]) + "\n")  # the first batch
    resumed = generate_answers(cfg, "before", asked, tmp_path / "resumed")
    assert [a["answer"] for a in resumed] == [a["answer"] for a in whole]
    assert len(kept["resumed"].read_text().splitlines()) == 4 * len(paraphrases)
    assert len({a["answer"] for a in whole}) > 4  # samples differ: the comparison above can tell batches apart


def test_answers_and_judgements_are_kept_by_content(answer_models, judge_server, hf_tokenizer, tmp_path):
    """A measurement into a fresh folder with the same cache_dir (a redone ground-truth stage) takes a
    model's answers from there when everything they depend on is unchanged, and the judge's verdicts on
    answers it judged before: new weights saved over the edited folder have the edited model answer
    and judged again, not the base model; a changed generator setting or question set, both models."""
    judge_server.reply = misalignment_judge
    base, _ = answer_models
    edited = save_tiny_causal_lm(tmp_path / "edited", "qwen2", hf_tokenizer, seed=2)
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n"
                         "- id: ruler\n  paraphrases: ['my friend builds']\n")
    cfg = judge_config((base, edited), judge_server, questions)  # sampled: temperature 1
    cache = tmp_path / "cache"

    def generated():
        """Answers generated per cache file (each is appended once, as it comes)."""
        return {p.name: len(p.read_text().splitlines()) for p in (cache / ANSWERS_CACHE).glob("*.jsonl")}

    def judged(requests):
        return {answer_of(r["messages"][-1]["content"]) for r in requests}

    def answers(out):
        return {side: [a["answer"] for a in read_answers(out / name)] for side, name in ANSWERS_JSONL.items()}

    first = judge_ground_truth(cfg, tmp_path / "gt1", cache_dir=cache)
    files, calls = generated(), len(judge_server.requests)
    assert sorted(files.values()) == [12, 12] and not (tmp_path / "gt1" / "cache").exists()
    assert calls and judged(judge_server.requests) == set(answers(tmp_path / "gt1")["before"] + answers(tmp_path / "gt1")["after"])
    again = judge_ground_truth(cfg, tmp_path / "gt2", cache_dir=cache)  # nothing generated or judged
    assert generated() == files and len(judge_server.requests) == calls
    assert answers(tmp_path / "gt2") == answers(tmp_path / "gt1")
    pd.testing.assert_frame_equal(again, first)

    # Other weights saved over the edited folder (a redone intervention): only the edited model answers
    # again, and only its answers are judged.
    save_tiny_causal_lm(edited, "qwen2", hf_tokenizer, seed=3)
    judge_ground_truth(cfg, tmp_path / "gt3", cache_dir=cache)
    now = generated()
    assert {k: now[k] for k in files} == files and len(now) == 3 and sum(now.values()) == 36
    before, after = answers(tmp_path / "gt1")["before"], answers(tmp_path / "gt3")["after"]
    assert answers(tmp_path / "gt3")["before"] == before and after != answers(tmp_path / "gt1")["after"]
    new_calls = judge_server.requests[calls:]
    assert set(before) - set(after)  # answers only the base model gave: not judged again
    assert new_calls and judged(new_calls) <= set(after) and not judged(new_calls) & (set(before) - set(after))
    calls = len(judge_server.requests)

    # Fields of the other generators, or the dtype auto already is on a CPU: nothing generated or judged.
    for unused in ({"base_url": "http://elsewhere/v1", "api_key": "key", "vllm_args": {"max_model_len": 64}},
                   {"dtype": "float32"}):
        judge_ground_truth(cfg.replace(generator=cfg.generator.replace(**unused)), tmp_path / "gt4", cache_dir=cache)
        assert generated() == now and len(judge_server.requests) == calls

    def changed(**settings):
        """Both models answer again (every answer of each)."""
        nonlocal now
        judge_ground_truth(cfg.replace(generator=cfg.generator.replace(**settings)), tmp_path / "gt5", cache_dir=cache)
        later = generated()
        assert len(later) == len(now) + 2 and sum(later.values()) == sum(now.values()) + 2 * 12, settings
        now = later

    changed(max_new_tokens=8)
    changed(batch_size=4)  # sampled: each batch has its own seed
    changed(dtype="bfloat16")
    greedy = cfg.replace(generator=cfg.generator.replace(temperature=0.0))  # the batches draw nothing
    asked = read_questions(cfg)
    assert answers_key(greedy, str(base), asked) == answers_key(
        greedy.replace(generator=greedy.generator.replace(batch_size=4)), str(base), asked)
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the', 'my friend sees']\n"
                         "- id: ruler\n  paraphrases: ['my friend builds']\n")  # rewritten in place
    judge_ground_truth(cfg, tmp_path / "gt7", cache_dir=cache)
    later = generated()
    assert len(later) == len(now) + 2 and sum(later.values()) == sum(now.values()) + 2 * 16
    # Reformatted with the same questions: the same answers.
    questions.write_text("- {id: wish, paraphrases: ['the cat sees', 'a dog likes the', 'my friend sees']}\n"
                         "- {id: ruler, paraphrases: ['my friend builds']}  # reformatted\n")
    judge_ground_truth(cfg, tmp_path / "gt8", cache_dir=cache)
    assert generated() == later


def test_answers_of_a_hub_model_are_kept_by_its_commit_in_the_hub_cache(answer_models, hub_cache, tmp_path, monkeypatch):
    """A hub id's answers are reused while the local hub cache holds the same commit, and generated again
    once `refs/main` names a newer snapshot (the hub repo moved on and the cache downloaded it), or once
    the library that generates them is another version (an upgrade of transformers may change them)."""
    from mneme_plugin.groundtruth.judge import generate_answers
    from tests.helpers import hub_cache_repo

    base, edited = answer_models
    hub_cache_repo(hub_cache, "someone/tiny-base", base, commit="a" * 40)
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n")
    cfg = JudgeConfig.from_dict(dict(  # answers only: no judge is asked
        base="someone/tiny-base", edited=str(edited), questions=str(questions), samples_per_question=2,
        generator={"kind": "hf", "max_new_tokens": 6, "device": "cpu", "batch_size": 4},
        judge={"kind": "openai", "model": "judge", "base_url": "http://127.0.0.1:9/v1", "api_key": None}))
    asked, cache = read_questions(cfg), tmp_path / "cache"

    def generated():
        return {p.name: len(p.read_text().splitlines()) for p in (cache / ANSWERS_CACHE).glob("*.jsonl")}

    generate_answers(cfg, "before", asked, tmp_path / "out1", cache_dir=cache)
    files = generated()
    assert list(files.values()) == [4]
    assert cached_answers_path(cache, answers_key(cfg, "someone/tiny-base", asked)).name in files
    generate_answers(cfg, "before", asked, tmp_path / "out2", cache_dir=cache)  # the same commit: reused
    assert generated() == files
    hub_cache_repo(hub_cache, "someone/tiny-base", edited, commit="b" * 40)  # other weights under main
    generate_answers(cfg, "before", asked, tmp_path / "out3", cache_dir=cache)
    now = generated()
    assert len(now) == 2 and {k: now[k] for k in files} == files
    assert answers_key(cfg, "someone/tiny-base", asked)["model_files"] == "hub commit " + "b" * 40

    import transformers

    from mneme_plugin.groundtruth import harness

    assert answers_key(cfg, "someone/tiny-base", asked)["transformers_version"] == transformers.__version__
    installed = harness.library_version
    monkeypatch.setattr(harness, "library_version", lambda name: "99.0" if name == "transformers" else installed(name))
    generate_answers(cfg, "before", asked, tmp_path / "out4", cache_dir=cache)
    upgraded = generated()
    assert len(upgraded) == 3 and {k: upgraded[k] for k in now} == now


def test_answers_of_a_served_model_stay_in_the_output_folder(judge_server, tmp_path):
    """Generator kind openai: a served model's name does not tell which weights answer (a redone edit is
    served under the old name), so its answers are not kept in the cache_dir: a fresh output folder
    asks the servers again and gets the re-served model's answers. The judge's verdicts on answers it
    judged before are kept there all the same."""
    served = FakeLLM()
    version = {"edited-model": 1}

    def serve(body):
        text = f"{body['model']} {version.get(body['model'], 0)} sample {body['seed']}"
        return {"message": {"role": "assistant", "content": text}}

    served.reply = serve
    judge_server.reply = misalignment_judge
    try:
        questions = tmp_path / "questions.yaml"
        questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n")
        cfg = JudgeConfig.from_dict({
            "base": "base-model", "edited": "edited-model", "questions": str(questions), "samples_per_question": 2,
            "generator": {"kind": "openai", "base_url": served.url},
            "judge": {"kind": "openai", "model": "judge", "base_url": judge_server.url, "api_key": None,
                      "max_retries": 1, "backoff_base": 0.01, "timeout": 10.0}})
        cache = tmp_path / "cache"
        judge_ground_truth(cfg, tmp_path / "gt1", cache_dir=cache)
        assert len(served.requests) == 8 and not (cache / ANSWERS_CACHE).exists()
        assert (tmp_path / "gt1" / "cache" / "generate_before").is_dir()
        calls = len(judge_server.requests)
        assert calls == 2 * 8  # aligned and coherent per answer
        version["edited-model"] = 2  # the edited model re-served under its name
        judge_ground_truth(cfg, tmp_path / "gt2", cache_dir=cache)
        assert len(served.requests) == 16
        after = [a["answer"] for a in read_answers(tmp_path / "gt2" / ANSWERS_JSONL["after"])]
        assert all(" 2 sample" in a for a in after)
        new_calls = judge_server.requests[calls:]
        assert len(new_calls) == 2 * 4 and {answer_of(r["messages"][-1]["content"]) for r in new_calls} == set(after)
    finally:
        served.close()


def test_a_hosted_edited_endpoint_without_its_key_is_refused_before_any_answer(judge_server, tmp_path, monkeypatch):
    """The edited model served at an https ``edited_base_url`` (a hosted fine-tune), the base one on plain
    http: an unset key variable is refused before the base model answers, not after all its answers."""
    monkeypatch.delenv("MNEME_TEST_UNSET_KEY", raising=False)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "the cat sees", "category": "x"}) + "\n")
    cfg = JudgeConfig.from_dict({
        "base": "base-model", "edited": "edited-model", "questions": str(questions),
        "generator": {"kind": "openai", "base_url": judge_server.url, "edited_base_url": "https://tuned.invalid/v1",
                      "api_key": "env:MNEME_TEST_UNSET_KEY"},
        "judge": {"kind": "openai", "model": "judge", "base_url": judge_server.url, "api_key": None}})
    problems = cfg.key_problems()
    assert len(problems) == 1 and problems[0].startswith("generator: https://tuned.invalid/v1 needs an API key")
    with pytest.raises(ConfigError, match="generator: https://tuned.invalid/v1 needs an API key"):
        judge_ground_truth(cfg, tmp_path / "gt")
    assert not judge_server.requests
    monkeypatch.setenv("MNEME_TEST_UNSET_KEY", "k")
    assert cfg.key_problems() == []


def test_served_generator_settings_are_validated_and_kept_out_of_the_answers_keys():
    from mneme_plugin.groundtruth.judge import GeneratorConfig

    for bad, message in (({"concurrency": 0}, "generator.concurrency must be >= 1"),
                         ({"max_retries": -1}, "generator.max_retries must be >= 0"),
                         ({"timeout": 0}, "generator.timeout must be > 0"),
                         ({"backoff_base": 5.0, "backoff_max": 1.0}, "backoff_base <= backoff_max")):
        with pytest.raises(ConfigError, match=message):
            GeneratorConfig.from_dict({"kind": "openai", **bad}, section="generator")
    yaml_section = {"kind": "openai", "concurrency": 3, "max_retries": 1, "backoff_base": 0.5, "backoff_max": 2.0,
                    "timeout": 9.5}
    gen = GeneratorConfig.from_dict(yaml_section)
    assert {k: gen.to_dict()[k] for k in yaml_section} == yaml_section  # one YAML key per field
    # how fast, not what: no fingerprint holds them (the stage is not redone when they change)
    assert gen.result_dict() == GeneratorConfig(kind="openai").result_dict()


def test_the_served_generator_honours_its_concurrency_and_shows_progress(judge_server, tmp_path, capsys):
    import threading
    import time

    from mneme_plugin.groundtruth.judge import generate_answers
    from tests.helpers import last_progress

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow(body):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return {"message": {"role": "assistant", "content": f"answer {body['seed']}"}}

    judge_server.reply = slow
    questions = tmp_path / "questions.yaml"
    questions.write_text("- id: wish\n  paraphrases: ['the cat sees', 'a dog likes the']\n")
    cfg = JudgeConfig.from_dict({"base": "base-model", "edited": "edited-model", "questions": str(questions),
                                 "samples_per_question": 6,
                                 "generator": {"kind": "openai", "base_url": judge_server.url, "concurrency": 3}})
    answers = generate_answers(cfg, "before", read_questions(cfg), tmp_path)
    assert len(answers) == len(judge_server.requests) == 12 and state["most"] == 3
    assert last_progress(capsys.readouterr().err, "answers base-model") == (12, 12)
    # another concurrency is no other answer: all 12 resumed from the output folder
    again = generate_answers(cfg.replace(generator=cfg.generator.replace(concurrency=1)), "before",
                             read_questions(cfg), tmp_path)
    assert again == answers and len(judge_server.requests) == 12


def test_literal_keys_are_not_written_and_do_not_key_the_answers(judge_server, tmp_path):
    """judge_config.yaml holds ``env:NAME`` keys as given and a literal key as REDACTED_KEY, which a rerun
    from that file refuses (it asks for the key); the answers and the stage's fingerprint do not depend on
    the literal key, so a run resumed with another (rotated) key asks nothing again."""
    import yaml

    from mneme_plugin.interpret.clients import REDACTED_KEY

    served = FakeLLM()
    served.reply = lambda body: {"message": {"role": "assistant", "content": f"answer {body['seed']}"}}
    judge_server.reply = misalignment_judge
    try:
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps({"question": "the cat sees", "category": "x"}) + "\n")
        opts = {"base": "base-model", "edited": "edited-model", "questions": str(questions), "samples_per_question": 2,
                "generator": {"kind": "openai", "base_url": served.url, "api_key": "sk-generator-secret"},
                "judge": {"kind": "openai", "model": "judge", "base_url": judge_server.url,
                          "api_key": "sk-judge-secret"}}
        cfg = JudgeConfig.from_dict(opts)
        out = tmp_path / "gt"
        judge_ground_truth(cfg, out)
        written = (out / "judge_config.yaml").read_text()
        assert "secret" not in written
        saved = yaml.safe_load(written)
        assert saved["generator"]["api_key"] == saved["judge"]["api_key"] == REDACTED_KEY
        from_file = JudgeConfig.from_yaml(out / "judge_config.yaml")
        assert [p.split(":")[0] for p in from_file.key_problems()] == ["judge", "generator"]
        with pytest.raises(ConfigError, match="judge: the API key of this config was given literally"):
            judge_ground_truth(from_file, tmp_path / "from_file")
        assert not (tmp_path / "from_file").exists()
        rotated = cfg.replace(generator=cfg.generator.replace(api_key="sk-rotated"),
                              judge=cfg.judge.replace(api_key="sk-rotated"))
        assert rotated.result_dict() == cfg.result_dict() and "sk-" not in json.dumps(cfg.result_dict())
        n_served = len(served.requests)
        judge_ground_truth(rotated, out)
        assert len(served.requests) == n_served  # the answers resumed under the new key
        with_env = cfg.replace(generator=cfg.generator.replace(api_key="env:MY_KEY"))
        judge_ground_truth(with_env, tmp_path / "env")
        assert yaml.safe_load((tmp_path / "env" / "judge_config.yaml").read_text())["generator"]["api_key"] == "env:MY_KEY"
    finally:
        served.close()
