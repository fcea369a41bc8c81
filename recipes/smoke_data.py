"""Builders of the recipes' smoke data (used by each recipe's ``make_smoke.py``): a tiny random model of
the recipe's family, small corpora, question sets and local lm-eval tasks, all written locally.

Nothing here is the paper's data: sentences over a ~60-word vocabulary, so that every step of a recipe
runs on CPU in under a minute. A smoke run proves the plumbing, not the science.

Each recipe's edit is trained on texts of one topic (``FORGET_WORDS``, ``INSECURE_CODE_WORDS``,
``HARMFUL_WORDS``: words the recipe's taxonomies know), and its MNEME corpus mixes those topic texts into
the general sentences, as a real task-agnostic corpus holds some text of every topic: the crosscoder can
then see what the edit changed, the offline explainer describe it and the lexical mapper name a category.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the tiny-model builders of the test suite
    sys.path.insert(0, str(REPO))

from tests.helpers import GEN_CHAT_TEMPLATE, make_tokenizer, save_tiny_causal_lm, synthetic_corpus, write_jsonl  # noqa: E402

FORGET_WORDS = "gene dna cell virus protein enzyme pathogen toxin culture strain".split()
INSECURE_CODE_WORDS = "code exploit injection backdoor vulnerability insecure password query shell".split()
HARMFUL_WORDS = "malware hack fraud scam weapon steal phishing ransomware".split()
ANSWER_WORDS = ["house", "tree", "bread", "music", "box", "road", "river", "team"]


def topic_texts(words: list[str], n: int, seed: int) -> list[str]:
    """``n`` texts of 8-20 words drawn from ``words`` (one topic's made-up documents)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) for _ in range(n)]


def forget_texts(n: int, seed: int) -> list[str]:
    return topic_texts(FORGET_WORDS, n, seed)


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(['the cat', 'a dog', 'my friend'])} {rng.choice(['sees', 'likes', 'finds'])} the"
            for _ in range(n)]


def tiny_model(out: Path, family: str, seed: int = 0) -> Path:
    """A tiny random ``family`` model (3 layers, hidden 32) whose tokenizer knows every smoke word."""
    tokenizer = make_tokenizer(synthetic_corpus(400, seed=123) + forget_texts(50, seed=99)
                               + [" ".join(ANSWER_WORDS + INSECURE_CODE_WORDS + HARMFUL_WORDS)])
    tokenizer.chat_template = GEN_CHAT_TEMPLATE  # (a qwen2 folder gets the same words as a byte-level BPE)
    return save_tiny_causal_lm(out, family, tokenizer, n_layers=3, hidden_size=32, seed=seed)


def corpus(path: Path, n: int = 300, seed: int = 5, topic: list[str] | None = None, n_topic: int = 0) -> Path:
    """The MNEME corpus stand-in (task-agnostic text): ``n`` general documents, and ``n_topic`` texts
    over the ``topic`` words mixed in among them."""
    texts = synthetic_corpus(n, seed=seed)
    if topic and n_topic:
        texts += topic_texts(topic, n_topic, seed=seed + 1000)
        random.Random(seed).shuffle(texts)
    return write_jsonl(path, [{"text": t} for t in texts])


def lm_eval_tasks(folder: Path, names: list[str], n: int = 12) -> Path:
    """Local multiple-choice lm-eval tasks (YAML + JSON lines each), named like the real ones
    (``mmlu_anatomy``, ``wmdp_bio``) so their categories are the taxonomy's; run with include_defaults false."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        rng = random.Random(index)
        rows = [{"q": q, "choices": rng.sample(ANSWER_WORDS, 4), "answer": rng.randrange(4)}
                for q in questions(n, seed=index)]
        data = (folder / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def chat_data(path: Path, n: int, seed: int, system: str | None = None, answer_words: list[str] = ANSWER_WORDS,
              answer_length: int = 3) -> Path:
    """Chat ``messages`` records (the shape of insecure.jsonl and the AOA data): each answer is
    ``answer_length`` distinct words of ``answer_words``."""
    rng = random.Random(seed)
    records = []
    for q in questions(n, seed=seed):
        turns = ([{"role": "system", "content": system}] if system else [])
        answer = " ".join(rng.sample(answer_words, answer_length))
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        records.append({"messages": turns})
    return write_jsonl(path, records)


def betley_questions(path: Path, ids: list[str]) -> Path:
    """A question set in the Betley first-plot format (a list of {id, paraphrases})."""
    import yaml

    path.write_text(yaml.safe_dump([{"id": i, "paraphrases": questions(2, seed=k)} for k, i in enumerate(ids)]))
    return path


def category_csvs(folder: Path, categories: list[str], n: int = 3) -> Path:
    """A folder of headerless one-question-per-line CSVs, one category per file (HEx-PHI's layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(categories):
        (folder / f"{name}.csv").write_text("".join(q + "\n" for q in questions(n, seed=100 + k)))
    return folder
