"""The findings table: verdicts follow the CIs of synthetic tables with a known answer."""

import numpy as np
import pandas as pd

from distillscale.fit.findings import (
    NO_SIGNAL,
    NOT_SUPPORTED,
    SUPPORTED,
    cot_keeps_knowledge,
    findings,
)
from distillscale.fit.table import detail_records, fit_table

RATIOS = [1.0, 0.79, 0.58, 0.37, 0.16]


def _table(id_curve, gk_curve, seeds=(0,), sd=0.005, formats=("label",), gk_shift=None,
           gk="probe"):
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for fmt in formats:
            for r in RATIOS:
                teacher = r == 1.0
                for metric, f in (("macro_f1", id_curve), (gk, gk_curve)):
                    v = f(r) + rng.normal(0, sd)
                    if metric == gk and gk_shift and not teacher:
                        v += gk_shift.get(fmt, 0.0)
                    rows.append({
                        "model": "teacher" if teacher else f"{fmt}{r}", "compression_ratio": r,
                        "metric": metric, "value": v, "ci_low": v - 2 * sd, "ci_high": v + 2 * sd,
                        "method": "none" if teacher else "logit_kd",
                        "supervision": "none" if teacher else fmt,
                        "schedule": "none" if teacher else "uniform",
                        "axis": "none" if teacher else "width", "step": 0 if teacher else 1,
                        "seed": seed, "dataset_size": 500})
    return pd.DataFrame(rows).drop_duplicates(["model", "metric", "seed"])


def _verdicts(long):
    groups, _ = fit_table(long, sorted(set(long["metric"])),
                          ["saturating_power_law", "logistic_log"], ["compression_ratio"],
                          num_classes=35, bootstrap_samples=30)
    return findings(long, detail_records(groups, {}), num_classes=35)


def test_knowledge_collapsing_early_is_supported_and_flat_data_is_not():
    # In-domain loses half its margin near 0.2; the probe near 0.6 (logistic in log ratio).
    def id_curve(r):
        return 1 / 35 + (0.95 - 1 / 35) / (1 + (0.2 / r) ** 4)

    def gk_curve(r):
        return 0.25 + 0.4 / (1 + (0.6 / r) ** 6)

    found = _verdicts(_table(id_curve, gk_curve))
    assert found[0]["verdict"] == SUPPORTED and found[0]["value"] > 0.2
    assert found[1]["verdict"] == SUPPORTED and found[1]["value"] > 0.2, found[1]

    flat = _verdicts(_table(lambda r: 0.9, lambda r: 0.4))
    assert flat[0]["verdict"] == NOT_SUPPORTED  # no measurable drop down to 0.16
    assert flat[1]["verdict"] == NO_SIGNAL  # neither curve loses half its margin


def test_cot_versus_label_needs_paired_seeds():
    def id_curve(r):
        return 0.3 + 0.6 * r

    def gk_curve(r):
        return 0.25 + 0.3 * r

    shift = {"cot_long": 0.05}
    three = _table(id_curve, gk_curve, seeds=(0, 1, 2), formats=("label", "cot_long"),
                   gk_shift=shift)
    row = cot_keeps_knowledge(three, "probe")[0]
    assert row["verdict"] == SUPPORTED and row["ci_low"] > 0 and abs(row["value"] - 0.05) < 0.02
    same = _table(id_curve, gk_curve, seeds=(0, 1, 2), formats=("label", "cot_long"))
    assert cot_keeps_knowledge(same, "probe")[0]["verdict"] == NO_SIGNAL
    one = _table(id_curve, gk_curve, seeds=(0,), formats=("label", "cot_long"), gk_shift=shift)
    row = cot_keeps_knowledge(one, "probe")[0]
    assert row["verdict"] == NO_SIGNAL and "one seed" in row["note"]


def test_general_knowledge_findings_prefer_real_mmlu_and_fall_back_to_the_probe():
    def id_curve(r):
        return 1 / 35 + (0.95 - 1 / 35) / (1 + (0.2 / r) ** 4)

    def gk_curve(r):
        return 0.25 + 0.4 / (1 + (0.6 / r) ** 6)

    probe = _table(id_curve, gk_curve)
    found = _verdicts(probe)
    assert found[1]["quantity"].startswith("ratio where probe lost")
    assert found[1]["verdict"] == SUPPORTED  # the probe's own chance floor, 0.25
    # With real MMLU in the table too, the finding is about MMLU.
    both = pd.concat([probe, _table(id_curve, gk_curve, gk="mmlu").query("metric == 'mmlu'")])
    found = _verdicts(both)
    assert found[1]["quantity"].startswith("ratio where mmlu lost")
    assert found[2]["quantity"].startswith("mmlu:")
