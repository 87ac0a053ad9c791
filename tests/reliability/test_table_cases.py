"""`fit` / `report` on results tables: the first setting is a setting, bad folders and class
counts are one line, and degenerate tables give no confident claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distillscale.fit.screen import screen_results
from distillscale.fit.table import normalize_results

pytestmark = pytest.mark.reliability

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_long.csv"
FAST = ["fit.bootstrap_samples=5", "fit.forms=[saturating_power_law]"]


def _fit(cli, results, out, *settings):
    return cli("fit", *settings, "--results", results, "--out", out, "--num-classes", "35")


def test_first_setting_is_not_swallowed_as_config(cli, tmp_path):
    r = _fit(cli, FIXTURE, tmp_path, "fit.metrics=[mmlu]", *FAST)
    assert r.rc == 0, r.err
    metrics = {f["metric"] for f in json.loads((tmp_path / "fits.json").read_text())}
    assert metrics == {"mmlu"}


def test_report_first_setting_is_a_setting(cli, tmp_path):
    r = cli("report", "fit.metrics=[mmlu]", "--results", FIXTURE, "--out", tmp_path,
            "--num-classes", "35")
    assert r.rc == 0, r.err


def test_config_and_results_together_is_ambiguous(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    r = _fit(cli, FIXTURE, tmp_path / "o", cfg)
    assert r.rc == 2 and "give CONFIG or --results, not both" in r.err


@pytest.mark.parametrize("value", ["0", "-3", "1", "many"])
def test_num_classes_must_be_a_count(cli, tmp_path, value):
    r = cli("fit", "--results", FIXTURE, "--out", tmp_path, "--num-classes", value)
    assert r.rc == 2 and "--num-classes" in r.err and "Traceback" not in r.err


def test_mistyped_fits_folder(cli, tmp_path):
    r = cli("report", "--results", FIXTURE, "--out", tmp_path, "--fits", tmp_path / "fitz")
    assert r.rc == 2 and "--fits" in r.err and "no such folder" in r.err


@pytest.mark.parametrize("case", ["missing", "extension", "no-value-column", "not-parquet",
                                  "unknown-setting", "neither"])
def test_bad_table_command_is_one_line(cli, tmp_path, case):
    args = {"missing": ["--results", tmp_path / "none.csv", "--out", tmp_path],
            "extension": ["--results", tmp_path / "t.txt", "--out", tmp_path],
            "no-value-column": ["--results", tmp_path / "t.csv", "--out", tmp_path],
            "not-parquet": ["--results", tmp_path / "t.parquet", "--out", tmp_path],
            "unknown-setting": ["fit.nope=1", "--results", FIXTURE, "--out", tmp_path],
            "neither": []}[case]
    (tmp_path / "t.txt").write_text("x")
    (tmp_path / "t.csv").write_text("metric,compression_ratio\nmmlu,0.5\n")
    (tmp_path / "t.parquet").write_bytes(b"PAR1 nope")
    r = cli("fit", *args)
    assert r.rc == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1


def _table() -> pd.DataFrame:
    return normalize_results(pd.read_csv(FIXTURE))


def test_all_equal_values_give_no_collapse_point(cli, tmp_path):
    df = _table()
    df.loc[df["metric"] == "mmlu", ["value", "ci_low", "ci_high"]] = 0.3
    src = tmp_path / "flat.csv"
    df.to_csv(src, index=False)
    r = _fit(cli, src, tmp_path / "o", *FAST)
    assert r.rc == 0, r.err
    fits = json.loads((tmp_path / "o" / "fits.json").read_text())
    assert fits and not [f for f in fits if f["metric"] == "mmlu"]
    skipped = json.loads((tmp_path / "o" / "fits_detail.json").read_text())["skipped"]
    assert any("values equal" in s["reason"] for s in skipped if s["metric"] == "mmlu")


@pytest.mark.parametrize("case,edit,reason", [
    ("inf-value", lambda d: d.assign(value=d["value"].where(d.index != 3, np.inf)),
     "value inf is not finite"),
    ("minus-inf-x", lambda d: d.assign(compression_ratio=d["compression_ratio"].where(
        d.index != 3, -np.inf)), "compression_ratio -inf is not finite"),
    ("above-one", lambda d: d.assign(value=d["value"].where(d.index != 3, 73.5)),
     "is outside [0, 1]"),
    ("negative", lambda d: d.assign(value=d["value"].where(d.index != 3, -0.2)),
     "is outside [0, 1]"),
    ("inverted-ci", lambda d: d.assign(ci_low=d["ci_low"].where(d.index != 3, 0.99)),
     "inverted CI"),
    ("duplicated-row", lambda d: pd.concat([d, d.iloc[[3]]], ignore_index=True),
     "the same row given again"),
    ("conflicting-row", lambda d: pd.concat(
        [d, d.iloc[[3]].assign(value=0.01)], ignore_index=True), "a different value"),
])
def test_degenerate_rows_are_set_aside_with_a_reason(case, edit, reason):
    df = _table()
    kept, skipped = screen_results(edit(df))
    assert any(reason in s["reason"] for s in skipped), skipped
    # A repeated row loses its copy; a conflicting one takes the original with it.
    assert len(kept) == len(df) - (0 if case == "duplicated-row" else 1)
    assert np.isfinite(kept[["value", "compression_ratio"]].to_numpy(float)).all()


def test_one_student_name_in_two_sweep_cells_is_two_models():
    # A sweep names each cell's students alike: the same name with another value in another
    # cell is another model, not a conflict (a conflict within one cell still is).
    df = _table()
    a = df.assign(cell="n750-label")
    b = df.assign(cell="n750-cot_long", value=df["value"] * 0.9)
    kept, skipped = screen_results(pd.concat([a, b], ignore_index=True))
    assert len(kept) == 2 * len(df) and not skipped, skipped
    bad = pd.concat([a, a.iloc[[3]].assign(value=0.01)], ignore_index=True)
    kept, skipped = screen_results(bad)
    assert any("a different value" in s["reason"] for s in skipped)


def test_duplicated_rows_are_counted_once_in_the_fit(cli, tmp_path):
    df = _table()
    doubled = pd.concat([df, df], ignore_index=True)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    df.to_csv(a, index=False)
    doubled.to_csv(b, index=False)
    assert _fit(cli, a, tmp_path / "oa", *FAST).rc == 0
    r = _fit(cli, b, tmp_path / "ob", *FAST)
    assert r.rc == 0 and "set aside before fitting" in r.err
    fa = json.loads((tmp_path / "oa" / "fits.json").read_text())
    fb = json.loads((tmp_path / "ob" / "fits.json").read_text())
    assert [f["params"] for f in fa] == [f["params"] for f in fb]


def test_table_with_nothing_fittable_is_one_line(cli, tmp_path):
    df = _table().assign(value=5.0)
    src = tmp_path / "bad.csv"
    df.to_csv(src, index=False)
    r = _fit(cli, src, tmp_path / "o", *FAST)
    assert r.rc == 2 and "no rows left to fit" in r.err and "Traceback" not in r.err
