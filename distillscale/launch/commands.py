"""`distillscale launch ...`: what the shell launchers ask the library.

    distillscale launch plan KIND CONFIG [key=value ...] [--nodes N --gpus-per-node G ...]
        print the checked launch plan as `DS_*=value` shell assignments (exit 2 on a mismatch)
    distillscale launch stage {data,teacher,eval,fit} CONFIG [key=value ...]
        run one stage of an experiment (eval also writes the report and marks the run done;
        fit on a sweep's fit.yaml gathers every finished cell and fits them together)
    distillscale launch sweep SWEEP.yaml [key=value ...]
        expand a grid into cell configs and array task lists; print `DS_*` assignments
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.table import Table

from distillscale.compat.console import stderr_console
from distillscale.config import load_config
from distillscale.domain import load_taxonomy
from distillscale.launch.allocation import KINDS, plan_launch
from distillscale.launch.ranks import is_rank_zero
from distillscale.launch.sweep import collect_results, mark_done, plan_sweep, run_sweep_here

STAGE_NAMES = ("data", "teacher", "eval", "fit")


def add_parser(sub) -> None:
    ap = sub.add_parser("launch", help="launch plans, single stages and sweeps (for launchers/)")
    lsub = ap.add_subparsers(dest="launch_command", required=True)
    p = lsub.add_parser("plan", help="print the checked launch plan as shell assignments")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--image")
    p.add_argument("--time")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--mount", action="append", default=[], help="extra SRC:DST[:FLAGS]")
    p.add_argument("--repo", type=Path, help="repository root mounted into the container")
    s = lsub.add_parser("stage", help="run one stage of an experiment")
    s.add_argument("stage", choices=STAGE_NAMES)
    s.add_argument("config", type=Path)
    s.add_argument("overrides", nargs="*", help="key.sub=value")
    w = lsub.add_parser("sweep", help="expand a sweep grid into cells and array task lists")
    w.add_argument("sweep", type=Path)
    w.add_argument("overrides", nargs="*", help="key.sub=value, applied to every cell")
    w.add_argument("--run-here", action="store_true",
                   help="run every pending upstream and cell in this process, then the sweep's "
                        "fit and report (launchers/sweep.sh --local)")


def run(args: argparse.Namespace) -> int:
    """Dispatch; ConfigError / FileNotFoundError are reported by the CLI's `main`."""
    cmd = args.launch_command
    if cmd == "plan":
        cfg = load_config(args.config, args.overrides)
        plan = plan_launch(
            cfg, args.kind, nodes=args.nodes, gpus_per_node=args.gpus_per_node, repo=args.repo,
            image=args.image, time=args.time, partition=args.partition, account=args.account,
            extra_mounts=args.mount,
        )
        sys.stdout.write(plan.shell())
        return 0
    if cmd == "stage":
        # heavy: torch and the NVIDIA stack (`launch plan` runs on login nodes without them)
        from distillscale import pipeline

        cfg = load_config(args.config, args.overrides)
        if args.stage == "eval":
            pipeline.run_eval(cfg)
            pipeline.run_fit(cfg)
            pipeline.run_report(cfg)
            if is_rank_zero():
                mark_done(cfg)
        elif args.stage == "fit" and (cfg.run_dir / "cells").is_dir():
            return _fit_sweep(cfg)
        else:
            getattr(pipeline, f"run_{args.stage}")(cfg)
        return 0
    if cmd == "sweep":
        plan = plan_sweep(args.sweep, args.overrides)
        table = Table(title=f"sweep {plan['root']}")
        for col in ("cell", "upstream", "status"):
            table.add_column(col)
        for c in plan["cells"]:
            table.add_row(c["id"], c["upstream"], "done (skipped)" if c["done"] else "pending")
        stderr_console().print(table)
        if args.run_here:
            run_sweep_here(plan)
            return _fit_sweep(load_config(plan["fit_config"]))
        out = {
            "ROOT": plan["root"], "CELL_LIST": plan["cell_list"],
            "UPSTREAM_LIST": plan["upstream_list"], "FIT_CONFIG": plan["fit_config"],
            "PENDING_CELLS": plan["pending_cells"], "PENDING_UPSTREAMS": plan["pending_upstreams"],
            "TOTAL_CELLS": len(plan["cells"]),
        }
        sys.stdout.write("".join(f"DS_{k}={shlex.quote(str(v))}\n" for k, v in out.items()))
        return 0
    raise AssertionError(cmd)  # argparse only lets the choices through


def _fit_sweep(cfg) -> int:
    """A sweep's fit job: one results table from every finished cell, then the fit and the
    report on it (what `distillscale fit / report --results` do)."""
    # heavy: pandas, scipy and matplotlib, not needed by the launch plans this module prints
    from distillscale.results_table import fit_or_report_table

    table = collect_results(cfg.run_dir)
    classes = len(load_taxonomy(cfg.domain.taxonomy).classes)
    fit_dir = cfg.run_dir / "fit"
    # The sweep's own `fit:` settings (its base experiment plus its overrides), as a run's fit
    # stage uses them.
    print(fit_or_report_table("fit", table, fit_dir, cfg.fit, classes))
    print(fit_or_report_table("report", table, cfg.run_dir, cfg.fit, classes, fit_dir))
    return 0
