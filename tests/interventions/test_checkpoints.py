"""Checkpoints of the interventions' training (RMU, SFT full and LoRA): an interrupted run resumes to
the uninterrupted run's weights; another config is refused; a half-written checkpoint is never read."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from safetensors.torch import load_file

from mneme_plugin.checkpoints import CHECKPOINT_DIR, STATE_FILE, checkpoint_dirs, latest_checkpoint, write_checkpoint
from mneme_plugin.errors import CheckpointError, ConfigError, OutputLockedError
from mneme_plugin.interventions.checkpoints import CHECKPOINT_INFO, train_and_save, unfinished
from mneme_plugin.interventions.hf_models import load_causal_lm, load_training_log
from mneme_plugin.interventions.hf_rmu import HFRMUConfig, rmu_unlearn_hf
from mneme_plugin.interventions.sft import LoRASettings, SFTConfig, supervised_fine_tune
from mneme_plugin.interventions.step import InterventionConfig, run_intervention
from tests.helpers import synthetic_corpus, tiny_rmu_config, write_jsonl


class Killed(RuntimeError):
    """Stands for the process being killed after a step."""


def crash_at(step_to_crash: int):
    def on_step(step, record):
        if step == step_to_crash:
            raise Killed(f"killed at step {step}")

    return on_step


def rmu_config(model_dir, rmu_corpora, **kw) -> HFRMUConfig:
    return tiny_rmu_config(model_dir, rmu_corpora, **{"batch_size": 4, "max_num_batches": 8, "checkpoint_every": 3, **kw})


def chat_data(folder, n=20):
    texts = synthetic_corpus(2 * n, seed=5)
    return write_jsonl(folder / "chat.jsonl", [{"messages": [{"role": "user", "content": texts[2 * i]},
                                                            {"role": "assistant", "content": texts[2 * i + 1]}]}
                                               for i in range(n)])


def sft_config(model_dir, data, **kw) -> SFTConfig:
    # 20 examples, 4 per batch, 2 batches per step: 3 steps per epoch, 9 in all; shuffled each epoch.
    opts = dict(model=str(model_dir), data=str(data), epochs=3, lr=1e-2, batch_size=4, grad_accum=2,
                lr_scheduler="linear", warmup_steps=2, weight_decay=0.01, checkpoint_every=2, device="cpu")
    opts.update(kw)
    return SFTConfig(**opts)


@contextlib.contextmanager
def captured_info(caplog):
    """INFO records of the package's logger (a CLI test run before stops its propagation to caplog's root handler)."""
    logger = logging.getLogger("mneme_plugin")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="mneme_plugin"):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_rmu_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tiny_lm_dirs, rmu_corpora, tmp_path,
                                                                               caplog):
    cfg = rmu_config(tiny_lm_dirs["llama"], rmu_corpora)
    reference = rmu_unlearn_hf(cfg, progress=False)
    out = tmp_path / "rmu"
    with pytest.raises(Killed):
        rmu_unlearn_hf(cfg, progress=False, out_dir=out, on_step=crash_at(7))
    # Checkpoints after steps 3 and 6; the newest is kept, and the folder is not a model.
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000006"] and unfinished(out)
    state = torch.load(latest_checkpoint(out) / STATE_FILE, weights_only=True)
    assert sorted(state["parameters"]) == [f"model.layers.{l}.mlp.down_proj.weight" for l in range(3)]
    assert state["step"] == 6 and len(state["log"]) == 6
    with pytest.raises(ConfigError, match="unfinished intervention"):
        load_causal_lm(str(out), "cpu")

    steps = []
    with captured_info(caplog):
        resumed = rmu_unlearn_hf(cfg, progress=False, out_dir=out, on_step=lambda s, r: steps.append(s))
    assert steps == [6, 7]
    assert "RMU: resumed from" in caplog.text and "at step 6 of 8" in caplog.text
    assert_same_weights(reference.model, resumed.model)
    assert resumed.log == reference.log  # the log of the steps before the checkpoint came back with it


@pytest.mark.parametrize("lora", [None, LoRASettings(r=2, alpha=4, dropout=0.2, target_modules=["q_proj", "down_proj"])],
                         ids=["full", "lora"])
def test_sft_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(lora, tiny_lm_dirs, tmp_path, caplog):
    # LoRA with dropout: the resumed run must also draw the uninterrupted run's dropout masks (RNG state).
    cfg = sft_config(tiny_lm_dirs["qwen2"], chat_data(tmp_path), lora=lora)
    reference = supervised_fine_tune(cfg, progress=False)
    out = tmp_path / "sft"
    with pytest.raises(Killed):  # in the third epoch, after the checkpoint at step 6
        supervised_fine_tune(cfg, progress=False, out_dir=out, on_step=crash_at(7))
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000006"]
    saved = torch.load(latest_checkpoint(out) / STATE_FILE, weights_only=True)["parameters"]
    if lora is None:
        assert len(saved) == len(list(reference.model.parameters()))  # full fine-tuning: every parameter
    else:  # the adapters only
        assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    steps = []
    with captured_info(caplog):
        resumed = supervised_fine_tune(cfg, progress=False, out_dir=out, on_step=lambda s, r: steps.append(s))
    assert steps == [6, 7, 8] and "SFT: resumed from" in caplog.text and "at step 6 of 9" in caplog.text
    assert_same_weights(reference.model, resumed.model)
    assert resumed.log == reference.log


def test_a_checkpoint_of_another_config_or_changed_data_is_refused(tiny_lm_dirs, tmp_path):
    data = chat_data(tmp_path)
    cfg = sft_config(tiny_lm_dirs["llama"], data, epochs=1)
    out = tmp_path / "sft"
    with pytest.raises(Killed):
        supervised_fine_tune(cfg, progress=False, out_dir=out, on_step=crash_at(2))
    with pytest.raises(ConfigError, match=r"another config.*config\.lr: stored 0\.01 vs now 0\.02.*--no-resume"):
        supervised_fine_tune(cfg.replace(lr=2e-2), progress=False, out_dir=out)
    # How often it checkpoints does not change the run: resumed.
    steps = []
    with pytest.raises(Killed):
        supervised_fine_tune(cfg.replace(checkpoint_every=5), progress=False, out_dir=out,
                             on_step=lambda s, r: (steps.append(s), crash_at(2)(s, r)))
    assert steps == [2]
    # The data file rewritten in place: its checkpoint was made on other examples.
    data.write_text(data.read_text().replace("the", "a"))
    with pytest.raises(ConfigError, match=rf"other inputs.*inputs\.{data}.*delete {out / CHECKPOINT_DIR}"):
        supervised_fine_tune(cfg, progress=False, out_dir=out)
    # resume=False starts over (the old checkpoints go).
    steps.clear()
    supervised_fine_tune(cfg, progress=False, out_dir=out, resume=False, on_step=lambda s, r: steps.append(s))
    assert steps == [0, 1, 2] and [p.name for p in checkpoint_dirs(out)] == ["step_00000002"]


def test_a_half_written_checkpoint_is_never_read(tiny_lm_dirs, rmu_corpora, tmp_path):
    cfg = rmu_config(tiny_lm_dirs["llama"], rmu_corpora)
    out = tmp_path / "rmu"
    with pytest.raises(Killed):
        rmu_unlearn_hf(cfg, progress=False, out_dir=out, on_step=crash_at(4))
    good = latest_checkpoint(out)
    assert good.name == "step_00000003"

    def half_then_fail(tmp):
        (tmp / STATE_FILE).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):  # a write that fails leaves no checkpoint, nor its temporary
        write_checkpoint(out, 6, half_then_fail, keep=1)
    # A writer killed part-way (SIGKILL) leaves its hidden temporary folder: never taken for a checkpoint.
    killed = out / CHECKPOINT_DIR / ".step_00000006.999999999.0badc0de.tmp"
    killed.mkdir()
    (killed / STATE_FILE).write_bytes(b"PK\x03\x04 half a zip")
    assert latest_checkpoint(out) == good
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == [killed.name, good.name]
    steps = []
    with pytest.raises(Killed):
        rmu_unlearn_hf(cfg, progress=False, out_dir=out, on_step=lambda s, r: (steps.append(s), crash_at(7)(s, r)))
    assert steps == [3, 4, 5, 6, 7]
    # The next write removed the dead writer's temporary and the older checkpoint.
    assert [p.name for p in (out / CHECKPOINT_DIR).iterdir()] == ["step_00000006"]
    # A checkpoint damaged after it was written (disk) is refused with what to do, not half-read.
    newest = latest_checkpoint(out)
    (newest / STATE_FILE).write_bytes((newest / STATE_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE} could not be read.*delete {newest}.*--no-resume"):
        rmu_unlearn_hf(cfg, progress=False, out_dir=out)


def test_the_finished_model_folder_is_written_over_the_checkpoints(tiny_lm_dirs, rmu_corpora, tmp_path):
    cfg = rmu_config(tiny_lm_dirs["qwen2"], rmu_corpora, max_num_batches=6)
    out = tmp_path / "edited_model"
    with pytest.raises(Killed):
        rmu_unlearn_hf(cfg, progress=False, out_dir=out, on_step=crash_at(4))
    assert unfinished(out)
    # The intervention stage of `mneme run` resumes it and writes the model in one rename.
    section = InterventionConfig(kind="rmu", settings={k: v for k, v in cfg.to_dict().items() if k != "model"})
    assert run_intervention(section, cfg.model, out, progress=False) == out
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", CHECKPOINT_DIR))) == []
    assert [r["step"] for r in load_training_log(out)] == list(range(6))
    reference = rmu_unlearn_hf(cfg, progress=False)
    after = load_file(str(out / "model.safetensors"))
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(after[name], tensor), name
    # A finished folder is not trained into again without overwrite.
    with pytest.raises(ConfigError, match="already exists"):
        train_and_save(rmu_unlearn_hf, cfg, out)
    assert not (out / CHECKPOINT_INFO).exists()
    # With overwrite, killed part-way: the old model went when the new training started (it stayed, looking
    # finished, beside the new checkpoints: loaded as the edited model, and a rerun refused as "already exists").
    def killed_at_4(config, **kwargs):  # after its checkpoint at step 3
        return rmu_unlearn_hf(config, on_step=crash_at(4), **kwargs)

    with pytest.raises(Killed):
        train_and_save(killed_at_4, cfg, out, overwrite=True, progress=False)
    assert unfinished(out) and not (out / "model.safetensors").exists()
    assert train_and_save(rmu_unlearn_hf, cfg, out, progress=False) == out  # resumed without --overwrite
    after = load_file(str(out / "model.safetensors"))
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(after[name], tensor), name


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        HFRMUConfig(checkpoint_every=-1)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        SFTConfig(checkpoint_every=-1)
    # Not part of what the edit computes: `mneme run` fingerprints stay as they were.
    assert "checkpoint_every" not in HFRMUConfig().result_dict() and "checkpoint_every" not in SFTConfig().result_dict()


def test_a_second_job_on_the_output_folder_fails_at_once(held_lock, tiny_lm_dirs, tmp_path):
    folder, _ = held_lock
    with pytest.raises(OutputLockedError, match="in use by another mneme process"):
        supervised_fine_tune(sft_config(tiny_lm_dirs["llama"], chat_data(tmp_path)), progress=False, out_dir=folder)
    assert not (folder / CHECKPOINT_DIR).exists()


def test_a_checkpoint_of_a_hub_model_whose_cached_commit_moved_is_refused(tiny_lm_dirs, tmp_path, hub_cache):
    """A hub model is pinned by the commit the local hub cache resolves it to: a checkpoint made on one
    commit is not resumed on the weights of the next one downloaded into the cache."""
    from tests.helpers import hub_cache_repo

    hub_cache_repo(hub_cache, "someone/tiny", tiny_lm_dirs["llama"], commit="a" * 40)
    cfg = sft_config("someone/tiny", chat_data(tmp_path), epochs=1)
    out = tmp_path / "sft"
    with pytest.raises(Killed):
        supervised_fine_tune(cfg, progress=False, out_dir=out, on_step=crash_at(2))
    hub_cache_repo(hub_cache, "someone/tiny", tiny_lm_dirs["llama"], commit="b" * 40)
    with pytest.raises(ConfigError, match=r"other inputs.*inputs\.someone/tiny: stored 'hub commit a{40}' vs now "
                                          r"'hub commit b{40}'"):
        supervised_fine_tune(cfg, progress=False, out_dir=out)


def test_a_run_whose_checkpoints_and_edited_model_cannot_fit_is_refused_before_it_trains(tiny_lm_dirs, rmu_corpora,
                                                                                         tmp_path):
    """Full fine-tuning of a 7B checkpoints ~38 GiB (weights and AdamW's moments), the newest kept while the next
    is written, then writes the model: a disk too small stopped the run at its first checkpoint. A run whose
    parameters (meta tensors: 10^13 of them, never allocated) cannot fit is refused before its optimizer is
    touched; a small one trains (the tests above)."""
    from mneme_plugin.errors import DiskSpaceError
    from mneme_plugin.interventions.checkpoints import TrainingCheckpoints

    out = tmp_path / "rmu"
    checkpoints = TrainingCheckpoints(out, rmu_config(tiny_lm_dirs["llama"], rmu_corpora), [], every=3, label="RMU")
    huge = {"model.layers.0.mlp.down_proj.weight": torch.empty(10**13, device="meta")}
    with pytest.raises(DiskSpaceError, match=r"The RMU run \(checkpoints of 109.1 TiB, two at once while one is "
                                             r"written\) needs ~.* more in .*rmu"):  # no model counted
        checkpoints.restore(huge, optimizer=None, total_steps=8, device=torch.device("cpu"))
    # Without a checkpoint written (too few steps), only the model is counted.
    checkpoints.restore(huge, optimizer=None, total_steps=3, device=torch.device("cpu"))
    with pytest.raises(DiskSpaceError, match="then the edited model of 36.4 TiB"):
        checkpoints.restore({}, optimizer=None, total_steps=3, device=torch.device("cpu"), model_bytes=4 * 10**13)
