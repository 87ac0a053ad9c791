"""Preemption: SIGUSR1 / SIGTERM -> checkpoint after the current step -> exit 75 -> resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distillscale.config import TrainConfig
from distillscale.train import preemption
from distillscale.train.loop import train

CFG = TrainConfig(steps=30, batch_size=16, lr=0.05, min_lr=0.005, warmup_steps=3,
                  checkpoint_every=100, log_every=5, eval_every=5)


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(128, 6)
    y = x @ torch.randn(6, 1)
    return torch.nn.Linear(6, 1), x, y


@pytest.fixture(autouse=True)
def _clean_handlers():
    preemption.uninstall()
    yield
    preemption.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_exits_with_requeue_code_and_resume_matches(tmp_path, sig):
    ref, x, y = _problem()
    train(ref, list(ref.parameters()), lambda i, s: (
        torch.nn.functional.mse_loss(ref(x[i]), y[i]), {}), 128, CFG, 0, tmp_path / "r.pt", "r")

    model, _, _ = _problem()

    def loss(idx, step):
        if step == 11:  # the scheduler's warning arrives in the middle of step 11
            os.kill(os.getpid(), sig)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}

    ck = tmp_path / "ck.pt"
    with pytest.raises(preemption.Preempted) as info:
        train(model, list(model.parameters()), loss, 128, CFG, 0, ck, "kd")
    assert info.value.code == preemption.REQUEUE_EXIT_CODE == 75
    assert "at step 12" in str(info.value)
    # checkpoint_every=100: this checkpoint exists only because of the signal
    assert torch.load(ck, weights_only=False)["step"] == 12

    preemption.uninstall()
    fresh, _, _ = _problem(seed=99)  # everything must come from the checkpoint
    res = train(fresh, list(fresh.parameters()), lambda i, s: (
        torch.nn.functional.mse_loss(fresh(x[i]), y[i]), {}), 128, CFG, 0, ck, "kd")
    assert res.resumed_from == 12
    for a, b in zip(ref.parameters(), fresh.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_signal_on_the_last_step_lets_the_run_finish(tmp_path):
    model, x, y = _problem()

    def loss(idx, step):
        if step == CFG.steps - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}

    res = train(model, list(model.parameters()), loss, 128, CFG, 0, tmp_path / "c.pt", "kd")
    assert res.steps == CFG.steps  # nothing left to resume: finish and let the stage complete
    with pytest.raises(preemption.Preempted):  # ... and stop before the next stage starts
        preemption.check("next stage")


SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from distillscale.config import TrainConfig
    from distillscale.train.loop import train

    ck, ready = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    x = torch.randn(128, 6); y = x @ torch.randn(6, 1)
    model = torch.nn.Linear(6, 1)
    cfg = TrainConfig(steps=200, batch_size=16, lr=0.05, min_lr=0.005, warmup_steps=3,
                      checkpoint_every=1000, log_every=50, eval_every=50)

    def loss(idx, step):
        if step == 5:
            ready.touch()
        time.sleep(0.01)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}

    res = train(model, list(model.parameters()), loss, 128, cfg, 0, ck, "kd")
    print(f"resumed_from={res.resumed_from} weight_sum={float(model.weight.sum()):.6f}")
""")


def test_process_receiving_sigusr1_exits_75_and_a_second_run_resumes(tmp_path):
    """The real process boundary, as under Slurm: a signal from outside, the exit code, a rerun."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ck, ready = tmp_path / "ck.pt", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(ck), str(ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGUSR1)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    step = torch.load(ck, weights_only=False)["step"]
    assert 5 < step < 200
    assert "preempted at step" in err

    again = subprocess.run([sys.executable, str(script), str(ck), str(ready)], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"resumed_from={step} " in again.stdout
