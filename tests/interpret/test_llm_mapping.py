"""The ``llm`` map method and labeler against a local OpenAI-compatible server answering in the shapes chat
models use (numbered, bulleted, capitalised, separated by semicolons, with notes and preambles): each read
as the entries it names, in its order, and an answer that names none counted and shown."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from mneme_plugin.interpret import ClientConfig, MapConfig, map_descriptions
from tests.helpers import FakeLLM

TAXONOMY = ("name: topics\nentries:\n"
            "  - id: law\n    name: Law\n  - id: history\n    name: History\n"
            "  - id: security\n    name: Security\n  - id: high_school_biology\n    name: High school biology\n"
            "  - id: cyber\n    name: Cybersecurity\n")


@pytest.fixture
def fake_llm():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture
def taxonomy(tmp_path):
    path = tmp_path / "topics.yaml"
    path.write_text(TAXONOMY)
    return str(path)


def answering(rank: str, label: str = "Legal terms"):
    """A server that answers every map prompt with ``rank`` and every label prompt with ``label``."""
    def reply(body):
        prompt = body["messages"][-1]["content"]
        text = rank if "Which of these categories" in prompt else label
        return {"message": {"role": "assistant", "content": text}}
    return reply


def mapped(fake_llm, taxonomy, tmp_path, descriptions=("mentions of courts",), top_k=3):
    client = ClientConfig(kind="openai", model="m", base_url=fake_llm.url, api_key=None, timeout=10.0,
                          concurrency=4)
    table = pd.DataFrame({"latent": range(len(descriptions)), "explanation": list(descriptions)})
    return map_descriptions(table, MapConfig(taxonomies=[taxonomy], method="llm", labeler="llm", top_k=top_k,
                                             client=client), out_dir=tmp_path / "mapping", progress=False)


@pytest.mark.parametrize("answer, expected", [
    ("law, history, security", ["law", "history", "security"]),
    ("1. law\n2. history\n3. security", ["law", "history", "security"]),
    ("Law, History, Security", ["law", "history", "security"]),
    ("law; history; security", ["law", "history", "security"]),
    ("- `law`\n- **History**\n* 'security'.", ["law", "history", "security"]),
    ('"security", "law"', ["security", "law"]),  # the LLM's order, not the taxonomy's
    ("Here are the best matching categories:\n1) law: Law\n2) history - old documents\n3) Cybersecurity",
     ["law", "history", "cyber"]),  # ids as the prompt lists them, and an entry's name
    ("high school biology, SECURITY", ["high_school_biology", "security"]),
])
def test_llm_answers_of_each_shape_name_their_entries_in_order(fake_llm, taxonomy, tmp_path, answer, expected):
    fake_llm.reply = answering(answer)
    row = mapped(fake_llm, taxonomy, tmp_path).iloc[0]
    top = [entry for entry, _ in json.loads(row["top_k"])]
    assert top == expected and row["category"] == expected[0] and row["score"] == 1.0


def test_a_note_keeps_its_entry_and_an_unknown_item_promotes_none(fake_llm, taxonomy, tmp_path):
    """'law (courts), history' once read as history alone, at rank 1: the note is dropped, and an item
    that names no entry keeps its place, so the entry after it keeps its own (score 1/2)."""
    fake_llm.reply = answering("law (courts, judges), history")
    assert json.loads(mapped(fake_llm, taxonomy, tmp_path).loc[0, "top_k"]) == [["law", 1.0], ["history", 0.5]]
    fake_llm.reply = answering("legal matters, history, lawyers")  # "legal matters" is no entry; nor near ones
    row = mapped(fake_llm, taxonomy, tmp_path / "other").iloc[0]  # (another cache folder)
    assert json.loads(row["top_k"]) == [["history", 0.5]] and row["score"] == 0.5


@pytest.mark.parametrize("answer, label", [
    ("Sure! Here is a label:\nLegal terms", "Legal terms"),
    ('"Legal terms"', "Legal terms"),
    ("Label: Legal terms", "Legal terms"),
    ("Here is a short label: **Legal terms**.", "Legal terms"),
    ("Legal terms\n\nThis feature fires on courts.", "Legal terms"),
    ("Sure!", "unlabelled"),
])
def test_the_label_is_the_first_line_that_is_not_a_preamble(fake_llm, taxonomy, tmp_path, answer, label):
    fake_llm.reply = answering("law", label=answer)
    assert mapped(fake_llm, taxonomy, tmp_path).loc[0, "label"] == label


def test_answers_that_name_no_entry_are_counted_and_shown(fake_llm, taxonomy, tmp_path, caplog):
    fake_llm.reply = answering("I cannot tell from the description.")
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        table = mapped(fake_llm, taxonomy, tmp_path, descriptions=("courts", "wars", "locks"))
    assert table["category"].isna().all()
    assert ("map (topics): 3 of 3 LLM answers named no category of the taxonomy" in caplog.text
            and "'I cannot tell from the description.'" in caplog.text)
    caplog.clear()
    fake_llm.reply = answering("law")
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        mapped(fake_llm, taxonomy, tmp_path / "again", descriptions=("courts", "wars"))
    assert "named no category" not in caplog.text


def test_the_map_stage_warns_inside_mneme_run(fake_llm, taxonomy, tmp_path, caplog):
    """`mneme run`'s map stage (its registered function, on the run's explanations): the same warning."""
    from mneme_plugin.interpret.files import EXPLANATIONS_STEM, write_table
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline.config import RunConfig
    from mneme_plugin.pipeline.stage import PipelineContext
    from mneme_plugin.pipeline.stages import STAGES

    client = {"kind": "openai", "model": "m", "base_url": fake_llm.url, "api_key": None}
    config = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"},
                                  "corpus": {"source": "c.txt"}, "harvest": {"layer": 0},
                                  "map": {"taxonomies": [taxonomy], "method": "llm", "client": client}})
    layout = RunLayout(tmp_path / "run")
    write_table(pd.DataFrame({"latent": [1, 2], "explanation": ["courts", "wars"]}), layout.explanations,
                EXPLANATIONS_STEM)
    fake_llm.reply = answering("nothing fits")
    stage = next(s for s in STAGES if s.name == "map")
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        stage.run(PipelineContext(config, layout, progress=False))
    assert "map (topics): 2 of 2 LLM answers named no category" in caplog.text


def test_identical_prompts_of_many_latents_are_asked_once(fake_llm, taxonomy, tmp_path):
    """256 latents of two descriptions: one label and one map request per description, not per latent."""
    fake_llm.reply = answering("law, history")
    table = mapped(fake_llm, taxonomy, tmp_path, descriptions=("courts", "wars") * 128)
    assert len(table) == 256 and (table["category"] == "law").all()
    assert len(fake_llm.requests) == 4
