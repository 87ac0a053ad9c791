"""Every shipped recipe through `distillscale run` at the smallest size, one after another on
one run folder (data, teacher and supervision are shared and skipped after the first)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from distillscale.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}",
    f"teacher.supervision.family={ROOT / 'conf/teachers/tiny.yaml'}",
    "data.num_examples=500", "teacher.train.steps=60", "prune.calibration_samples=32",
    "teacher.supervision.depths=[label, cot_short]", "teacher.supervision.cache.formats=[label]",
    "teacher.supervision.cache.k=16", "distill.train.steps=6", "distill.train.log_every=3",
    "eval.bootstrap_samples=20", "eval.general.limit=20",
    "students=[{name: w, axis: width, compression_ratio: 0.5}]",
]
CASES = {  # recipe -> (its config, what distinguishes it in the distilled manifest)
    "prune_distill": ("quickstart.yaml", [], {"method": "logit_kd", "steps": 1}),
    "lora_kd": ("lora_kd.yaml", [], {"method": "lora_kd", "supervision": "label"}),
    "cot_distill": ("cot_distill.yaml", [], {"supervision": "cot_short"}),
    "iterative_prune": ("uniform_schedule.yaml", ["prune.steps=2"],
                        {"schedule": "uniform", "steps": 2, "step": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(CASES))
def test_each_recipe_runs_end_to_end_through_distillscale_run(recipe, tmp_path_factory, megatron):
    out = tmp_path_factory.getbasetemp() / "recipes_e2e"
    config, extra, expect = CASES[recipe]
    rc = cli_main(["run", str(ROOT / "conf/experiments" / config), f"output_dir={out}",
                   f"teacher.supervision.cache.dir={out.parent / 'recipes_cache'}",
                   *SMALL, *extra])
    assert rc == 0
    assert f"recipe: {recipe}" in (out / "config.yaml").read_text()
    m = json.loads((out / "students/w/distilled/manifest.json").read_text())["metrics"]
    for key, value in expect.items():
        assert m[key] == value, (recipe, key)
    res = pd.read_csv(out / "results.csv")
    assert {"teacher", "w/pruned", "w/distilled"} <= set(res.model)
    if recipe == "iterative_prune":  # the intermediate step is evaluated too
        assert {"w/step1/pruned", "w/step1/distilled"} <= set(res.model)
    assert "w/distilled" in (out / "report.md").read_text()
