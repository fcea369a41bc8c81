"""The training loop: quality on real tiny-model activations, checkpoints, exact resume."""

import json
import shutil

import pytest
import torch

from mneme_plugin import ActivationStore, CrossCoderConfig, HarvestConfig, TrainingConfig, harvest, train
from mneme_plugin.crosscoder import BatchTopKCrossCoder
from mneme_plugin.crosscoder.training import latest_checkpoint
from mneme_plugin.errors import CheckpointError, ConfigError, ForeignOutputError, NonFiniteActivationError
from tests.helpers import synthetic_corpus


@pytest.fixture(scope="module")
def tiny_store(ht_pair, tmp_path_factory) -> ActivationStore:
    base, edited = ht_pair
    config = HarvestConfig(layer=1, context_length=32, rows_per_shard=2048)
    return harvest(base, edited, synthetic_corpus(400, seed=0), config, tmp_path_factory.mktemp("store"), progress=False)


def _small_training(**overrides) -> TrainingConfig:
    values = dict(steps=60, batch_size=128, lr=3e-3, warmup_steps=5, threshold_start_step=10,
                  checkpoint_every=20, eval_rows=512, dead_after_tokens=2000)
    values.update(overrides)
    return TrainingConfig(**values)


def test_crosscoder_explains_tiny_model_activations(tiny_store, tmp_path):
    result = train(
        tiny_store, tmp_path / "run", CrossCoderConfig(expansion_factor=8, k=16),
        _small_training(steps=1500, batch_size=256, warmup_steps=20, threshold_start_step=100,
                        checkpoint_every=0, eval_rows=2048, dead_after_tokens=200_000),
        progress=False,
    )
    metrics = result.metrics
    assert metrics.explained_variance_base > 0.9 and metrics.explained_variance_edited > 0.9, metrics
    assert 8 < metrics.l0 < 32  # threshold inference keeps about k latents per token
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == metrics.to_dict()
    loaded = BatchTopKCrossCoder.from_pretrained(result.crosscoder_dir)
    x = tiny_store.all_activations(max_rows=256)
    assert torch.equal(loaded.encode(x), result.crosscoder.encode(x))
    assert loaded.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(loaded.activation_scale, tiny_store.scale_factors.float())


def test_interrupted_run_resumes_to_the_same_weights(tiny_store, tmp_path):
    cc = CrossCoderConfig(expansion_factor=4, k=8)
    reference = train(tiny_store, tmp_path / "a", cc, _small_training(), progress=False).crosscoder

    class Crash(RuntimeError):
        pass

    def crash_at_45(step, trainer):
        if step == 45:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_store, tmp_path / "b", cc, _small_training(), progress=False, on_step=crash_at_45)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000040"
    assert not (tmp_path / "b" / "crosscoder").exists()
    # The newest checkpoint's weights damaged (disk): refused with what to do, as a damaged trainer state is.
    weights = latest_checkpoint(tmp_path / "b") / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file.*Delete the checkpoint .*step_00000040 "
                                              r"to resume from an older one, or start over with --no-resume"):
        train(tiny_store, tmp_path / "b", cc, _small_training(), progress=False)
    weights.write_bytes(intact)

    resumed = train(tiny_store, tmp_path / "b", cc, _small_training(), progress=False).crosscoder
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert resumed.threshold > 0


def test_a_finished_run_removes_its_checkpoints_even_after_a_kill_before_they_went(tiny_store, tmp_path):
    """The checkpoints serve resuming only (3x the crosscoder's bytes each, 24 GiB at a recipe's size): they
    go once the crosscoder is written; a run killed between the two removes them when it is resumed."""
    cc, training = CrossCoderConfig(expansion_factor=4, k=8), _small_training(steps=41)
    kept = train(tiny_store, tmp_path / "kept", cc, training.replace(keep_finished_checkpoints=True), progress=False)
    assert [p.name for p in sorted((tmp_path / "kept" / "checkpoints").iterdir())] == ["step_00000020", "step_00000040"]
    done = train(tiny_store, tmp_path / "run", cc, training, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["crosscoder", "metrics.json", "train_config.json"]
    for name, tensor in kept.crosscoder.state_dict().items():  # the setting changes nothing else
        assert torch.equal(tensor, done.crosscoder.state_dict()[name]), name

    # Killed after the crosscoder and metrics were written, before the checkpoints went: put them back.
    shutil.copytree(tmp_path / "kept" / "checkpoints", tmp_path / "run" / "checkpoints")
    again = train(tiny_store, tmp_path / "run", cc, training, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert torch.equal(again.crosscoder.W_dec, done.crosscoder.W_dec)


def test_the_finished_crosscoder_and_metrics_are_fsynced_before_the_checkpoints_go(tiny_store, tmp_path,
                                                                                   monkeypatch):
    """The finished crosscoder and metrics.json were written without fsync just before the (fsynced)
    checkpoints that could redo them were deleted: a power cut could leave neither. Both are fsynced now."""
    import os

    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    train(tiny_store, tmp_path / "run", CrossCoderConfig(expansion_factor=2, k=4), _small_training(steps=21),
          progress=False)
    final = {os.path.basename(path) for path in synced if "/checkpoints/" not in path and "step_" not in path}
    assert not (tmp_path / "run" / "checkpoints").exists()
    written = {p.name for p in (tmp_path / "run" / "crosscoder").iterdir()}
    assert written <= final and any(name.startswith(".metrics.") for name in final), sorted(final)


def test_finished_run_is_loaded_and_a_changed_config_refused(tiny_store, tmp_path, monkeypatch):
    cc = CrossCoderConfig(expansion_factor=2, k=4)
    first = train(tiny_store, tmp_path / "run", cc, _small_training(steps=20), progress=False)
    calls = []
    again = train(tiny_store, tmp_path / "run", cc, _small_training(steps=20), progress=False,
                  on_step=lambda step, trainer: calls.append(step))
    assert calls == [] and torch.equal(again.crosscoder.W_dec, first.crosscoder.W_dec)
    # The same store spelt another way (a relative path from its parent) is the same store: loaded, not refused.
    monkeypatch.chdir(tiny_store.path.parent)
    relative = train(tiny_store.path.name, tmp_path / "run", cc, _small_training(steps=20), progress=False,
                     on_step=lambda step, trainer: calls.append(step))
    assert calls == [] and torch.equal(relative.crosscoder.W_dec, first.crosscoder.W_dec)
    refusal = r"another config .*training\.steps: stored 20 vs now 30.*--no-resume"
    with pytest.raises(ConfigError, match=refusal) as refused:
        train(tiny_store, tmp_path / "run", cc, _small_training(steps=30), progress=False)
    # Its own type, naming the folder (`mneme run` adds its remedy by this type).
    assert isinstance(refused.value, ForeignOutputError) and refused.value.folder == tmp_path / "run"
    # A start that saved no step (e.g. it failed on its device) pins nothing: another config trains there.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "train_config.json").write_text((tmp_path / "run" / "train_config.json").read_text())
    assert train(tiny_store, failed, cc, _small_training(steps=30), progress=False).metrics.n_tokens > 0
    assert json.loads((failed / "train_config.json").read_text())["training"]["steps"] == 30
    # A damaged or missing train_config.json beside a finished run pinned nothing: another config was loaded as
    # the finished one and the file rewritten. Refused, naming the file (it is written atomically).
    config_file = tmp_path / "run" / "train_config.json"
    kept_config = config_file.read_text()
    for damage, message in ((lambda: config_file.write_text(kept_config[:100]), "is unreadable \\(not JSON\\)"),
                            (lambda: config_file.write_text("[1, 2]"), "is unreadable \\(not a JSON object\\)"),
                            (config_file.unlink, "holds checkpoints or a crosscoder but no train_config.json")):
        damage()
        with pytest.raises(CheckpointError, match=message + ".*--no-resume"):
            train(tiny_store, tmp_path / "run", cc, _small_training(steps=30), progress=False)
    config_file.write_text(kept_config)
    # resume=False starts over in the same directory
    fresh = train(tiny_store, tmp_path / "run", cc, _small_training(steps=30), resume=False, progress=False)
    assert fresh.metrics.n_tokens > 0


def test_a_checkpoint_of_a_store_harvested_again_is_not_resumed(ht_pair, tmp_path):
    """Training killed after a checkpoint; the store is harvested again into its folder (--overwrite,
    float32 now): the checkpoint was made on other rows and the same metadata, so resuming would mix them."""
    base, edited = ht_pair
    config = HarvestConfig(layer=1, context_length=32, rows_per_shard=2048)
    store = tmp_path / "store"
    harvest(base, edited, synthetic_corpus(400, seed=0), config, store, progress=False)
    cc = CrossCoderConfig(expansion_factor=2, k=4)

    def crash_at_25(step, trainer):
        if step == 25:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(store, tmp_path / "run", cc, _small_training(), progress=False, on_step=crash_at_25)
    harvest(base, edited, synthetic_corpus(400, seed=0), config.replace(dtype="float32"), store, overwrite=True,
            progress=False)
    with pytest.raises(ForeignOutputError, match=r"other activations .*harvested again.*--no-resume") as refused:
        train(store, tmp_path / "run", cc, _small_training(), progress=False)
    assert isinstance(refused.value, ConfigError) and refused.value.folder == tmp_path / "run"
    assert train(store, tmp_path / "run", cc, _small_training(), resume=False, progress=False).metrics.n_tokens > 0
    # The same store again: the finished run is loaded, as before.
    calls = []
    train(store, tmp_path / "run", cc, _small_training(), progress=False, on_step=lambda s, t: calls.append(s))
    assert calls == []


def test_non_finite_batches_and_short_streams_are_refused(tmp_path):
    good = [torch.randn(32, 2, 8) for _ in range(3)]
    bad = good[:2] + [torch.full((32, 2, 8), float("nan"))]
    cc = CrossCoderConfig(activation_dim=8, dict_size=32, k=2)
    with pytest.raises(NonFiniteActivationError, match="step 2"):
        train(bad, tmp_path / "nan", cc, _small_training(steps=5, batch_size=32), progress=False)
    with pytest.raises(ConfigError, match="ended after 3 batches"):
        train(good, tmp_path / "short", cc, _small_training(steps=5, batch_size=32), progress=False)


def test_training_from_a_harvest_stream(ht_pair, tmp_path):
    from mneme_plugin import harvest_stream

    base, edited = ht_pair
    stream = harvest_stream(base, edited, synthetic_corpus(1200, seed=1), HarvestConfig(layer=1, context_length=32),
                            batch_size=128, shuffle_buffer_rows=1024, seed=0)
    result = train(stream, tmp_path / "run", CrossCoderConfig(expansion_factor=4, k=8),
                   _small_training(steps=100, checkpoint_every=0, eval_rows=256, threshold_beta=0.9), progress=False)
    assert result.crosscoder.cfg.metadata == {"data": "stream"}
    torch.testing.assert_close(result.crosscoder.activation_scale, stream.scale_factors.float())
    assert 0 < result.metrics.n_tokens <= 256 and result.metrics.explained_variance_base > 0.3


def test_a_streamed_training_resumes_only_on_the_stream_it_was_trained_on(ht_pair, tmp_path):
    """A harvest stream's batches depend on its forward batch size (harvest.batch_size: the shuffle buffer fills a
    forward batch at a time), a runtime field for a store: a streamed training killed and resumed with another one
    was accepted, and ended other than the uninterrupted run. Runs recorded before streams were named resume."""
    from mneme_plugin import harvest_stream

    base, edited = ht_pair
    corpus = synthetic_corpus(400, seed=1)

    def stream(forward_batch):
        return harvest_stream(base, edited, corpus, HarvestConfig(layer=1, context_length=32, batch_size=forward_batch),
                              batch_size=64, shuffle_buffer_rows=512, seed=0)

    cc, training = CrossCoderConfig(expansion_factor=2, k=4), _small_training(steps=30, batch_size=64, eval_rows=0,
                                                                             checkpoint_every=10)

    def crash_at_15(step, trainer):
        if step == 15:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(stream(8), tmp_path / "run", cc, training, progress=False, on_step=crash_at_15)
    with pytest.raises(ForeignOutputError, match=r"other activations .*harvest.batch_size.*--no-resume"):
        train(stream(4), tmp_path / "run", cc, training, progress=False)
    record = tmp_path / "run" / "train_config.json"
    recorded = json.loads(record.read_text())
    # Another device is no other stream; the same forward batch size resumes.
    device_only = harvest_stream(base, edited, corpus, HarvestConfig(layer=1, context_length=32, batch_size=8,
                                                                     device="cpu:0"), batch_size=64,
                                 shuffle_buffer_rows=512, seed=0)
    assert train(device_only, tmp_path / "run", cc, training, progress=False).metrics is not None
    # A run recorded before streams were named (no "data") is not second-guessed.
    with pytest.raises(RuntimeError, match="killed"):
        train(stream(8), tmp_path / "old", cc, training, progress=False, on_step=crash_at_15)
    del recorded["data"]
    (tmp_path / "old" / "train_config.json").write_text(json.dumps(recorded))
    assert train(stream(4), tmp_path / "old", cc, training, progress=False).metrics is not None


def test_metrics_are_measured_on_rows_held_out_of_training(tiny_store, tmp_path):
    """Issue 11 item 4: the evaluated rows never reach the optimiser, and metrics.json says so."""
    from mneme_plugin.crosscoder.training import _Data

    source = _Data(tiny_store, 128, 0, eval_rows=512)
    held = torch.cat(list(source.held_out_batches()))
    assert 512 <= held.shape[0] < 512 + tiny_store.num_shards
    train_rows = torch.cat([b for b, _ in zip(source.batches(0), range(200))])
    # No held-out row appears among the training rows. Rows are compared by value; vectors that
    # occur more than once in the store (e.g. the first position of every context) are left out.
    from collections import Counter

    counts = Counter(tuple(r.flatten().tolist()) for r in tiny_store.all_activations())
    held_keys = {key for key in (tuple(r.flatten().tolist()) for r in held) if counts[key] == 1}
    assert len(held_keys) > 400
    assert not any(tuple(r.flatten().tolist()) in held_keys for r in train_rows)
    result = train(tiny_store, tmp_path / "run", CrossCoderConfig(expansion_factor=4, k=8),
                   _small_training(steps=30, checkpoint_every=0, eval_rows=512), progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["eval_data"] == "held_out" and saved["n_tokens"] == held.shape[0]
    assert saved["dead_fraction_training"] is not None
    assert result.metrics.n_tokens == held.shape[0]


def test_saved_config_reports_the_expansion_factor_it_was_trained_with(tiny_store, tmp_path):
    result = train(tiny_store, tmp_path / "run", CrossCoderConfig(expansion_factor=4, k=8),
                   _small_training(steps=10, checkpoint_every=0, eval_rows=256), progress=False)
    meta = json.loads((result.crosscoder_dir / "config.json").read_text())
    assert meta["config"]["expansion_factor"] == 4
    assert meta["config"]["dict_size"] == 4 * tiny_store.d_model


def test_schedule_longer_than_the_run_warns_and_defaults_scale_with_it(tiny_store, tmp_path, caplog):
    config = TrainingConfig(steps=40, batch_size=64, warmup_steps=1000, checkpoint_every=0, eval_rows=256)
    assert any("warmup_steps=1000" in w for w in config.schedule_warnings())
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        train(tiny_store, tmp_path / "run", CrossCoderConfig(expansion_factor=2, k=4), config, progress=False)
    assert "warmup_steps=1000 >= steps=40" in caplog.text
    resolved = TrainingConfig(steps=40, batch_size=64).resolve(dict_size=1024)
    assert resolved.warmup_steps == 4 and resolved.threshold_start_step == 20
    assert resolved.dead_after_tokens == 40 * 64 // 10
    # The BatchTopK paper's rate for the dictionary size; a run this short gets four times it (the cap), a
    # long one none, one in between 5000 / steps times it.
    assert resolved.lr == pytest.approx(4 * 2e-4 / (1024 / 2**14) ** 0.5)
    assert TrainingConfig(steps=20_000).resolve(dict_size=1024).lr == pytest.approx(2e-4 / (1024 / 2**14) ** 0.5)
    assert TrainingConfig(steps=2_000).resolve(dict_size=256).lr == pytest.approx(1.6e-3 * 5000 / 2000)
    assert TrainingConfig(steps=4_999).resolve(dict_size=256).lr == pytest.approx(1.6e-3 * 5000 / 4999)
    assert TrainingConfig().schedule_warnings() == []


def test_bf16_autocast_run_trains_saves_and_loads(tiny_store, tmp_path):
    runs = {
        mode: train(tiny_store, tmp_path / mode, CrossCoderConfig(expansion_factor=4, k=16),
                    _small_training(steps=150, autocast=mode, checkpoint_every=0), progress=False)
        for mode in ("off", "bfloat16")
    }
    half, full = runs["bfloat16"], runs["off"]
    # Weights (and Adam) stay float32; only the step's matmuls ran in bf16, so the runs differ a little.
    assert half.crosscoder.W_enc.dtype == torch.float32
    assert not torch.equal(half.crosscoder.W_enc, full.crosscoder.W_enc)
    for side in ("explained_variance_base", "explained_variance_edited"):
        assert getattr(half.metrics, side) > 0.5
        assert abs(getattr(half.metrics, side) - getattr(full.metrics, side)) < 0.05, (half.metrics, full.metrics)
    loaded = BatchTopKCrossCoder.from_pretrained(half.crosscoder_dir)
    x = tiny_store.all_activations(max_rows=256)
    assert torch.equal(loaded.encode(x), half.crosscoder.encode(x))
    assert json.loads((tmp_path / "bfloat16" / "train_config.json").read_text())["training"]["autocast"] == "bfloat16"


def test_autocast_is_validated_and_defaults_to_bf16_on_cuda_only():
    with pytest.raises(ConfigError, match="autocast must be one of"):
        TrainingConfig(autocast="fp8")
    assert TrainingConfig().autocast_dtype("cpu") is None
    assert TrainingConfig(autocast="bfloat16").autocast_dtype("cpu") is torch.bfloat16
    assert TrainingConfig(autocast="off").autocast_dtype("cuda") is None


def test_the_published_decoder_init_norm_leaves_the_stage_fingerprint_of_earlier_runs_alone():
    # Runs made before the field existed started at norm 1 and fingerprint their training section without it.
    assert "decoder_init_norm" not in TrainingConfig().result_dict()
    assert TrainingConfig(decoder_init_norm=2.0).result_dict()["decoder_init_norm"] == 2.0


def test_the_disk_need_is_what_a_run_writes_and_a_run_that_cannot_fit_is_refused_before_it_starts(tiny_store, tmp_path):
    """A recipe's crosscoder (d 4096, 131,072 latents) writes checkpoints of ~24 GiB, three at a time while one
    is written: a disk too small failed at a checkpoint hours in. The estimate is checked against the files a
    run writes, and a run whose need exceeds the free disk is refused before its first step."""
    from mneme_plugin.crosscoder.training import disk_need
    from mneme_plugin.errors import DiskSpaceError

    cc = CrossCoderConfig(expansion_factor=4, k=8)
    # checkpoints at steps 20, 40 and 60; one kept, and kept after the run here, to be measured
    training = _small_training(steps=61, keep_checkpoints=1, keep_finished_checkpoints=True)
    train(tiny_store, tmp_path / "run", cc, training, progress=False)
    resolved = cc.resolve(tiny_store.d_model)
    assert resolved.parameter_count == sum(p.numel() for p in BatchTopKCrossCoder(resolved).parameters())
    checkpoint, at_once, final = disk_need(resolved, training)
    assert at_once == 2 * checkpoint  # the one kept and the next one while it is written
    kept = [f for f in (tmp_path / "run" / "checkpoints").rglob("*") if f.is_file()]
    written = sum(f.stat().st_size for f in (tmp_path / "run" / "crosscoder").rglob("*") if f.is_file())
    assert abs(sum(f.stat().st_size for f in kept) / checkpoint - 1) < 0.05  # the checkpoint kept (plus pickle framing)
    assert abs(written / final - 1) < 0.05

    huge = CrossCoderConfig(dict_size=2**40, k=8)  # petabytes of checkpoints, never allocated
    with pytest.raises(DiskSpaceError, match=r"Training \(.*M parameters; up to 2 checkpoints of .* GiB.*free space there"):
        train(tiny_store, tmp_path / "huge", huge, training, progress=False)
    assert shutil.disk_usage(tmp_path).free < sum(disk_need(huge.resolve(tiny_store.d_model), training)[1:])
    assert not (tmp_path / "huge" / "checkpoints").exists()


_RESUMED_CROSSCODER = CrossCoderConfig(expansion_factor=4, k=8)


def _checkpoint_of_a_crashed_run(store, run_dir):
    """The newest checkpoint of a training that crashed at step 45 (of 60; checkpoints every 20 steps)."""
    def crash_at_45(step, trainer):
        if step == 45:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(store, run_dir, _RESUMED_CROSSCODER, _small_training(), progress=False, on_step=crash_at_45)
    return latest_checkpoint(run_dir)


def _assert_resumes_to_an_uninterrupted_run(store, run_dir, reference_dir):
    resumed = train(store, run_dir, _RESUMED_CROSSCODER, _small_training(), progress=False).crosscoder
    reference = train(store, reference_dir, _RESUMED_CROSSCODER, _small_training(), progress=False).crosscoder
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_checkpoint_holds_the_weights_once_and_one_of_an_earlier_version_still_resumes(tiny_store, tmp_path):
    """The trainer state held the weights a second time beside model.safetensors; it no longer does, and an
    earlier version's checkpoint (whose trainer state has them) resumes to the same weights."""
    from safetensors.torch import load_file

    from mneme_plugin.checkpoints import STATE_FILE

    checkpoint = _checkpoint_of_a_crashed_run(tiny_store, tmp_path / "b")
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert "ae" not in state and set(state) >= {"optimizer", "scheduler", "tokens_since_fired", "steps_done"}
    state["ae"] = load_file(checkpoint / "model.safetensors")  # as an earlier version wrote it
    torch.save(state, checkpoint / STATE_FILE)
    _assert_resumes_to_an_uninterrupted_run(tiny_store, tmp_path / "b", tmp_path / "a")


def test_a_checkpoint_with_the_weight_moments_in_the_earlier_layout_resumes_to_the_same_weights(tiny_store, tmp_path):
    """Earlier versions stored the weights as W_enc (n, d, m) and W_dec (n, m, d), so their checkpoints hold the
    Adam moments in those layouts; they are converted on load (the weights are now stored latent-major)."""
    from mneme_plugin.checkpoints import STATE_FILE

    checkpoint = _checkpoint_of_a_crashed_run(tiny_store, tmp_path / "b")
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state.pop("weight_layout") == "latent_major"
    d = tiny_store.d_model
    # Parameters in registration order: W_enc_by_latent, b_enc, W_dec_by_latent, b_dec; as an earlier version wrote
    # their moments: W_enc (2, d, m), W_dec (2, m, d).
    for index, to_public in ((0, (1, 2, 0)), (2, (1, 0, 2))):
        moments = state["optimizer"]["state"][index]
        assert moments["exp_avg"].shape == (4 * d, 2, d)
        for name in ("exp_avg", "exp_avg_sq"):
            moments[name] = moments[name].permute(to_public).contiguous()
    torch.save(state, checkpoint / STATE_FILE)
    _assert_resumes_to_an_uninterrupted_run(tiny_store, tmp_path / "b", tmp_path / "a")
