"""`commands.common`: what a command says when it stops (an error, or Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import random_activation_pairs, write_activation_store

ROOT = Path(__file__).resolve().parents[2]


def _interrupt_when(cmd: list[str], ready, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``cmd`` (SIGINT at its default, as in a terminal), press Ctrl-C once ``ready()``; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_in_train_says_where_it_resumes(tmp_path):
    """Ctrl-C printed click's bare "Aborted!" (exit 1): nothing said that the command resumes, nor from where."""
    store = write_activation_store(tmp_path / "store", random_activation_pairs(2048, 16, seed=0), rows_per_shard=1024)
    config = tmp_path / "train.yaml"
    config.write_text("training: {checkpoint_every: 5, eval_rows: 256}\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mneme_plugin.cli", "train", "--store", str(store), "--config", str(config),
           "--expansion-factor", "2", "-k", "4", "--steps", "1000000", "--train-batch-size", "64", "--out", str(out)]
    result = _interrupt_when(cmd, lambda: any((out / "checkpoints").glob("step_*")))
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Aborted!" not in result.stderr
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert f"Interrupted: run the same command again to resume from the newest checkpoint, {newest}." in result.stderr
