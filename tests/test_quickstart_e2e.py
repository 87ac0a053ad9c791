"""The quickstart pipeline end to end at the smallest size: real ModelOpt pruning and
distillation on a real (tiny) Megatron teacher."""

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from distillscale import pipeline
from distillscale.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, megatron):
    out = tmp_path_factory.mktemp("qs")
    cfg = load_config(ROOT / "conf/experiments/quickstart.yaml", [
        f"output_dir={out}",
        f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}",
        "data.num_examples=1400",
        "teacher.train.steps=220",
        "distill.train.steps=40",
        "eval.bootstrap_samples=50",
        # One width and one depth student keep CI short. The depth student keeps 1 of the
        # teacher's 4 layers: with 2 kept, Minitron's pruned student starts at the teacher's
        # noise floor (val KL 0.040, train KL 0.009 on this seed), and 40 steps at the
        # quickstart's learning rate end above it (0.160; the width student: 1.33 -> 0.160), so
        # "distillation lowers KL" would test the learning rate, not the distillation.
        ("students=[{name: w, axis: width, compression_ratio: 0.5}, "
        "{name: d, axis: depth, shape: {num_layers: 1}}]"),
    ])
    pipeline.run_all(cfg)
    return cfg, out


@pytest.mark.slow
def test_students_are_smaller_with_the_asked_shapes(run):
    _cfg, out = run
    res = pd.read_csv(out / "results.csv")
    for col in ("model", "params", "compression_ratio", "macro_f1", "accuracy"):
        assert col in res.columns
    teacher = res[res.model == "teacher"].iloc[0]
    for name in ("w", "d"):
        man = json.loads((out / "students" / name / "pruned" / "manifest.json").read_text())
        row = res[res.model == f"{name}/distilled"].iloc[0]
        assert row.params < teacher.params
        assert row.compression_ratio == pytest.approx(row.params / teacher.params)
        for key, value in man["metrics"]["target"].items():
            assert row[key] == value  # the shape asked for is the shape evaluated
    assert res[res.model == "d/distilled"].iloc[0].num_layers == 1
    w = res[res.model == "w/distilled"].iloc[0]
    assert w.hidden_size < teacher.hidden_size or w.ffn_hidden_size < teacher.ffn_hidden_size


@pytest.mark.slow
def test_distillation_lowers_kl(run):
    _, out = run
    for name in ("w", "d"):
        m = json.loads((out / "students" / name / "distilled" / "manifest.json").read_text())
        assert m["metrics"]["val_kl_after"] < m["metrics"]["val_kl_before"]
        # Export checks and the measured CPU speed are recorded for pruned and distilled.
        assert m["metrics"]["hf_max_abs_logit_diff"] < 1e-3
        assert m["metrics"]["cpu_tokens_per_s"] > 0 and m["metrics"]["cpu_speedup"] > 0
        pruned = json.loads((out / "students" / name / "pruned" / "manifest.json").read_text())
        assert pruned["metrics"]["hf_max_abs_logit_diff"] < 1e-3


@pytest.mark.slow
def test_teacher_far_above_chance_on_held_out_data(run):
    _, out = run
    long = pd.read_csv(out / "eval" / "results_long.csv")
    t = long[(long.model == "teacher") & (long.metric == "macro_f1")].iloc[0]
    assert t.value > 10 / 35
    assert t.ci_low <= t.value <= t.ci_high
    assert set(long.metric) >= {"macro_f1", "weighted_f1", "accuracy", "gold_accuracy"}


@pytest.mark.slow
def test_the_knowledge_probe_is_reported_as_probe_never_as_mmlu(run):
    _, out = run
    long = pd.read_csv(out / "eval" / "results_long.csv")
    assert not [m for m in set(long.metric) if m.startswith("mmlu")]
    probe = long[long.metric == "probe"]
    assert set(probe.model) == set(long.model)  # the teacher and every student
    assert probe.value.between(0, 1).all() and (probe.ci_low <= probe.ci_high).all()
    assert "probe" in pd.read_csv(out / "results.csv").columns
    report = (out / "report.md").read_text()
    assert "knowledge probe (synthetic) [95% CI]" in report
    # Real MMLU and MMLU-Pro are named only as not scored (the eval notes).
    mentions = [ln for ln in report.splitlines() if "mmlu" in ln.lower()]
    assert mentions and all("skipped (eval.general.mmlu" in ln for ln in mentions), mentions


@pytest.mark.slow
def test_report_lists_every_student_with_a_real_plot(run):
    cfg, out = run
    report = (out / "report.md").read_text()
    for s in cfg.students:
        assert f"{s.name}/distilled" in report and f"{s.name}/pruned" in report
        row = next(ln for ln in report.splitlines() if ln.startswith(f"| {s.name}/distilled |"))
        assert re.search(r"\| \d+\.\d\d× \|$", row), row  # the measured CPU speedup
    assert "CPU speedup vs teacher" in report
    img = mpimg.imread(out / "plots" / "macro_f1_vs_compression.png")
    assert img.shape[0] > 200 and np.std(img) > 0.01  # a drawn figure, not a blank canvas


@pytest.mark.slow
def test_checkpoints_load_in_transformers(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import forward_logits

    _, out = run
    folder = out / "students" / "w" / "distilled"
    hf = AutoModelForCausalLM.from_pretrained(folder / "hf")
    tok = AutoTokenizer.from_pretrained(out / "teacher" / "tokenizer")
    ids = torch.tensor([tok.encode("<bos> headline : acme wins contract event :",
                                   add_special_tokens=False)])
    mg, arch, _ = load_model(folder)
    assert hf.config.hidden_size == arch.hidden_size
    diff = (hf(ids).logits - forward_logits(mg, ids)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_rerun_skips_finished_stages(run):
    cfg, out = run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("manifest.json")}
    pipeline.run_all(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("manifest.json")} == stamps
