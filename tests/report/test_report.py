"""The report from a fixture results table: every figure family the data has, with the right
number of series, real images, fitted bands, and recommendations."""

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from distillscale.cli import main
from distillscale.fit import read_results

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_long.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    fit_dir = out / "fit"
    assert main(["fit", "--results", str(FIXTURE), "--out", str(fit_dir), "--num-classes", "35",
                 "fit.bootstrap_samples=10", "fit.x=compression_ratio"]) == 0
    assert main(["report", "--results", str(FIXTURE), "--fits", str(fit_dir),
                 "--out", str(out), "--num-classes", "35"]) == 0
    return out


def test_each_figure_family_with_the_right_series(built):
    figs = json.loads((built / "plots" / "figures.json").read_text())
    got = {(f["family"], f["metric"]): f["series"] for f in figs}
    for metric in ("macro_f1", "mmlu"):
        # 3 conditions x 4 students, plus the teacher
        assert len(got[("vs_dataset_size", metric)]) == 13
        # non-decayed schedules only; label and blended_cot side by side, 3 dataset sizes each
        comp = got[("vs_compression", metric)]
        assert len(comp) == 6
        assert {s.split(":")[0] for s in comp} == {"label", "blended_cot"}
        sched = got[("decayed_vs_uniform", metric)]
        assert len(sched) == 9 and sum("decayed" in s for s in sched) == 3
    for f in figs:
        img = mpimg.imread(built / f["path"])
        assert img.shape[0] > 300 and np.std(img) > 0.02, f["path"]


def test_report_md_and_self_contained_html(built):
    md = (built / "report.md").read_text()
    assert md.count("![") == 6
    assert "## Recommendations" in md and "can compress to **" in md
    # The label format's MMLU breaks near 0.5, blended CoT's near 0.35 (fixture curves); with
    # five ratios per curve and point resampling the bootstrap cannot move the break, so every
    # collapse point is named with its break and the reason it is not stated as a finding.
    cps = [float(x) for x in re.findall(r"mmlu collapses below a compression ratio of \*\*([\d.]+)", md)]
    withheld = re.findall(r"mmlu collapse point for .*: not enough signal \((.*)\)", md)
    assert len(cps) + len(withheld) == 9
    assert all("CI" in w for w in withheld)
    assert all(0.25 < c < 0.6 for c in cps)
    fits = json.loads((built / "fit" / "fits.json").read_text())
    breaks = [f["collapse_point"]["value"] for f in fits
              if f["form"] == "broken_power_law" and f["metric"] == "mmlu"]
    assert len(breaks) == 9 and min(breaks) > 0.25 and max(breaks) < 0.6
    assert "## Findings of the paper" in md
    page = (built / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert 'src="plots/' not in page and "<table>" in page


def test_fits_cover_every_condition(built):
    fits = json.loads((built / "fit" / "fits.json").read_text())
    long = read_results(FIXTURE)
    groups = {json.dumps(f["group"], sort_keys=True) for f in fits if f["metric"] == "macro_f1"}
    assert len(groups) == 3 * 3  # conditions x dataset sizes
    assert len(long) == 2 * 3 * (1 + 3 * 4)


def test_a_probe_only_table_is_reported_as_the_probe_and_never_as_mmlu(tmp_path):
    # The fixture's general-knowledge rows as a run that scored only the synthetic probe.
    long = read_results(FIXTURE)
    long = long.assign(metric=long["metric"].replace({"mmlu": "probe"}))
    src = tmp_path / "results_long.csv"
    long.to_csv(src, index=False)
    fit_dir = tmp_path / "fit"
    assert main(["fit", "--results", str(src), "--out", str(fit_dir), "--num-classes", "35",
                 "fit.bootstrap_samples=5", "fit.x=compression_ratio",
                 "fit.forms=[broken_power_law]"]) == 0
    assert main(["report", "--results", str(src), "--fits", str(fit_dir),
                 "--out", str(tmp_path), "--num-classes", "35"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "mmlu" not in md.lower()
    assert "knowledge probe (synthetic) [95% CI]" in md  # the results table's column
    assert "### knowledge probe (synthetic) vs compression ratio" in md
    assert {f["metric"] for f in json.loads((fit_dir / "fits.json").read_text())} >= {"probe"}
    found = json.loads((tmp_path / "findings.json").read_text())
    assert any(f["quantity"].startswith("ratio where probe lost") for f in found)
