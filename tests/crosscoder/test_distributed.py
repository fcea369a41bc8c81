"""Data-parallel training under torchrun (2 gloo ranks on CPU) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mneme_plugin.crosscoder import BatchTopKCrossCoder
from mneme_plugin.crosscoder.sparse import global_batch_topk_indices
from mneme_plugin.crosscoder.sparse import batch_topk_indices
from mneme_plugin.crosscoder.training import STATE_FILE, latest_checkpoint, train
from mneme_plugin.distributed import DistributedContext
from mneme_plugin.crosscoder.planted import planted_pair_data
from tests.helpers import fork_ranks, write_activation_store

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
# Dead after 10 steps and a threshold from step 10: the aux loss, the counters and the threshold
# EMA all take part within the 60 steps (an EMA of beta 0.9 follows the 50 steps; the default 0.999
# would keep step 10's value, above every salience of the last batch: l0 0 in the final metrics).
# The paper's squared-norm salience lets some of the 16x latents starve here (the `crosscoder`
# default keeps them all alive), so dead latents exist.
CONFIG = {
    "crosscoder": {"expansion_factor": 16, "k": 4, "salience": "paper"},
    "training": {"steps": 60, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5, "threshold_start_step": 10,
                 "dead_after_tokens": 640, "checkpoint_every": 20, "device": "cpu", "threshold_beta": 0.9,
                 "keep_finished_checkpoints": True,  # the reference's step-40 checkpoint is compared
                 # No held-out rows: full global batches, and metrics.json reports on the last training
                 # batch, each rank evaluating its slice. (Held-out rows leave global batches a few rows
                 # short, split unevenly over the ranks: test_ranks_train_on_held_out_stores_as_one_process_does.)
                 "eval_rows": 0},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x = planted_pair_data(n=3000, d=16, seed=3).x
    return write_activation_store(tmp_path_factory.mktemp("store"), x, rows_per_shard=700)


# The science-of-finetuning loss (mean norm of the error): its own 1-process reference.
NORM_CONFIG = {**CONFIG, "training": {**CONFIG["training"], "loss": "norm"}}


def torchrun(nproc: int, store: Path, run_dir: Path, crash_step: int | None = None,
             config: dict = CONFIG) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if crash_step is not None:
        env.update(MNEME_TEST_CRASH_STEP=str(crash_step), MNEME_TEST_CRASH_RANK="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(store), str(run_dir), json.dumps(config)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_state(a: dict, b: dict) -> None:
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_global_topk_of_rank_slices_is_the_topk_of_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    salience = torch.relu(torch.randn(12, 50, generator=gen))
    salience[3, 7] = salience[8, 2] = salience[0, 1] = 5.0  # a tie at the cut-off, across ranks
    keep = int((salience > 5.0).sum()) + 2  # the cut-off falls inside the three tied 5.0 entries
    whole = set(batch_topk_indices(salience, keep).tolist())
    assert len(whole) == keep
    world = 3
    rows = 12 // world
    # Simulated ranks: the all-gather a real group would do, over fixed candidate lists.
    candidates = []
    for rank in range(world):
        part = salience[rank * rows : (rank + 1) * rows]
        local = batch_topk_indices(part, keep)
        values = torch.full((keep,), float("-inf"))
        values[: local.numel()] = part.reshape(-1)[local]
        candidates.append(values)

    class FakeGroup(DistributedContext):
        def all_gather(self, tensor):
            return torch.stack(candidates)

    picked = set()
    for rank in range(world):
        part = salience[rank * rows : (rank + 1) * rows]
        local = global_batch_topk_indices(part, keep, FakeGroup(rank=rank, world_size=world))
        picked |= {int(i) + rank * rows * 50 for i in local}
    assert len(picked) == keep
    # Same set up to which of the tied 5.0 entries were taken.
    flat = salience.reshape(-1)
    assert sorted(flat[list(picked)].tolist()) == sorted(flat[list(whole)].tolist())


def test_ties_at_the_global_cut_off_go_to_the_lowest_global_indices_as_in_one_process():
    """bf16 saliences tie at the cut-off: the ranks (consecutive rows, uneven shares) keep exactly the
    entries one process keeps, the tied ones of the lowest global flat index."""
    gen = torch.Generator().manual_seed(5)
    m = 40
    salience = torch.relu(torch.randn(12, m, generator=gen)).to(torch.bfloat16)
    salience[salience == salience.max()] = 0  # planted: eight entries tie above everything, two per rank
    tied = [(1, 3), (2, 30), (4, 0), (6, 9), (7, 39), (9, 1), (10, 2), (11, 11)]
    for row, col in tied:
        salience[row, col] = 9.0
    shares = [(0, 3), (3, 8), (8, 12)]  # rows of each rank: 3, 5, 4
    for keep in (3, 5, 7):  # the cut-off inside the tied entries: the first `keep` of them in row-major order
        expected = sorted(row * m + col for row, col in tied[:keep])
        assert sorted(batch_topk_indices(salience, keep).tolist()) == expected
        assert sorted(_ranks_select(salience, keep, shares)) == expected
    # The random bf16 values' own ties: the same selection in one process and over ranks, for every budget.
    salience[salience == 9.0] = 0
    for keep in range(1, 120, 7):
        whole = sorted(batch_topk_indices(salience, keep).tolist())
        assert len(whole) == keep and sorted(_ranks_select(salience, keep, shares)) == whole, keep


def _ranks_select(salience: torch.Tensor, keep: int, shares: list[tuple[int, int]]) -> list[int]:
    """global_batch_topk_indices on simulated ranks holding ``shares`` (row ranges) of ``salience``: the
    global flat indices they keep together."""
    m, world = salience.shape[1], len(shares)
    candidates = []
    for start, stop in shares:
        part = salience[start:stop]
        local = batch_topk_indices(part, min(keep, part.numel()))
        values = torch.full((keep,), float("-inf"), dtype=salience.dtype)
        values[: local.numel()] = part.reshape(-1)[local]
        candidates.append(values)

    class FakeGroup(DistributedContext):
        def all_gather(self, tensor):
            return torch.stack(candidates)

    picked = []
    for rank, (start, stop) in enumerate(shares):
        local = global_batch_topk_indices(salience[start:stop], keep, FakeGroup(rank=rank, world_size=world))
        picked += [int(i) + start * m for i in local]
    assert len(picked) == len(set(picked)) == keep
    return picked


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """The run of one process (no torchrun)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train(store, run_dir, CONFIG["crosscoder"], CONFIG["training"], progress=False)
    return run_dir


def checkpoint_weights(checkpoint: Path) -> dict:
    """A checkpoint's weights and buffers (its crosscoder files; the trainer state holds the rest)."""
    return BatchTopKCrossCoder.from_pretrained(checkpoint).state_dict()


def final_state(run_dir: Path) -> dict:
    return BatchTopKCrossCoder.from_pretrained(run_dir / "crosscoder").state_dict()


@pytest.mark.slow  # torchrun: a minute or more on 2 cores
def test_two_gloo_ranks_match_one_process_and_a_killed_rank_resumes(store, reference, tmp_path):
    run_dir = tmp_path / "two"
    crashed = torchrun(2, store, run_dir, crash_step=45)
    assert crashed.returncode != 0
    assert latest_checkpoint(run_dir).name == "step_00000040"
    assert not (run_dir / "crosscoder").exists()
    # The checkpoint the two ranks wrote at step 40: weights, dead counters, threshold, Adam state.
    ref_state = torch.load(reference / "checkpoints" / "step_00000040" / STATE_FILE, weights_only=True)
    two_state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)
    assert torch.equal(ref_state["tokens_since_fired"], two_state["tokens_since_fired"])
    assert (ref_state["tokens_since_fired"] >= 640).any(), "no dead latent: the aux loss was not exercised"
    ref_weights = checkpoint_weights(reference / "checkpoints" / "step_00000040")
    two_weights = checkpoint_weights(latest_checkpoint(run_dir))
    assert_same_state(ref_weights, two_weights)
    assert float(two_weights["threshold"]) > 0
    for ref_slot, two_slot in zip(ref_state["optimizer"]["state"].values(), two_state["optimizer"]["state"].values()):
        assert_same_state(ref_slot, two_slot)

    done = torchrun(2, store, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(final_state(reference), final_state(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    # Each rank evaluated its slice of the last batch; the reduced figures are one process's.
    assert metrics["n_tokens"] == expected["n_tokens"] == CONFIG["training"]["batch_size"]
    assert metrics.keys() == expected.keys() and metrics["eval_data"] == expected["eval_data"]
    assert expected["l0"] > 0, "the inference threshold silences every latent: the metrics compare nothing"
    for name, value in expected.items():
        if isinstance(value, float):
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.slow  # torchrun: a minute or more on 2 cores
def test_norm_loss_run_moves_from_one_process_to_two_ranks_and_back(store, tmp_path):
    reference = tmp_path / "reference"
    train(store, reference, NORM_CONFIG["crosscoder"], NORM_CONFIG["training"], progress=False)
    run_dir = tmp_path / "one_two_one"

    class Killed(RuntimeError):
        pass

    def kill_at_25(step, trainer):
        if step == 25:
            raise Killed

    with pytest.raises(Killed):  # one process to its checkpoint at step 20
        train(store, run_dir, NORM_CONFIG["crosscoder"], NORM_CONFIG["training"], progress=False, on_step=kill_at_25)
    crashed = torchrun(2, store, run_dir, crash_step=45, config=NORM_CONFIG)  # two ranks, from 20 to 40
    assert crashed.returncode != 0 and latest_checkpoint(run_dir).name == "step_00000040"
    ref_state = torch.load(reference / "checkpoints" / "step_00000040" / STATE_FILE, weights_only=True)
    two_state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)
    assert torch.equal(ref_state["tokens_since_fired"], two_state["tokens_since_fired"])
    assert (ref_state["tokens_since_fired"] >= 640).any(), "no dead latent: the aux loss was not exercised"
    two_weights = checkpoint_weights(latest_checkpoint(run_dir))
    assert float(two_weights["threshold"]) > 0
    assert_same_state(checkpoint_weights(reference / "checkpoints" / "step_00000040"), two_weights)
    # One process finishes what two ranks left: the crosscoder of the uninterrupted run.
    done = train(store, run_dir, NORM_CONFIG["crosscoder"], NORM_CONFIG["training"], progress=False).crosscoder
    assert_same_state(final_state(reference), done.state_dict())
    assert_same_state(final_state(reference), final_state(run_dir))


def _train_rank(rank: int, store: str, run_dir: str, config: dict) -> None:
    train(store, run_dir, config["crosscoder"], config["training"], progress=False)


def train_on_forked_ranks(world: int, store: Path, run_dir: Path, config: dict) -> None:
    fork_ranks(_train_rank, world, str(store), str(run_dir), config)


# A short run: the threshold from step 10, dead latents from step 10 (so every reduced quantity takes part).
SHORT = {"crosscoder": CONFIG["crosscoder"],
         "training": {**CONFIG["training"], "steps": 24, "checkpoint_every": 0}}


def assert_same_run(reference: Path, run_dir: Path) -> None:
    assert_same_state(final_state(reference), final_state(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert metrics["n_tokens"] == expected["n_tokens"] and metrics["eval_data"] == expected["eval_data"]
    for name, value in expected.items():
        if isinstance(value, float):
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_ranks_anneal_k_with_the_budget_of_one_process(store, tmp_path):
    """With training.k_anneal_factor, BatchTopK keeps round(k_t * B) entries of the global batch, as
    one process does (not the rank count times each rank's rounded share)."""
    config = {**SHORT, "training": {**SHORT["training"], "k_anneal_factor": 2.0}}
    train(store, tmp_path / "one", config["crosscoder"], config["training"], progress=False)
    train_on_forked_ranks(2, store, tmp_path / "two", config)
    assert_same_run(tmp_path / "one", tmp_path / "two")



def test_ranks_train_on_held_out_stores_as_one_process_does(store, tmp_path):
    """eval_rows > 0 (the default) leaves global batches a few rows short of batch_size: the ranks
    share every row of each batch (uneven shares, weighted as one process's mean), not a cut batch."""
    config = {**SHORT, "training": {**SHORT["training"], "batch_size": 96, "dead_after_tokens": 960,
                                    "eval_rows": 256}}
    train(store, tmp_path / "one", config["crosscoder"], config["training"], progress=False)
    train_on_forked_ranks(3, store, tmp_path / "three", config)
    assert_same_run(tmp_path / "one", tmp_path / "three")


def test_ranks_under_bf16_autocast_train_the_crosscoder_of_one_process(store, tmp_path):
    """bf16 saliences tie at BatchTopK's cut-off (several entries equal to the k*B-th); the ties go to the
    lowest global indices in one process and on the ranks alike, so the weights agree to float summation
    order (topk's arbitrary tie-breaking left differences of 1e-2 after 24 steps)."""
    config = {**SHORT, "training": {**SHORT["training"], "autocast": "bfloat16"}}
    train(store, tmp_path / "one", config["crosscoder"], config["training"], progress=False)
    train_on_forked_ranks(2, store, tmp_path / "two", config)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=2e-6, msg=name)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def _planted_stream(batches: int, batch_size: int = 64) -> list[torch.Tensor]:
    return list(planted_pair_data(n=batches * batch_size, d=16, seed=4).x.split(batch_size))


@pytest.mark.parametrize("source", ["store, last training batch", "stream, batches after training"])
def test_ranks_report_the_metrics_of_one_process_before_a_threshold_exists(store, source, tmp_path):
    """No inference threshold yet (threshold_start_step past the last step): the evaluation encodes each
    global batch by BatchTopK over the whole batch on the ranks too, not over each rank's slice."""
    crosscoder, training = SHORT["crosscoder"], {**SHORT["training"], "threshold_start_step": 100}
    if source.startswith("stream"):
        data, training = _planted_stream(24 + 2), {**training, "eval_rows": 128}  # 2 batches after training
        crosscoder = {**crosscoder, "activation_dim": 16}
    else:
        data = store
    train(data, tmp_path / "one", crosscoder, training, progress=False)
    fork_ranks(_train_rank, 2, data if isinstance(data, list) else str(data), str(tmp_path / "two"),
               {"crosscoder": crosscoder, "training": training})
    assert float(final_state(tmp_path / "one")["threshold"]) < 0  # BatchTopK in the evaluation
    expected = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert expected["eval_data"] == ("stream_after_training" if source.startswith("stream") else "training_batch")
    assert expected["n_tokens"] == (128 if source.startswith("stream") else 64)
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # torchrun twice: a minute on 2 cores
def test_under_the_cli_only_rank_0_logs(store, tmp_path):
    """`mneme train --nproc 2`: the log lines (info and warnings) come once, from rank 0, not once a rank."""
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))  # eval_rows 0: a warning that every rank would give
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mneme_plugin.cli", "train", "--store", str(store), "--out", str(tmp_path / "run"),
           "--config", str(config), "--nproc", "2"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("eval_rows is 0") == 1, first.stderr[-3000:]
    assert first.stderr.count("Crosscoder written to") == 1
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("Training already finished") == 1, again.stderr[-3000:]


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line holds ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow  # torchrun: half a minute on 2 cores
def test_sigterm_to_mneme_nproc_stops_every_rank(store, tmp_path):
    """`mneme train --nproc 2` ran torchrun as a child: SIGTERM to the mneme process (a supervisor, `kill`, a
    container stop) ended it alone, and torchrun and its ranks trained on, holding the output lock. The
    command now becomes torchrun (same pid), which stops its ranks on SIGTERM."""
    import signal
    import time

    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "training": {**CONFIG["training"], "steps": 10**6}}))
    run_dir = tmp_path / "sigterm_run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mneme_plugin.cli", "train", "--store", str(store), "--out",
                             str(run_dir), "--config", str(config), "--nproc", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints").is_dir() and time.time() < deadline:  # the ranks are training
            assert proc.poll() is None, "the training stopped by itself"
            time.sleep(0.5)
        assert (run_dir / "checkpoints").is_dir()
        ranks = [pid for pid in _processes_naming(str(run_dir)) if pid != proc.pid]
        assert len(ranks) >= 2  # the two ranks (and no torchrun child of the mneme process: it is torchrun)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        deadline = time.time() + 60
        while _processes_naming(str(run_dir)) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_naming(str(run_dir)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_naming(str(run_dir)):
            os.kill(pid, 9)


def _train_rank_1_failing(rank: int, store: str, out: str) -> None:
    """One forked rank of a data-parallel `train` whose rank 1 fails at step 3 (its callback raises);
    what each rank raised goes to OUT/rankR.json."""
    def fail_on_rank_1(step, trainer):
        if rank == 1 and step == 3:
            raise ValueError("callback failed on rank 1")

    try:
        train(store, Path(out) / "run", SHORT["crosscoder"], SHORT["training"], progress=False, on_step=fail_on_rank_1)
        outcome = ["ok", ""]
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank got
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_an_error_on_one_rank_of_a_training_reaches_the_other_with_the_rank_and_its_message(store, tmp_path):
    fork_ranks(_train_rank_1_failing, 2, str(store), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert rank1 == ["ValueError", "callback failed on rank 1"]
    assert rank0 == ["RankFailedError", "Rank 1 failed while training: ValueError: callback failed on rank 1"]


def _resume_in_own_folder(rank: int, store: str, out: str) -> None:
    """One forked rank resuming a training in ``OUT/node<rank>``: ranks on nodes without a shared filesystem."""
    try:
        train(store, Path(out) / f"node{rank}", SHORT["crosscoder"], SHORT["training"], progress=False)
        outcome = ["ok", ""]
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank got
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_ranks_that_see_different_output_folders_are_refused_not_left_waiting(store, tmp_path):
    """Two nodes without a shared filesystem: the node that holds the finished run loaded it and left, the
    other started training and waited in its first collective until the process group timed out (30
    minutes). Every rank now compares what it sees first and stops with what each saw."""
    train(store, tmp_path / "node0", SHORT["crosscoder"], SHORT["training"], progress=False)
    fork_ranks(_resume_in_own_folder, 2, str(store), str(tmp_path))
    for rank in range(2):
        kind, message = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert kind == "ConfigError", message
        assert f"The ranks see different contents in the output folder {tmp_path / f'node{rank}'} (rank 0: a " \
               "finished crosscoder, rank 1: no checkpoint): on several nodes it must be one folder every node" in message


def _train_odd_batch(rank: int, store: str, out: str) -> None:
    config = {**SHORT["training"], "batch_size": SHORT["training"]["batch_size"] + 1}
    try:
        train(store, Path(out) / "run", SHORT["crosscoder"], config, progress=False)
        outcome = ["ok", ""]
    except Exception as err:  # noqa: BLE001 - the test reads which error the rank got
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_a_batch_the_ranks_cannot_share_is_refused_before_waiting_for_the_others(store, tmp_path, monkeypatch):
    """Rank 0 of 2 alone (rank 1 never arrives): the batch size is refused at once, not after the wait."""
    assert SHORT["training"]["batch_size"] % 2 == 0
    monkeypatch.setenv("MNEME_DIST_INIT_TIMEOUT", "1")
    fork_ranks(_train_odd_batch, 2, str(store), str(tmp_path), started=1)
    kind, message = json.loads((tmp_path / "rank0.json").read_text())
    assert kind == "ConfigError" and "must be a multiple of the number of ranks (2)" in message
    assert not (tmp_path / "run").exists()


def test_mneme_train_refuses_a_batch_the_ranks_cannot_split_before_they_start(tmp_path):
    """`mneme train --nproc 3` with batch 64: refused once by the launching process, not by each of three ranks
    after they started (a line per rank in torchrun's failure summary)."""
    (tmp_path / "store").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "train", "--store", str(tmp_path / "store"),
                          "--train-batch-size", "64", "--nproc", "3", "--out", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("training.batch_size=64 is the global batch; it must be a multiple of the number of "
                            "ranks (3)") == 1, run.stderr[-3000:]
    assert "torch.distributed" not in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()
