"""Sweep grids: expansion into cells, shared upstreams, skipping done cells, gathering results."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from distillscale.config import ConfigError, load_config
from distillscale.launch.sweep import DONE_MARKER, collect_results, mark_done, plan_sweep

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "conf/experiments/quickstart.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name the taxonomy relative to the repository


def _sweep(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(f"name: g\nbase: {QUICKSTART}\noutput_dir: {tmp_path / 'out'}\n{body}")
    return p


def test_grid_expands_to_the_product_and_shares_upstreams(tmp_path):
    plan = plan_sweep(_sweep(tmp_path, "dataset_sizes: [500, 900]\n"
                                       "compression_ratios: [0.6, 0.3]\naxes: [width, depth]\n"))
    cells = plan["cells"]
    assert len(cells) == 8 and plan["pending_cells"] == 8
    assert len({c["id"] for c in cells}) == 8
    assert len(plan["upstreams"]) == 2 and plan["pending_upstreams"] == 2
    for c in cells:
        cfg = load_config(c["config"])
        size = cfg.data.num_examples
        assert c["upstream"].startswith(f"n{size}-")
        (student,) = cfg.students
        assert c["id"] == f"n{size}-{student.axis}{student.compression_ratio:g}-logit_kd-label-one_shot"
        link = Path(c["dir"]) / "teacher"
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (Path(c["dir"]).parents[1] / "upstream" / c["upstream"]
                                  / "teacher").resolve()
    # The upstream config is the cell's minus its students, in its own folder.
    up = load_config(plan["upstreams"][0]["config"])
    assert up.students == [] and str(up.run_dir).endswith(plan["upstreams"][0]["key"])
    # The hashes the stages use agree between a cell and its upstream: the cell skips them.
    cell = load_config(cells[0]["config"])
    assert cell.section_hash("domain", "data", "seed") == up.section_hash("domain", "data", "seed")
    assert cell.section_hash("domain", "teacher", "seed") == up.section_hash("domain", "teacher",
                                                                             "seed")


def test_done_cells_are_skipped_until_their_config_changes(tmp_path):
    sweep = _sweep(tmp_path, "dataset_sizes: [500]\ncompression_ratios: [0.6, 0.3]\n")
    plan = plan_sweep(sweep)
    done = load_config(plan["cells"][0]["config"])
    mark_done(done)
    again = plan_sweep(sweep)
    assert again["pending_cells"] == 1
    assert Path(again["cell_list"]).read_text().split() == [plan["cells"][1]["config"]]
    # An override that changes the results invalidates the marker.
    changed = plan_sweep(sweep, ["distill.train.steps=7"])
    assert changed["pending_cells"] == 2


def test_bad_sweep_values_name_the_file_cell_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"grid.yaml: cell n500-width0.5-nope-label-one_shot: "
                                          r"distill.method"):
        plan_sweep(_sweep(tmp_path, "dataset_sizes: [500]\ncompression_ratios: [0.5]\n"
                                    "methods: [nope]\n"))
    with pytest.raises(ConfigError, match="grid.yaml: compression_ratios.0"):
        plan_sweep(_sweep(tmp_path, "dataset_sizes: [500]\ncompression_ratios: [1.5]\n"))
    with pytest.raises(ConfigError, match="grid.yaml: dataset_size: unknown key"):
        plan_sweep(_sweep(tmp_path, "dataset_size: [500]\ncompression_ratios: [0.5]\n"))


def _results(model: str, ratio: float, value: float) -> pd.DataFrame:
    return pd.DataFrame({"model": [model], "compression_ratio": [ratio], "metric": ["macro_f1"],
                         "value": [value], "ci_low": [value - 0.1], "ci_high": [value + 0.1],
                         "dataset_size": [500], "manifest_hash": [f"h{ratio}"]})


def test_collect_gathers_finished_cells_once_per_teacher(tmp_path):
    root = tmp_path / "sweep"
    for name, ratio, done in (("a", 0.5, True), ("b", 0.25, True), ("c", 0.1, False)):
        (root / "cells" / name / "eval").mkdir(parents=True)
        pd.concat([_results("teacher", 1.0, 0.9), _results(f"s{name}", ratio, 0.5)]).to_parquet(
            root / "cells" / name / "eval" / "results.parquet")
        if done:
            (root / "cells" / name / DONE_MARKER).write_text("{}")
    table = pd.read_parquet(collect_results(root))
    assert sorted(table["model"]) == ["sa", "sb", "teacher"]  # one teacher row, no unfinished c
    assert set(table["cell"]) == {"a", "b"}
    assert (root / "results_long.csv").is_file()
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        collect_results(tmp_path / "empty")


def test_paper_grid_has_the_papers_chain_and_shares_upstreams_across_formats(tmp_path):
    import yaml

    from distillscale.prune.schedule import schedule_ratios

    grid = yaml.safe_load((REPO / "conf/sweeps/paper_grid.yaml").read_text())
    grid.update(output_dir=str(tmp_path / "out"), base=str(QUICKSTART))
    path = tmp_path / "paper_grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    plan = plan_sweep(path)
    assert len(grid["dataset_sizes"]) >= 3 and len(grid["seeds"]) >= 2
    assert {"uniform", "decayed"} <= set(grid["schedules"])
    assert set(grid["supervisions"]) == {"label", "cot_short", "cot_long", "blended_cot"}
    assert set(grid["methods"]) == {"logit_kd", "lora_kd"}
    # Every format and method of one size and seed shares one data/teacher/supervision setup.
    assert len(plan["upstreams"]) == len(grid["dataset_sizes"]) * len(grid["seeds"])
    assert len(plan["cells"]) == len(plan["upstreams"]) * 2 * 4 * 2
    cell = load_config(plan["cells"][0]["config"])
    assert cell.prune.steps == 4 and cell.students[0].compression_ratio == 0.16
    assert schedule_ratios(0.16, "uniform", cell.prune.steps) == [0.79, 0.58, 0.37, 0.16]
    seeds = {load_config(c["config"]).seed for c in plan["cells"]}
    assert seeds == set(grid["seeds"])
    for c in plan["cells"][:3]:
        for stage in ("data", "teacher", "supervision"):
            assert (Path(c["dir"]) / stage).is_symlink()


def test_sweep_fit_uses_the_sweeps_fit_settings(tmp_path):
    import json

    from distillscale.launch.commands import _fit_sweep

    root = tmp_path / "sweep"
    points = [("teacher", 1.0, 0.95), ("s8", 0.8, 0.9), ("s6", 0.6, 0.8), ("s4", 0.4, 0.6),
              ("s2", 0.2, 0.3)]
    for name, ratio, value in points:
        (root / "cells" / name / "eval").mkdir(parents=True)
        rows = [_results(m, r, v).assign(metric=metric, value=v * scale,
                                          ci_low=v * scale - 0.05, ci_high=v * scale + 0.05)
                for m, r, v in (("teacher", 1.0, 0.95), (name, ratio, value))
                for metric, scale in (("macro_f1", 1.0), ("accuracy", 1.02))]
        pd.concat(rows).to_parquet(root / "cells" / name / "eval" / "results.parquet")
        (root / "cells" / name / DONE_MARKER).write_text("{}")
    cfg = load_config(QUICKSTART, [f"output_dir={root}", "fit.metrics=[accuracy]",
                                   "fit.bootstrap_samples=5"])
    assert _fit_sweep(cfg) == 0
    fitted = {r["metric"] for r in json.loads((root / "fit" / "fits.json").read_text())}
    assert fitted == {"accuracy"}, fitted
