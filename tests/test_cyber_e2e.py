"""The second shipped domain through the whole quickstart, with only `domain.taxonomy`
changed (sizes as tests/test_quickstart_e2e.py): no finance default is left to lean on."""

import json
from pathlib import Path

import pandas as pd
import pytest

from distillscale.cli import main
from distillscale.domain import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]
CYBER = ROOT / "conf/domains/cyber.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, megatron):
    out = tmp_path_factory.mktemp("cyber")
    rc = main(["run", str(ROOT / "conf/experiments/quickstart.yaml"), f"output_dir={out}",
               f"domain.taxonomy={CYBER}", "name=quickstart_cyber",
               "data.num_examples=1400", "teacher.train.steps=220", "distill.train.steps=40",
               "eval.bootstrap_samples=50",
               ("students=[{name: w, axis: width, compression_ratio: 0.5}, "
                "{name: d, axis: depth, shape: {num_layers: 2}}]")])
    assert rc == 0
    return out


@pytest.mark.slow
def test_cyber_quickstart_runs_on_its_own_classes(run):
    labels = set(load_taxonomy(CYBER).labels)
    train = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in train} == labels
    card = (run / "data" / "dataset_card.md").read_text()
    assert "# Dataset card: cyber" in card and "## Bag-of-words baseline" in card
    per_class = pd.read_csv(run / "eval" / "per_class_f1.csv")
    assert set(per_class["label"]) == labels


@pytest.mark.slow
def test_cyber_teacher_and_students_are_evaluated(run):
    res = pd.read_csv(run / "results.csv")
    assert {"teacher", "w/distilled", "d/distilled"} <= set(res.model)
    teacher = res[res.model == "teacher"].iloc[0]
    # Ten classes: chance is 0.1 macro F1; the teacher learns far more than that.
    assert teacher.macro_f1 > 0.5
    assert (res[res.model != "teacher"].params < teacher.params).all()
    # The fits and the report use the taxonomy's class count (1/10 chance floor), not 35.
    report = (run / "report.md").read_text()
    assert "10 classes" in report and "35 classes" not in report
