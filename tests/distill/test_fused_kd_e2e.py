"""`distill.loss.implementation=fused_head` end to end through `distillscale run` at the
smallest size: the distilled student's validation KL to the teacher drops."""

import json
from pathlib import Path

import pytest

from distillscale.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.long_e2e
def test_fused_head_run_lowers_the_validation_kl(tmp_path, megatron):
    out = tmp_path / "run"
    rc = main(["run", str(ROOT / "conf/experiments/quickstart.yaml"),
               f"output_dir={out}",
               f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}",
               f"teacher.supervision.cache.dir={tmp_path / 'cache'}",
               "data.num_examples=600",
               "teacher.train.steps=150",
               "distill.train.steps=30",
               "distill.loss.implementation=fused_head",
               "eval.bootstrap_samples=20",
               "students=[{name: w, axis: width, compression_ratio: 0.5}]"])
    assert rc == 0
    m = json.loads((out / "students" / "w" / "distilled" / "manifest.json").read_text())
    assert m["metrics"]["loss"]["implementation"] == "fused_head"
    assert m["metrics"]["val_kl_after"] < m["metrics"]["val_kl_before"]
