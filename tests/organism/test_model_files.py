"""Organism model files: safetensors + JSON round trip, and no pickle is ever loaded (issue 11 item 1)."""

import json
import pickle

import pytest
import torch

from mneme_plugin.errors import CheckpointError
from mneme_plugin.organism import OrganismConfig, load_organism_model, save_organism_model, tiny_hooked_transformer
from mneme_plugin.organism.build import pretraining_texts
from mneme_plugin.organism.models import train_tokenizer

SMALL = OrganismConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=16, pretrain_docs=40, generic_docs=8)


class _Payload:
    """Unpickling this object creates ``marker``: the file a code-executing loader would leave."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_pickle(path, marker):
    # torch.save goes through pickle too: a weights_only=False load of either format runs the payload.
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "model_kwargs": {}, "meta": {"seed": 0, "organism": {}}, "x": _Payload(marker)}, fh)


def _small_model(seed=0):
    tokenizer = train_tokenizer(pretraining_texts(seed, SMALL))
    kwargs = dict(n_layers=SMALL.n_layers, d_model=SMALL.d_model, n_heads=SMALL.n_heads, n_ctx=SMALL.n_ctx, seed=seed)
    torch.manual_seed(1)
    model = tiny_hooked_transformer(tokenizer, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seed's init: the weights really come from the file
    return model, kwargs, {"seed": seed, "organism": SMALL.__dict__}


def test_organism_model_round_trips_through_safetensors_and_json(tmp_path):
    model, kwargs, meta = _small_model()
    weights = save_organism_model(tmp_path / "base-abc", model, kwargs, meta)
    assert weights.name == "base-abc.safetensors" and (tmp_path / "base-abc.json").is_file()
    assert json.loads((tmp_path / "base-abc.json").read_text())["model_kwargs"] == kwargs
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    for spec in (weights, tmp_path / "base-abc.json"):
        reloaded = load_organism_model(spec)
        assert torch.equal(reloaded(tokens), model(tokens))
        assert reloaded.cfg.model_name == "base-abc"  # by its file, so a base and its edit differ


@pytest.mark.parametrize("name", ["base-abc.pt", "base-abc.safetensors", "base-abc.json", "base-abc"])
def test_a_crafted_pickle_is_never_executed(tmp_path, name):
    marker = tmp_path / "PWNED"
    evil = tmp_path / name
    _crafted_pickle(evil, marker)
    if name == "base-abc.safetensors":  # a valid config next to a pickle posing as weights
        model, kwargs, meta = _small_model()
        (tmp_path / "base-abc.json").write_text(json.dumps(
            {"format": "mneme-organism-model", "version": 1, "model_kwargs": kwargs, "meta": meta}))
    with pytest.raises(CheckpointError) as err:
        load_organism_model(evil)
    assert not marker.exists()
    if name.endswith(".pt"):
        assert "never loaded" in str(err.value) and "Rebuild" in str(err.value)


def test_a_pickled_pt_next_to_its_rebuilt_safetensors_points_to_it(tmp_path):
    model, kwargs, meta = _small_model()
    save_organism_model(tmp_path / "edited-x", model, kwargs, meta)
    marker = tmp_path / "PWNED"
    _crafted_pickle(tmp_path / "edited-x.pt", marker)
    with pytest.raises(CheckpointError, match=r"Use .*edited-x\.safetensors instead"):
        load_organism_model(tmp_path / "edited-x.pt")
    assert not marker.exists()


def test_organism_model_config_with_wrong_types_is_refused(tmp_path):
    model, kwargs, meta = _small_model()
    weights = save_organism_model(tmp_path / "m", model, kwargs, meta)
    blob = json.loads((tmp_path / "m.json").read_text())
    blob["model_kwargs"]["d_model"] = "16"
    (tmp_path / "m.json").write_text(json.dumps(blob))
    with pytest.raises(CheckpointError, match="model_kwargs must map"):
        load_organism_model(weights)


def test_mneme_run_with_a_pickled_organism_model_refuses_it_and_runs_nothing(tmp_path):
    """The route of the reported hole: a run config whose model is organism:PATH."""
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main

    marker = tmp_path / "PWNED"
    _crafted_pickle(tmp_path / "evil.pt", marker)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 20)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "models": {"base": f"organism:{tmp_path / 'evil.pt'}", "edited": f"organism:{tmp_path / 'evil.pt'}"},
        "corpus": {"source": str(corpus)},
        "harvest": {"layer": 0, "context_length": 8, "batch_size": 2}, "collect": {"example_ctx_len": 8},
    }))
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code != 0
    assert "never loaded" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_dry_run_checks_that_an_organism_model_is_in_the_current_format(tmp_path):
    """`mneme run --dry-run` used to call any existing organism:PATH "found", a pickled .pt included."""
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main

    model, kwargs, meta = _small_model()
    good = save_organism_model(tmp_path / "good", model, kwargs, meta)
    _crafted_pickle(tmp_path / "old.pt", tmp_path / "PWNED")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad.json").write_text((tmp_path / "good.json").read_text())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 20)

    def dry_run(base, edited):
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / "run"), "models": {"base": f"organism:{base}", "edited": f"organism:{edited}"},
            "corpus": {"source": str(corpus)}, "harvest": {"layer": 0, "context_length": 8},
            "collect": {"example_ctx_len": 8},
        }))
        return CliRunner().invoke(main, ["run", "--dry-run", str(config)])

    result = dry_run(good, good)
    assert result.exit_code == 0, result.output
    assert f"organism model {good} found" in result.output
    result = dry_run(good, tmp_path / "old.pt")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "old.pt is not an organism model file" in result.output and "found" not in result.output.split("old.pt")[1]
    result = dry_run(tmp_path / "bad.safetensors", good)
    assert result.exit_code != 0 and "bad.safetensors is not a readable safetensors file" in result.output
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "run").exists()
