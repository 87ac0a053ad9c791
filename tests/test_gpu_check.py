"""tools/gpu_check.sh in its CPU mode at the smallest size: the prepared GPU check runs end to end
(build, Minitron prune, KD, HF export) and its last line carries the five figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("tokens_per_s", "mfu", "peak_mem_gib", "kd_loss_drop", "hf_logit_diff")


@pytest.mark.slow
def test_gpu_check_cpu_mode_prints_its_figures(tmp_path):
    env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               GPU_WHEELS=str(tmp_path / "no-wheels"))  # the CPU venv has the stack already
    res = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--cpu", "--teacher-steps", "30", "--distill-steps", "20",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "spec=local" in res.stdout and "as qwen3" in res.stdout
    figures = dict(kv.split("=", 1) for kv in lines[-1].split())
    assert tuple(figures) == KEYS, lines[-1]
    values = {k: float(v) for k, v in figures.items()}  # every figure parses (mfu: nan on CPU)
    assert values["tokens_per_s"] > 0 and values["peak_mem_gib"] > 0
    assert values["kd_loss_drop"] > 0
    assert values["hf_logit_diff"] < 1e-3
    assert (tmp_path / "out" / "student_hf" / "config.json").is_file()
