"""The real teacher stage through `launchers/local.sh`: SIGUSR1 during training -> checkpoint
-> exit 75 -> the same command again resumes from the checkpoint and finishes the stage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, env, timeout):
    """Run a launcher in its own process group, so a timeout also ends the Python under it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


@pytest.mark.slow
def test_preempted_teacher_stage_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["--config", "conf/experiments/quickstart.yaml", f"output_dir={out}",
              "data.num_examples=800", "teacher.train.steps=40",
              "teacher.train.checkpoint_every=5", "teacher.train.eval_every=40",
              "teacher.train.log_every=5"]
    env = {**os.environ, "DISTILLSCALE_PYTHON": str(REPO / ".venv" / "bin" / "python")}
    rc, err = _run(["bash", "launchers/local.sh", "--kind", "data", *common], env, 600)
    assert rc == 0, err[-3000:]

    cmd = ["bash", "launchers/local.sh", "--kind", "teacher", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ck = out / "teacher.tmp" / "checkpoints" / "last.pt"
    try:
        deadline = time.time() + 600
        while not ck.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ck.exists(), proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGUSR1)  # to the launcher, as Slurm signals the batch shell
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted at step" in err and "run the same command again to resume" in err
    step = torch.load(ck, weights_only=False)["step"]
    assert 5 <= step < 40
    assert not (out / "teacher").exists()  # unfinished: only its temp folder, with the checkpoint

    rc, err = _run(cmd, env, 900)
    assert rc == 0, err[-3000:]
    assert (out / "teacher" / "manifest.json").is_file()
    assert not (out / "teacher.tmp").exists()
