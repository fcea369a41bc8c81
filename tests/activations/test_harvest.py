"""Harvest: content equals each model's own cache, filtering, resume, errors."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

from mneme_plugin.activations import ActivationStore, HarvestConfig, harvest, iter_windows
from mneme_plugin.errors import CheckpointError, EmptyCorpusError, ForeignOutputError, NonFiniteActivationError

HOOK = "blocks.1.hook_resid_post"


def cfg(**kw) -> HarvestConfig:
    base = dict(layer=1, context_length=16, batch_size=4, rows_per_shard=100, normalization_tokens=300, dtype="float32")
    base.update(kw)
    return HarvestConfig(**base)


def store_content(store: ActivationStore) -> list[dict[str, torch.Tensor]]:
    return [store.load_shard(i) for i in range(store.num_shards)]


@pytest.mark.parametrize("pair", ["ht_pair", "bridge_pair"])
def test_rows_equal_run_with_cache(pair, request, corpus, tmp_path):
    base, edited = request.getfixturevalue(pair)
    config = cfg()
    store = harvest(base, edited, corpus, config, tmp_path / "s", progress=False)
    m = store.manifest
    assert m["complete"] and m["n_tokens"] == store.num_rows > 0
    assert m["hook_name"] == HOOK and m["d_model"] == 32 and m["layer"] == 1

    windows = list(iter_windows(corpus, base.tokenizer, 16))
    tokens = torch.stack([w.tokens for w in windows])
    expected = []
    for model in (base, edited):
        acts = []
        for start in range(0, len(tokens), 4):  # the harvest's own batches
            _, cache = model.run_with_cache(tokens[start : start + 4], names_filter=[HOOK])
            acts.append(cache[HOOK])
        expected.append(torch.cat(acts))
    data = {k: torch.cat([s[k] for s in store_content(store)]) for k in ("activations", "tokens", "positions", "windows")}
    w, p = data["windows"].long(), data["positions"].long()
    assert torch.equal(data["tokens"].long(), tokens[w, p])
    assert torch.equal(data["activations"][:, 0], expected[0][w, p])
    assert torch.equal(data["activations"][:, 1], expected[1][w, p])
    # BOS, EOS and padding never become rows; every other position does (no outliers here).
    tok = base.tokenizer
    assert not torch.isin(data["tokens"], torch.tensor(tok.all_special_ids)).any()
    assert (p > 0).all()
    n_special = int(torch.isin(tokens, torch.tensor(tok.all_special_ids)).sum())
    n_pad = int(sum((~win.mask).sum() for win in windows))
    assert n_pad > 0 and m["padding_dropped"] == n_pad
    assert m["special_tokens_dropped"] == n_special - n_pad
    assert m["outliers_dropped"] == 0
    assert store.num_rows == tokens.numel() - n_special


def test_drop_bos_false_keeps_the_bos_rows(ht_pair, corpus, tmp_path):
    """drop_bos: false had no effect with the default drop_special_tokens (BOS is one of the special tokens):
    it now keeps the BOS row of every window (position 0), and only those, next to the default harvest's rows."""
    tok = ht_pair[0].tokenizer
    config = cfg(outlier_factor=None)  # the BOS rows' large norms must not be filtered either
    default = harvest(*ht_pair, corpus, config, tmp_path / "default", progress=False)
    kept = harvest(*ht_pair, corpus, config.replace(drop_bos=False), tmp_path / "bos", progress=False)
    rows = {k: torch.cat([s[k] for s in store_content(kept)]) for k in ("tokens", "positions", "windows", "activations")}
    n_windows = kept.manifest["n_windows"]
    at_bos = rows["tokens"] == tok.bos_token_id
    assert int(at_bos.sum()) == n_windows and (rows["positions"][at_bos] == 0).all()
    assert sorted(rows["windows"][at_bos].tolist()) == list(range(n_windows))  # one BOS row a window
    assert not torch.isin(rows["tokens"], torch.tensor([tok.eos_token_id, tok.pad_token_id])).any()
    assert kept.num_rows == default.num_rows + n_windows
    assert kept.manifest["special_tokens_dropped"] == default.manifest["special_tokens_dropped"] - n_windows
    assert torch.equal(rows["activations"][~at_bos], default.all_activations())  # the other rows as before


def test_normalization_factors(ht_pair, corpus, tmp_path):
    store = harvest(*ht_pair, corpus, cfg(normalization_tokens=250), tmp_path / "s", progress=False)
    first = store.all_activations(max_rows=250)
    assert first.shape == (250, 2, 32)
    scaled = first * store.scale_factors[None, :, None]
    assert torch.allclose(scaled.norm(dim=-1).mean(0), torch.full((2,), math.sqrt(32)), rtol=1e-4)
    norm = store.manifest["normalization"]
    assert norm["n_tokens"] == 250 and len(norm["median_norms"]) == 2


def test_short_corpus_norms_use_every_token_and_warn_only_when_few(ht_pair, corpus, tmp_path, caplog):
    # A corpus shorter than normalization_tokens: the estimate uses all of it. Thousands of tokens
    # are a note (the organism's slice is such a corpus); a few hundred are a warning.
    caplog.set_level(logging.INFO, logger="mneme_plugin")
    store = harvest(*ht_pair, corpus, cfg(normalization_tokens=10**6), tmp_path / "long", progress=False)
    assert store.num_rows >= 1_000, "the fixture corpus must be long enough for this test"
    assert store.manifest["normalization"]["n_tokens"] == store.num_rows
    notes = [r for r in caplog.records if "Normalisation estimated" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.INFO] and str(store.num_rows) in notes[0].getMessage()

    caplog.clear()
    short = harvest(*ht_pair, corpus[:5], cfg(normalization_tokens=10**6), tmp_path / "short", progress=False)
    assert short.num_rows < 1_000
    notes = [r for r in caplog.records if "Normalisation estimated" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.WARNING] and "longer corpus" in notes[0].getMessage()


def test_bf16_and_fp32_round_trip(ht_pair, corpus, tmp_path):
    s32 = harvest(*ht_pair, corpus, cfg(dtype="float32"), tmp_path / "f", progress=False)
    s16 = harvest(*ht_pair, corpus, cfg(dtype="bfloat16"), tmp_path / "b", progress=False)
    assert s16.load_shard(0)["activations"].dtype == torch.bfloat16
    assert s32.load_shard(0)["activations"].dtype == torch.float32
    assert torch.equal(ActivationStore(tmp_path / "b").all_activations(dtype=torch.bfloat16),
                       s32.all_activations().to(torch.bfloat16))
    assert s16.manifest["dtype"] == "bfloat16"


class Boom(RuntimeError):
    pass


def test_interrupted_harvest_resumes_identically(ht_pair, corpus, tmp_path):
    config = cfg()
    full = harvest(*ht_pair, corpus, config, tmp_path / "full", progress=False)
    assert full.num_shards >= 4

    def stop_after_two(i: int) -> None:
        if i == 1:
            raise Boom("killed")

    with pytest.raises(Boom):
        harvest(*ht_pair, corpus, config, tmp_path / "cut", progress=False, on_shard=stop_after_two)
    partial = ActivationStore(tmp_path / "cut")
    assert not partial.complete and partial.num_shards == 2

    # A second interruption from inside the corpus iterator, mid-way through the next shard.
    def failing_corpus():
        for i, doc in enumerate(corpus):
            if i == 70:
                raise Boom("corpus died")
            yield doc

    with pytest.raises(Boom):
        harvest(*ht_pair, failing_corpus(), config, tmp_path / "cut", progress=False)
    resumed = harvest(*ht_pair, corpus, config, tmp_path / "cut", progress=False)
    assert resumed.complete
    a, b = full.manifest, resumed.manifest
    for key in ("n_tokens", "n_windows", "shards", "normalization", "outliers_dropped", "special_tokens_dropped", "padding_dropped"):
        assert a[key] == b[key], key
    for x, y in zip(store_content(full), store_content(resumed)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not list((tmp_path / "cut").glob(".*tmp"))


def test_a_one_shot_iterator_is_refused_where_the_corpus_is_read_twice(ht_pair, corpus, tmp_path):
    """A generator as corpus: the normalisation estimate consumed its first documents, the harvest stored the
    rest and marked the store complete. A new harvest (one process or sharded) and a stream refuse it before
    reading a document; resuming a partial store, which reads the corpus once, still takes one."""
    from mneme_plugin.activations import harvest_stream
    from mneme_plugin.activations.harvest import HarvestContext
    from mneme_plugin.activations.sharded import harvest_sharded
    from mneme_plugin.distributed import SINGLE_PROCESS
    from mneme_plugin.errors import ConfigError

    refusal = r"one-shot iterator \(\w+\), but .*reads it .*Pass a list of strings or records.*\.jsonl.*HFDataset"
    for one_shot in (iter(corpus), (doc for doc in corpus), map(str, corpus)):
        with pytest.raises(ConfigError, match=refusal):
            harvest(*ht_pair, one_shot, cfg(), tmp_path / "s", progress=False)
        assert next(one_shot) == corpus[0]  # refused before reading it
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(ConfigError, match=refusal):
        harvest_sharded(HarvestContext.build(*ht_pair, cfg()), iter(corpus), cfg(), tmp_path / "sharded",
                        SINGLE_PROCESS, progress=False)
    with pytest.raises(ConfigError, match=refusal):
        harvest_stream(*ht_pair, iter(corpus), cfg(), batch_size=32, shuffle_buffer_rows=256)

    def stop(i: int) -> None:
        raise Boom("killed")

    full = harvest(*ht_pair, tuple(corpus), cfg(), tmp_path / "full", progress=False)  # any re-iterable collection
    with pytest.raises(Boom):
        harvest(*ht_pair, corpus, cfg(), tmp_path / "cut", progress=False, on_shard=stop)
    with pytest.raises(ConfigError, match=refusal):  # overwrite starts a new store: two passes again
        harvest(*ht_pair, iter(corpus), cfg(), tmp_path / "cut", progress=False, overwrite=True)
    resumed = harvest(*ht_pair, iter(corpus), cfg(), tmp_path / "cut", progress=False)
    assert resumed.complete and resumed.manifest["shards"] == full.manifest["shards"]
    assert torch.equal(resumed.all_activations(), full.all_activations())


def test_existing_store_same_and_different_config(ht_pair, corpus, tmp_path, caplog):
    path = tmp_path / "s"
    with caplog.at_level(logging.INFO, logger="mneme_plugin"):
        harvest(*ht_pair, corpus, cfg(), path, progress=False)
    assert str(path) in caplog.text
    mtime = (path / "manifest.json").stat().st_mtime_ns
    again = harvest(*ht_pair, corpus, cfg(), path, progress=False)  # complete: nothing redone
    assert again.complete and (path / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match=r"context_length: stored 16 vs now 32") as refused:
        harvest(*ht_pair, corpus, cfg(context_length=32), path, progress=False)
    # Its own type, naming the folder (`mneme run` adds its remedy by this type).
    assert isinstance(refused.value, ForeignOutputError) and refused.value.folder == path
    store = harvest(*ht_pair, corpus, cfg(context_length=32), path, progress=False, overwrite=True)
    assert store.manifest["context_length"] == 32


def test_planted_outlier_is_dropped_and_counted(ht_pair, corpus, tmp_path):
    base, edited = ht_pair
    tok = base.tokenizer
    planted = tok.convert_tokens_to_ids("robot")
    loud = copy.deepcopy(edited)
    with torch.no_grad():
        loud.W_E[planted] *= 1e4  # a "massive activation" token in the edited model only
    # Norm statistics over every token of the corpus, so the stored rows are exactly the ones the scale is fit to.
    store = harvest(base, loud, corpus, cfg(outlier_factor=50.0, normalization_tokens=10**6), tmp_path / "s",
                    progress=False)
    windows = list(iter_windows(corpus, tok, 16))
    n_planted = int(sum((w.tokens == planted).sum() for w in windows))
    assert n_planted > 0
    assert store.manifest["outliers_dropped"] == n_planted
    tokens = torch.cat([s["tokens"] for s in store_content(store)])
    assert not (tokens == planted).any()
    # The scale fits the data the crosscoder sees (the outliers are never stored): E||s_l x_l|| = sqrt(d).
    stored_norms = store.all_activations().norm(dim=-1)
    torch.testing.assert_close((stored_norms * store.scale_factors[None]).mean(0), torch.full((2,), math.sqrt(32)),
                               rtol=1e-5, atol=0)
    kept = harvest(base, loud, corpus, cfg(outlier_factor=None, normalization_tokens=10**6), tmp_path / "k",
                   progress=False)
    assert kept.manifest["outliers_dropped"] == 0 and kept.num_rows == store.num_rows + n_planted
    assert kept.scale_factors[1] < store.scale_factors[1] / 5  # kept in, the planted tokens swamp the edited mean


def test_nan_activations_raise(ht_pair, corpus, tmp_path):
    base, edited = ht_pair
    broken = copy.deepcopy(edited)
    with torch.no_grad():
        broken.W_E[base.tokenizer.convert_tokens_to_ids("tree")] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"non-finite .*edited.*batch \d+"):
        harvest(base, broken, corpus, cfg(), tmp_path / "s", progress=False)


def test_empty_corpus_raises(ht_pair, tmp_path):
    with pytest.raises(EmptyCorpusError):
        harvest(*ht_pair, [], cfg(), tmp_path / "s", progress=False)
    with pytest.raises(EmptyCorpusError, match="special"):
        harvest(*ht_pair, ["<eos> <eos>"], cfg(), tmp_path / "t", progress=False)


def test_foreign_and_corrupt_folders(ht_pair, corpus, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="manifest.json"):
        ActivationStore(foreign)
    with pytest.raises(ForeignOutputError, match="foreign folder") as refused:
        harvest(*ht_pair, corpus, cfg(), foreign, progress=False)
    assert isinstance(refused.value, CheckpointError) and refused.value.folder == foreign

    store = harvest(*ht_pair, corpus, cfg(), tmp_path / "s", progress=False)
    (store.path / "shard_00001.safetensors").write_bytes(b"not a safetensors file")
    fresh = ActivationStore(store.path)
    with pytest.raises(CheckpointError, match="shard_00001.safetensors is corrupt"):
        fresh.load_shard(1)
    (store.path / "shard_00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        fresh.load_shard(2)
    (store.path / "manifest.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ActivationStore(store.path)
    (store.path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="something-else"):
        ActivationStore(store.path)


def test_overwrite_deletes_a_stores_files_only_and_never_a_foreign_folder(ht_pair, corpus, tmp_path):
    """overwrite=True deleted everything in out_dir, a folder that was no store too. It now deletes a store's
    files only (manifest, shards, progress files, temporaries), refuses a folder that holds no store, overwrite
    or not, without suggesting overwrite there, and suggests it for a damaged store (shards, no manifest)."""
    foreign = tmp_path / "thesis"
    (foreign / "experiments").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "experiments" / "results.csv").write_text("1,2,3")
    (foreign / "manifest.json").write_text(json.dumps({"name": "a web app", "icons": []}))  # not a store's
    for overwrite in (False, True):
        with pytest.raises(CheckpointError) as refused:
            harvest(*ht_pair, corpus, cfg(), foreign, progress=False, overwrite=overwrite)
        assert "overwrite=True" not in str(refused.value)
    (foreign / "manifest.json").unlink()
    for overwrite in (False, True):
        with pytest.raises(ForeignOutputError, match=r"is not empty \(experiments, thesis\.tex\) and is no activation "
                                                     r"store \(no manifest\.json, no shards\): refusing to harvest "
                                                     r"into a foreign folder.*Choose an empty or new out_dir\.$") as refused:
            harvest(*ht_pair, corpus, cfg(), foreign, progress=False, overwrite=overwrite)
        assert ("even with overwrite" in str(refused.value)) == overwrite and "overwrite=True" not in str(refused.value)
    assert sorted(p.relative_to(foreign).as_posix() for p in foreign.rglob("*") if p.name != ".mneme.lock") == [
        "experiments", "experiments/results.csv", "thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "years of work"

    # A store holding a note of its owner's, a sharded harvest's leftovers and a killed writer's temporary:
    # overwrite replaces the store, every file of the old one goes (it had more shards), the note stays.
    path = tmp_path / "store"
    old = harvest(*ht_pair, corpus, cfg(rows_per_shard=40), path, progress=False)
    leftovers = ["manifest.rank001.json", "g01_rank000_shard_00000.safetensors", "rank002_shard_00003.safetensors",
                 ".shard_00009.4194303.0a1b2c3d.tmp.safetensors", ".manifest.4194303.0a1b2c3d.tmp.json"]
    for name in leftovers:
        (path / name).write_text("old")
    (path / "notes.txt").write_text("mine")
    (path / "plots").mkdir()
    from mneme_plugin.activations.harvest import is_store_file

    assert all(is_store_file(path / name) for name in leftovers) and not is_store_file(path / "notes.txt")
    new = harvest(*ht_pair, corpus, cfg(), path, progress=False, overwrite=True)
    assert new.complete and new.num_shards < old.num_shards
    assert sorted(p.name for p in path.iterdir() if p.name != ".mneme.lock") == sorted(
        ["manifest.json", "notes.txt", "plots", *(s["file"] for s in new.manifest["shards"])])
    assert (path / "notes.txt").read_text() == "mine"

    # A damaged store (its manifest lost): overwrite=True is the remedy named, and it harvests again.
    (path / "manifest.json").unlink()
    with pytest.raises(ForeignOutputError, match=r"holds activation store files but no readable manifest\.json: a "
                                                 r"damaged store.*pass overwrite=True"):
        harvest(*ht_pair, corpus, cfg(), path, progress=False)
    assert harvest(*ht_pair, corpus, cfg(), path, progress=False, overwrite=True).complete
    assert (path / "notes.txt").read_text() == "mine"


def test_a_store_belongs_to_its_corpus(ht_pair, corpus, tmp_path):
    """Issue 11 item 2: another corpus is refused on reuse and on resume, naming both."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n".join(corpus) + "\n")
    second.write_text("\n".join(reversed(corpus)) + "\n")
    path = tmp_path / "s"
    store = harvest(*ht_pair, first, cfg(), path, progress=False)
    assert store.manifest["corpus"] == str(first) and store.manifest["corpus_fingerprint"].startswith("file:")
    with pytest.raises(ForeignOutputError, match=rf"complete activation store harvested from corpus {first} .*now {second}"):
        harvest(*ht_pair, second, cfg(), path, progress=False)
    moved = tmp_path / "moved.txt"  # the same content elsewhere is the same corpus
    moved.write_bytes(first.read_bytes())
    assert harvest(*ht_pair, moved, cfg(), path, progress=False).complete

    def stop(i: int) -> None:
        raise Boom("killed")

    with pytest.raises(Boom):
        harvest(*ht_pair, first, cfg(), tmp_path / "cut", progress=False, on_shard=stop)
    with pytest.raises(ForeignOutputError, match=r"partial activation store .* give the original corpus to resume"):
        harvest(*ht_pair, second, cfg(), tmp_path / "cut", progress=False)
    assert ActivationStore(tmp_path / "cut").num_shards == 1  # nothing of the second corpus was mixed in
    resumed = harvest(*ht_pair, first, cfg(), tmp_path / "cut", progress=False)
    assert resumed.manifest["shards"] == store.manifest["shards"]
    other = harvest(*ht_pair, second, cfg(), path, progress=False, overwrite=True)
    assert other.manifest["corpus"] == str(second)


def test_the_harvest_bar_ends_at_its_total(ht_pair, corpus, tmp_path, capsys):
    """The bar counts whole windows: its total is max_tokens rounded up to whole windows (it was
    max_tokens, which the count overshot), and a resumed harvest starts where it stopped."""
    from tests.helpers import last_progress

    config = cfg(max_tokens=300)  # 19 windows of 16 tokens: 304
    harvest(*ht_pair, corpus, config, tmp_path / "s", progress=True)
    assert last_progress(capsys.readouterr().err, "harvest") == (304, 304)

    def stop(i: int) -> None:
        if i == 0:
            raise Boom("killed")

    with pytest.raises(Boom):
        harvest(*ht_pair, corpus, config.replace(rows_per_shard=50), tmp_path / "cut", progress=False, on_shard=stop)
    capsys.readouterr()
    harvest(*ht_pair, corpus, config.replace(rows_per_shard=50), tmp_path / "cut", progress=True)
    assert last_progress(capsys.readouterr().err, "harvest") == (304, 304)


def test_a_resumed_sharded_harvest_bar_ends_at_its_total(ht_pair, corpus, tmp_path, capsys):
    """The sharded harvest's bar (rank 0's) counts the batches done before a kill too."""
    from mneme_plugin.activations.harvest import HarvestContext
    from mneme_plugin.activations.sharded import harvest_sharded
    from mneme_plugin.distributed import SINGLE_PROCESS
    from tests.helpers import last_progress

    config = cfg(max_tokens=300, rows_per_shard=50)
    ctx = HarvestContext.build(*ht_pair, config)

    def stop(i: int) -> None:
        if i == 1:
            raise Boom("killed")

    with pytest.raises(Boom):
        harvest_sharded(ctx, corpus, config, tmp_path / "s", SINGLE_PROCESS, progress=False, on_shard=stop)
    store = harvest_sharded(ctx, corpus, config, tmp_path / "s", SINGLE_PROCESS, progress=True)
    assert store.complete
    assert last_progress(capsys.readouterr().err, "harvest (rank 0/1)") == (304, 304)


def test_a_store_larger_than_the_free_disk_is_refused_before_the_models_run(ht_pair, corpus, tmp_path):
    """A budget whose store cannot fit the disk of out_dir stopped with a full disk, hours in; it is refused at
    once, with what to change (nothing written)."""
    import shutil

    from mneme_plugin.errors import DiskSpaceError

    config = cfg(max_tokens=10**13)  # 2 x 32 floats a token: 2.5 PiB
    assert config.token_budget * 2 * 32 * 4 > shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskSpaceError, match=r"The activation store \(10,000,000,000,000 tokens x 2 models x d_model 32, "
                                             r"float32\) needs ~.* PiB more in .*train while harvesting"):
        harvest(*ht_pair, corpus, config, tmp_path / "big", progress=False)
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_a_store_knows_its_local_models_by_folder_not_by_how_the_path_was_spelt(llama_dir, tiny_tokenizer, corpus,
                                                                                 tmp_path, monkeypatch):
    """Harvested from `base` and `edited` (relative) in one directory: another directory's `base` (another model)
    is refused, not taken for it ("already complete"); the same folders spelt absolute are the same models."""
    import shutil

    from tests.helpers import save_tiny_llama

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(llama_dir, first / "base")
    save_tiny_llama(first / "edited", tiny_tokenizer, n_layers=2, hidden_size=32, seed=3)
    shutil.copytree(first / "edited", second / "edited")
    save_tiny_llama(second / "base", tiny_tokenizer, n_layers=2, hidden_size=32, seed=5)  # another model
    store = tmp_path / "store"
    monkeypatch.chdir(first)
    harvest("base", "edited", corpus, cfg(), store, progress=False)
    assert ActivationStore(store).manifest["base_model"] == str(first / "base")
    assert harvest(str(first / "base"), str(first / "edited"), corpus, cfg(), store, progress=False).complete
    monkeypatch.chdir(second)
    with pytest.raises(ForeignOutputError, match=r"base_model: stored .*first/base.* vs now .*second/base"):
        harvest("base", "edited", corpus, cfg(), store, progress=False)


def test_a_resume_with_other_weights_in_the_same_folder_is_refused(llama_dir, tiny_tokenizer, corpus, tmp_path):
    """The store recorded the models by folder only: an interrupted harvest resumed after the edited model was
    saved again (another fine-tune, same folder) mixed two models' rows in one store. Each model's weights
    fingerprint (its folder's file metadata, no weight read) is recorded and a change refused; a store written
    before the fingerprints existed resumes unchecked, and the same weights resume as before."""
    import shutil

    from tests.helpers import save_tiny_llama

    base, edited = tmp_path / "base", tmp_path / "edited"
    shutil.copytree(llama_dir, base)
    save_tiny_llama(edited, tiny_tokenizer, n_layers=2, hidden_size=32, seed=3)
    config = cfg(max_tokens=800, rows_per_shard=200)

    def stop(i: int) -> None:
        raise Boom("killed")

    full = harvest(str(base), str(edited), corpus, config, tmp_path / "full", progress=False)
    with pytest.raises(Boom):
        harvest(str(base), str(edited), corpus, config, tmp_path / "cut", progress=False, on_shard=stop)
    # The same weights (loading them again writes nothing in their folders): resumed to the same rows.
    resumed = harvest(str(base), str(edited), corpus, config, tmp_path / "cut", progress=False)
    assert resumed.complete and torch.equal(resumed.all_activations(), full.all_activations())

    with pytest.raises(Boom):
        harvest(str(base), str(edited), corpus, config, tmp_path / "cut2", progress=False, on_shard=stop)
    save_tiny_llama(edited, tiny_tokenizer, n_layers=2, hidden_size=32, seed=5)  # other weights, same folder
    with pytest.raises(ForeignOutputError, match=rf"partial activation store harvested from other weights of the same "
                                                 rf"models: the files of edited model {edited} \(weights fingerprint "
                                                 r"\w+ then, \w+ now\) changed since.*pass overwrite=True"):
        harvest(str(base), str(edited), corpus, config, tmp_path / "cut2", progress=False)
    assert ActivationStore(tmp_path / "cut2").num_shards == 1  # nothing of the new weights mixed in
    with pytest.raises(ForeignOutputError, match=r"complete activation store harvested from other weights"):
        harvest(str(base), str(edited), corpus, config, tmp_path / "full", progress=False)

    # A partial store of a version that recorded no fingerprint: resumed, unchecked.
    manifest = json.loads((tmp_path / "cut2" / "manifest.json").read_text())
    del manifest["model_weights"]
    (tmp_path / "cut2" / "manifest.json").write_text(json.dumps(manifest))
    assert harvest(str(base), str(edited), corpus, config, tmp_path / "cut2", progress=False).complete

    recorded = full.manifest["model_weights"]
    assert set(recorded) == {"base", "edited"} and all(isinstance(v, str) for v in recorded.values())
    again = harvest(str(base), str(edited), corpus, config, tmp_path / "cut3", progress=False)
    assert again.manifest["model_weights"]["base"] == recorded["base"]  # the folder left as it was
    assert again.manifest["model_weights"]["edited"] != recorded["edited"]
