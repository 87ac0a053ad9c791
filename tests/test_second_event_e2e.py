"""`data.second_event_rate` end to end through `distillscale run`, at the smallest size: the
data stage writes headlines that go on to mention a second event, labelled by the first, and
the rest of the pipeline trains, prunes, distills and scores on them."""

import json
from pathlib import Path

import pandas as pd
import pytest

from distillscale.cli import main
from distillscale.domain import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]
FINANCE = ROOT / "conf/domains/finance.yaml"
RATE = 0.3


@pytest.fixture(scope="module")
def run(tmp_path_factory, megatron):
    out = tmp_path_factory.mktemp("second_event")
    rc = main(["run", str(ROOT / "conf/experiments/quickstart.yaml"), f"output_dir={out}",
               f"domain.taxonomy={FINANCE}", "name=second_event",
               f"data.second_event_rate={RATE}", "data.num_examples=600",
               "teacher.train.steps=120", "teacher.supervision.depths=[label]",
               "teacher.supervision.cache.formats=[]", "distill.train.steps=10",
               "eval.general.probe_path=null", "eval.bootstrap_samples=20",
               "fit.bootstrap_samples=5",
               "students=[{name: w, axis: width, compression_ratio: 0.5}]"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_the_data_stage_writes_second_events_labelled_by_the_first(run):
    metrics = json.loads((run / "data" / "manifest.json").read_text())["metrics"]
    # A binomial draw at the rate, over the template rows the stage generated (0 when off).
    share = metrics["second_events"] / metrics["rows_in"]
    assert 0.2 < share < 0.4, metrics
    card = (run / "data" / "dataset_card.md").read_text()
    assert f"- second_event_rate: `{RATE:g} ({metrics['second_events']:,} of" in card
    # The gold label stays the primary event: no label noise, every class still present.
    labels = set(load_taxonomy(FINANCE).labels)
    rows = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == labels
    assert all(r["label"] == r["gold_label"] for r in rows)


@pytest.mark.slow
def test_the_run_trains_and_scores_on_them(run):
    res = pd.read_csv(run / "results.csv")
    teacher = res[res.model == "teacher"].iloc[0]
    assert teacher.macro_f1 > 3 / 35  # well above chance (1/35) on the harder rows
    student = res[res.model == "w/distilled"].iloc[0]
    assert student.params < teacher.params and 0 <= student.macro_f1 <= 1
    m = json.loads((run / "students" / "w" / "distilled" / "manifest.json").read_text())
    assert 0 < m["metrics"]["val_kl_after"] < float("inf")
    assert (run / "report.md").is_file()
