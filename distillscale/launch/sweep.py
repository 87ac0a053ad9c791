"""Experiment grids: dataset sizes x compression ratios x method x supervision x schedule.

A sweep file names a base experiment and the values of each axis:

    name: quickstart_grid
    base: ../experiments/quickstart.yaml      # relative to this file
    overrides: [teacher.train.steps=200]      # applied to every cell
    dataset_sizes: [1000, 3000]               # data.num_examples
    compression_ratios: [0.5, 0.25]           # one student per cell
    axes: [width]                             # pruning axis (width / depth)
    methods: [logit_kd]                       # distill.method
    supervisions: [label]                     # distill.supervision
    schedules: [one_shot]                     # prune.schedule

`plan_sweep` expands it into cells, each a fully resolved `config.yaml` in its own run folder,
and groups the cells by their *upstream* (data + teacher), which cells with the same dataset
and teacher share through symlinks instead of rebuilding it. Cells whose results exist with
the same config are skipped. The plan is a few text files the Slurm array tasks index by
`SLURM_ARRAY_TASK_ID`:

    <root>/plan/upstream.txt   one config per data/teacher array task
    <root>/plan/cells.txt      one config per prune_distill/eval array task (pending cells only)
    <root>/plan/plan.json      every cell with its status, for people and tests
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from rich.progress import Progress

from distillscale.config import (
    CMDLINE,
    ConfigError,
    ExperimentConfig,
    Strict,
    config_to_yaml,
    load_config,
    load_yaml_model,
)
from distillscale.manifest import MANIFEST, atomic_path, write_json_atomic, write_text_atomic

DONE_MARKER = "launch_done.json"
# The sections whose values decide a cell's results; `launch` and `output_dir` only decide
# where it runs.
RESULT_SECTIONS = ("domain", "data", "teacher", "students", "prune", "distill", "eval", "fit",
                   "seed")
# What the shared data + teacher + supervision folders depend on; cells differing only
# downstream of the teacher share one upstream.
UPSTREAM_SECTIONS = ("domain", "data", "teacher", "seed")
# The stage folders a cell links from its upstream.
UPSTREAM_STAGES = ("data", "teacher", "supervision")


class SweepConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    base: str
    overrides: list[str] = Field(default_factory=list)
    output_dir: str | None = None  # default: runs/sweeps/<name>
    dataset_sizes: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    compression_ratios: list[Annotated[float, Field(gt=0, lt=1)]] = Field(min_length=1)
    axes: list[Literal["width", "depth"]] = Field(default=["width"], min_length=1)
    methods: list[str] = Field(default=["logit_kd"], min_length=1)
    supervisions: list[str] = Field(default=["label"], min_length=1)
    schedules: list[str] = Field(default=["one_shot"], min_length=1)
    # Repeats of every cell with another seed (data, teacher and students); unset: the base
    # experiment's seed only. Paired seeds are what the report's findings compare.
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    sweep = load_yaml_model(path, SweepConfig, "sweep")
    base = Path(sweep.base)
    if not base.is_absolute():
        base = path.parent / base
    return sweep.model_copy(update={"base": str(base)})


def cell_id(size: int, ratio: float, axis: str, method: str, supervision: str, schedule: str,
            seed: int | None = None) -> str:
    cid = f"n{size}-{axis}{ratio:g}-{method}-{supervision}-{schedule}"
    return cid if seed is None else f"{cid}-s{seed}"


def result_hash(cfg: ExperimentConfig) -> str:
    return cfg.section_hash(*RESULT_SECTIONS)


def is_cell_done(cfg: ExperimentConfig) -> bool:
    marker = cfg.run_dir / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("result_hash") == result_hash(cfg)
    except json.JSONDecodeError:
        return False


def mark_done(cfg: ExperimentConfig) -> Path:
    """Record that a run's results are complete for exactly this config (the eval job's last act)."""
    marker = cfg.run_dir / DONE_MARKER
    write_json_atomic(marker, {"result_hash": result_hash(cfg),
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return marker


def _upstream_hash(cfg: ExperimentConfig) -> str:
    # The supervision stage writes every depth of teacher.supervision for every format, so
    # cells that differ in distill.supervision share one upstream.
    return hashlib.sha256(cfg.section_hash(*UPSTREAM_SECTIONS).encode()).hexdigest()[:8]


def _upstream_done(folder: Path) -> bool:
    return all((folder / stage / MANIFEST).is_file() for stage in UPSTREAM_STAGES)


def _link(link: Path, target: Path) -> None:
    """Point `link` at `target` (relative, so the tree can move); an existing real folder wins."""
    if link.is_symlink():
        if os.readlink(link) == os.path.relpath(target, link.parent):
            return
        link.unlink()
    elif link.exists():
        return  # the cell built its own copy earlier; keep it
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def plan_sweep(path: str | Path, extra_overrides: list[str] | None = None) -> dict:
    """Expand a sweep file into cell configs and the array task lists. Returns the plan."""
    sweep = load_sweep(path)
    root = Path(sweep.output_dir or f"runs/sweeps/{sweep.name}")
    cells, upstreams = [], {}
    grid = itertools.product(sweep.seeds or [None], sweep.dataset_sizes, sweep.compression_ratios,
                             sweep.axes, sweep.methods, sweep.supervisions, sweep.schedules)
    for seed, size, ratio, axis, method, supervision, schedule in grid:
        cid = cell_id(size, ratio, axis, method, supervision, schedule, seed)
        student = {"name": f"{axis}_{ratio:g}", "axis": axis, "compression_ratio": ratio}
        overrides = [
            *sweep.overrides, *(extra_overrides or []),
            f"name={sweep.name}-{cid}", f"data.num_examples={size}",
            f"students={json.dumps([student])}", f"distill.method={method}",
            f"distill.supervision={supervision}", f"prune.schedule={schedule}",
            f"output_dir={root / 'cells' / cid}",
            *([] if seed is None else [f"seed={seed}"]),
        ]
        try:
            cfg = load_config(sweep.base, overrides)
        except ConfigError as e:
            # Name the cell: the overrides came from the sweep file, not the command line.
            raise ConfigError(f"{path}: cell {cid}: {str(e).replace(CMDLINE + ': ', '')}") from None
        ukey = f"n{size}-{_upstream_hash(cfg)}" + ("" if seed is None else f"-s{seed}")
        udir = root / "upstream" / ukey
        if ukey not in upstreams:
            ucfg = cfg.model_copy(update={"output_dir": str(udir), "students": [],
                                          "name": f"{sweep.name}-{ukey}"})
            upstreams[ukey] = {"key": ukey, "dir": str(udir), "config": str(udir / "config.yaml"),
                               "done": _upstream_done(udir), "cfg": ucfg}
        cells.append({"id": cid, "dir": str(cfg.run_dir), "config": str(cfg.run_dir / "config.yaml"),
                      "upstream": ukey, "done": is_cell_done(cfg), "cfg": cfg})

    pending = [c for c in cells if not c["done"]]
    needed = {c["upstream"] for c in pending}
    pending_up = [u for k, u in upstreams.items() if k in needed and not u["done"]]
    for u in upstreams.values():
        if u["key"] in needed:
            write_text_atomic(Path(u["config"]), config_to_yaml(u["cfg"]))
    for c in pending:
        write_text_atomic(Path(c["config"]), config_to_yaml(c["cfg"]))
        udir = Path(upstreams[c["upstream"]]["dir"])
        for stage in UPSTREAM_STAGES:
            _link(Path(c["dir"]) / stage, udir / stage)
    plan_dir = root / "plan"
    write_text_atomic(plan_dir / "upstream.txt", "".join(u["config"] + "\n" for u in pending_up))
    write_text_atomic(plan_dir / "cells.txt", "".join(c["config"] + "\n" for c in pending))
    plan = {
        "sweep": str(path), "root": str(root), "base": sweep.base,
        "upstream_list": str(plan_dir / "upstream.txt"), "cell_list": str(plan_dir / "cells.txt"),
        "cells": [{k: v for k, v in c.items() if k != "cfg"} for c in cells],
        "upstreams": [{k: v for k, v in u.items() if k != "cfg"} for u in upstreams.values()],
        "pending_cells": len(pending), "pending_upstreams": len(pending_up),
        "fit_config": str(root / "fit.yaml"),
    }
    # The fit job's config: the base experiment with the sweep root as its run folder.
    base_cfg = load_config(sweep.base, [*sweep.overrides, *(extra_overrides or []),
                                        f"name={sweep.name}", f"output_dir={root}"])
    write_text_atomic(root / "fit.yaml", config_to_yaml(base_cfg))
    write_json_atomic(plan_dir / "plan.json", plan)
    return plan


def run_sweep_here(plan: dict) -> None:
    """Every pending upstream and cell of `plan`, in turn, in this one process (the `--local`
    path of launchers/sweep.sh): the same stages the Slurm array tasks run, without paying the
    stack's start-up (about 20 s of imports) once per cell and stage. A cell's own fit and report
    are left to the sweep's fit, which covers every cell together."""
    from distillscale import pipeline

    ups = [u for u in plan["upstreams"] if not u["done"]
           and any(c["upstream"] == u["key"] and not c["done"] for c in plan["cells"])]
    cells = [c for c in plan["cells"] if not c["done"]]
    with Progress(transient=False) as progress:
        task = progress.add_task("sweep", total=len(ups) + len(cells))
        for u in ups:
            cfg = load_config(u["config"])
            progress.update(task, description=f"upstream {u['key']}")
            pipeline.run_data(cfg)
            pipeline.run_teacher(cfg)
            progress.advance(task)
        for c in cells:
            cfg = load_config(c["config"])
            progress.update(task, description=f"cell {c['id']}")
            for s in cfg.students:
                pipeline.run_distill(cfg, s)
            pipeline.run_eval(cfg)
            mark_done(cfg)
            progress.advance(task)


def collect_results(root: Path) -> Path:
    """Concatenate every finished cell's long results into `<root>/results.parquet` (+ `.csv`).

    The table keeps the eval stage's long schema with a `cell` column added, so the fit and
    report commands read it like any other results table (`distillscale fit --results ...`).
    """
    # heavy: pandas, only where a table is read or written
    import pandas as pd

    frames = []
    for cell in sorted((root / "cells").glob("*")):
        res = cell / "eval" / "results.parquet"
        if (cell / DONE_MARKER).is_file() and res.is_file():
            df = pd.read_parquet(res)
            df["cell"] = cell.name
            frames.append(df)
    if not frames:
        raise FileNotFoundError(f"{root}/cells: no finished cell (no {DONE_MARKER} with results)")
    long = pd.concat(frames, ignore_index=True)
    # Every cell of a dataset size evaluates the same teacher: keep one row of each.
    same = [c for c in long.columns if c not in ("cell", "manifest_hash")]
    long = long.drop_duplicates(subset=same).reset_index(drop=True)
    for name, write in (("results.parquet", lambda p: long.to_parquet(p, index=False)),
                        ("results_long.csv", lambda p: long.to_csv(p, index=False))):
        with atomic_path(root / name) as tmp:
            write(tmp)
    return root / "results.parquet"
