"""Scaling fits recover known curves from noisy synthetic data."""

import json

import numpy as np
import pandas as pd
import pytest

from distillscale.config import FitConfig
from distillscale.fit import FORMS, bootstrap, fit_form, fit_table, inverse_with_ci, write_fits
from distillscale.fit.estimate import extrapolation_error, sigma_from_ci
from distillscale.fit.screen import is_bounded
from distillscale.fit.table import (
    ResultsTableError,
    chance_floor,
    fits_records,
    is_general,
    metric_label,
    normalize_results,
    read_results,
)
from distillscale.knowledge.general import write_knowledge_probe

FLOOR = 1 / 35


def _long(x_col, xs, ys, sd, seeds, rng, metric="macro_f1", **cond):
    rows = []
    for s in range(seeds):
        for x, y in zip(xs, ys):
            v = y + rng.normal(0, sd)
            rows.append({"model": f"m{x}", x_col: x, "metric": metric, "value": v,
                         "ci_low": v - 1.96 * sd, "ci_high": v + 1.96 * sd, "seed": s,
                         "method": "logit_kd", "supervision": "label", "schedule": "one_shot",
                         **cond})
    return pd.DataFrame(rows)


def test_saturating_power_law_recovers_parameters_within_ci():
    # Eight replicate experiments (six seeds each): the 95% CIs must cover the true parameters
    # in most of them (seed-level bootstrap with six seeds is a little narrow: allow 2 misses).
    truth = {"y_inf": 0.9, "A": 6.0, "alpha": 0.4}
    xs = np.geomspace(1e3, 3e5, 9)
    ys = truth["y_inf"] - truth["A"] * xs ** -truth["alpha"]
    covered = dict.fromkeys(truth, 0)
    for rep in range(8):
        df = _long("dataset_size", xs, ys, 0.008, 6, np.random.default_rng(rep),
                   compression_ratio=0.5)
        x, y = df.dataset_size.to_numpy(), df.value.to_numpy()
        sig = sigma_from_ci(y, df.ci_low, df.ci_high)
        r = fit_form(FORMS["saturating_power_law"], x, y, sig, FLOOR)
        bootstrap(r, x, y, sig, df.seed.to_numpy(), 50, seed=rep)
        params = r.params_with_ci()
        for name, true in truth.items():
            covered[name] += params[name]["ci_low"] <= true <= params[name]["ci_high"]
        assert abs(params["y_inf"]["value"] - 0.9) < 0.02
        assert abs(params["alpha"]["value"] - 0.4) < 0.05
        assert 1 <= r.n_converged <= r.n_inits
        assert len(r.draws) >= 45  # resampled whole seeds; nearly every draw refits
    assert min(covered.values()) >= 6, covered


def test_logistic_in_log_x_recovers_midpoint():
    rng = np.random.default_rng(1)
    xs = np.linspace(0.1, 1.0, 10)
    f = FORMS["logistic_log"]
    th = np.array([0.92, 4.0, np.log(0.3)])
    ys = f.predict(xs, th, FLOOR)
    sd = 0.01
    y = ys + rng.normal(0, sd, len(xs))
    r = fit_form(f, xs, y, np.full_like(y, sd), FLOOR)
    bootstrap(r, xs, y, np.full_like(y, sd), np.arange(len(xs)), 150, seed=2)
    p = r.params_with_ci()
    assert p["x0"]["ci_low"] <= 0.3 <= p["x0"]["ci_high"]
    assert p["k"]["ci_low"] <= 4.0 <= p["k"]["ci_high"]
    assert abs(p["x0"]["value"] - 0.3) < 0.05


def test_predictions_never_fall_below_the_chance_floor():
    xs = np.geomspace(1e-3, 1, 50)
    for name, form in FORMS.items():
        grid = [g[0] for g in form.grid(np.array([0.9]), 0.25)]
        assert np.all(form.predict(xs, np.array(grid), 0.25) >= 0.25 - 1e-12), name


def test_collapse_point_recovered_on_a_synthetic_broken_curve():
    # General knowledge flat-ish down to a ratio of 0.45, then collapsing to the 0.25 floor.
    rng = np.random.default_rng(2)
    f = FORMS["broken_power_law"]
    true_break = 0.45
    th = np.array([np.log(0.3), 0.1, 3.0, np.log(true_break)])
    xs = np.linspace(0.12, 1.0, 12)
    ys = f.predict(xs, th, 0.25)
    df = _long("compression_ratio", xs, ys, 0.006, 5, rng, metric="mmlu", dataset_size=1000)
    groups, _ = fit_table(df, ["mmlu"], ["broken_power_law", "saturating_power_law"],
                          ["compression_ratio"], bootstrap_samples=80, seed=3)
    assert len(groups) == 1
    rec = next(r for r in fits_records(groups) if r["form"] == "saturating_power_law")
    cp = rec["collapse_point"]  # reported next to every form of a general-knowledge metric
    assert cp["ci_low"] <= true_break <= cp["ci_high"]
    assert abs(cp["value"] - true_break) < 0.08
    assert cp["ci_high"] - cp["ci_low"] < 0.3


def test_extrapolation_error_is_the_rmse_on_held_out_points():
    f = FORMS["saturating_power_law"]
    xs = np.geomspace(1e2, 1e5, 8)
    ys = 0.9 - 2.0 * xs ** -0.5
    hold = xs > 2e4
    # Noise-free data from the form itself: extrapolation is exact.
    assert extrapolation_error(f, xs, ys, np.full(8, 0.01), FLOOR, hold) < 1e-3
    # Shift the held-out points: the error is exactly that shift.
    y2 = ys.copy()
    y2[hold] -= 0.05
    err = extrapolation_error(f, xs, y2, np.full(8, 0.01), FLOOR, hold)
    assert err == pytest.approx(0.05, abs=2e-3)
    # Nothing held out, or too few points left: no error can be computed.
    assert extrapolation_error(f, xs, ys, np.full(8, 0.01), FLOOR, np.zeros(8, bool)) is None
    assert extrapolation_error(f, xs, ys, np.full(8, 0.01), FLOOR, xs > 200) is None


def test_inverse_prediction_brackets_the_truth():
    rng = np.random.default_rng(4)
    f = FORMS["saturating_power_law"]
    xs = np.geomspace(1e3, 1e5, 10)
    ys = 0.95 - 3.0 * xs ** -0.35
    y = ys + rng.normal(0, 0.005, len(xs))
    sig = np.full_like(y, 0.005)
    r = bootstrap(fit_form(f, xs, y, sig, FLOOR), xs, y, sig, np.arange(10), 80, seed=5)
    target = 0.85
    true_x = (3.0 / (0.95 - target)) ** (1 / 0.35)
    inv = inverse_with_ci(r, target, 1e2, 1e7)
    assert inv["ci_low"] <= true_x <= inv["ci_high"]
    assert inv["value"] == pytest.approx(true_x, rel=0.3)
    # An unreachable target (above the asymptote) has no answer.
    assert inverse_with_ci(r, 0.999, 1e2, 1e7)["value"] is None


def test_sigma_from_ci_fills_missing_intervals():
    s = sigma_from_ci([0.5, 0.6, 0.7], [0.45, np.nan, 0.7], [0.55, np.nan, 0.7])
    assert s[0] == pytest.approx(0.1 / 3.919928, rel=1e-4)
    assert s[1] == s[0] and s[2] == s[0]


def test_write_fits_has_exactly_the_interface_keys(tmp_path):
    rng = np.random.default_rng(6)
    ratios = np.array([1.0, 0.79, 0.58, 0.37, 0.16])
    parts = []
    for metric, floor in (("macro_f1", FLOOR), ("mmlu", 0.25)):
        ys = floor + (0.9 - floor) * ratios ** 0.5
        parts.append(_long("compression_ratio", ratios, ys, 0.01, 1, rng, metric=metric,
                           dataset_size=500))
    df = pd.concat(parts)
    # The teacher row has no method: it anchors every compression group.
    df.loc[df.compression_ratio == 1.0, ["method", "supervision", "schedule"]] = "none"
    groups, skipped = fit_table(df, None, None, None, num_classes=35, bootstrap_samples=10)
    records = write_fits(groups, skipped, tmp_path, {"macro_f1": [0.6]}, "fixture")
    loaded = json.loads((tmp_path / "fits.json").read_text())
    assert loaded == json.loads(json.dumps(records))
    base = {"metric", "x", "group", "form", "params", "aic", "rmse", "extrapolation_error"}
    for rec in loaded:
        want = base | ({"collapse_point"} if rec["metric"] == "mmlu" else set())
        assert set(rec) == want
        assert rec["group"] == {"method": "logit_kd", "supervision": "label",
                                "schedule": "one_shot", "dataset_size": 500}
        for p in rec["params"].values():
            assert set(p) == {"value", "ci_low", "ci_high"}
    assert {r["form"] for r in loaded} == set(FORMS)
    md = (tmp_path / "fits.md").read_text()
    assert "macro_f1 vs compression_ratio" in md and "★" in md
    # Only one dataset size: the dataset-size curve is listed as not fitted, with its reason.
    assert "distinct dataset_size" in md


def test_bad_tables_fail_with_one_line_naming_the_file(tmp_path):
    p = tmp_path / "r.csv"
    pd.DataFrame({"metric": ["macro_f1"], "value": [0.5]}).to_csv(p, index=False)
    with pytest.raises(ResultsTableError, match=r"r\.csv: missing column\(s\): compression_ratio"):
        read_results(p)
    with pytest.raises(ResultsTableError, match="not found"):
        read_results(tmp_path / "nope.parquet")
    df = normalize_results(pd.DataFrame({"metric": ["a"], "value": ["x"], "dataset_size": [1]}))
    assert np.isnan(df.value.iloc[0]) and df.method.iloc[0] == "none"


def test_general_knowledge_targets_are_relative_to_the_teachers_score():
    from distillscale.fit.table import detail_records

    # A teacher at 0.40 on the probe; students fall from there. "0.3" would be a level this
    # teacher barely clears; 0.9 of its own score is 0.36.
    rng = np.random.default_rng(4)
    xs = np.linspace(0.2, 0.9, 8)
    ys = 0.25 + 0.15 * xs ** 2
    students = _long("compression_ratio", xs, ys, 0.004, 5, rng, metric="probe", dataset_size=500)
    teacher = pd.DataFrame([{"model": "teacher", "compression_ratio": 1.0, "metric": "probe",
                             "value": 0.40, "ci_low": 0.39, "ci_high": 0.41, "seed": s,
                             "method": "none", "supervision": "none", "schedule": "none",
                             "dataset_size": 500} for s in range(5)])
    groups, _ = fit_table(pd.concat([teacher, students], ignore_index=True), ["probe"],
                          ["saturating_power_law"], ["compression_ratio"], bootstrap_samples=30)
    students_curve = [g for g in groups if g.group.get("method") == "logit_kd"]
    assert students_curve
    # The default relative targets: the probe's level is 0.9 of the teacher's own score.
    (d,) = detail_records(students_curve, {"probe": [0.3]}, FitConfig().relative_targets)
    absolute, relative = d["inverse"]
    assert absolute["target"] == pytest.approx(0.3) and absolute["target_label"] == "0.3"
    assert relative["target"] == pytest.approx(0.36)
    assert relative["target_label"] == "0.360 (0.9 of the teacher's 0.400)"
    # The level is reached inside the measured range: 0.25 + 0.15 x^2 = 0.36 at x = 0.856.
    assert relative.get("why_not") is None, relative
    assert abs(relative["value"] - 0.856) < 0.1
    # No teacher in a curve (a dataset-size curve): no relative level is asked of it.
    data_curve = _long("dataset_size", [100, 300, 1000, 3000], [0.3, 0.33, 0.35, 0.36], 0.004, 3,
                       rng, metric="probe", compression_ratio=0.5)
    groups, _ = fit_table(data_curve, ["probe"], ["saturating_power_law"], ["dataset_size"],
                          bootstrap_samples=10)
    (d,) = detail_records(groups, {}, {"probe": [0.9]})
    assert d["inverse"] == []


def test_an_estimate_whose_ci_leaves_the_measured_range_is_not_reported():
    from distillscale.fit.table import supported_estimate

    inside = {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7}
    assert supported_estimate(inside, 0.16, 1.0) is None
    # The grid's broken power laws gave breaks such as 0.49 [0.0216, 2]: bounded by nothing.
    for ci in ((0.0216, 0.7), (0.3, 2.0)):
        why = supported_estimate({"value": 0.49, "ci_low": ci[0], "ci_high": ci[1]}, 0.16, 1.0)
        assert why and "reaches beyond the measured range" in why
    assert "outside the measured range" in supported_estimate(
        {"value": 0.1, "ci_low": 0.05, "ci_high": 0.2}, 0.16, 1.0)


def test_the_probe_is_a_general_knowledge_metric_with_its_choices_as_floor(tmp_path):
    write_knowledge_probe(tmp_path, 0, 12, countries=20, arithmetic=10, conversions=10)
    choices = {len(c) for c in pd.read_parquet(tmp_path / "test.parquet")["choices"]}
    assert chance_floor("probe") == pytest.approx(1 / choices.pop()) and not choices
    assert is_general("probe") and is_bounded("probe")
    assert metric_label("probe") == "knowledge probe (synthetic)" and metric_label("mmlu") == "mmlu"
    fc = FitConfig()
    assert "probe" in fc.metrics and fc.relative_targets["probe"] == [0.9]
