"""The stages by name, for scripts and tests that drive an experiment stage by stage.

Each function runs one stage through the runner (`distillscale/runner.py`; the stages are
`distillscale/stages/`); `run_all` runs the config's recipe (`recipes/`). The run folder's
layout is documented in `distillscale/runner.py`.
"""

from __future__ import annotations

from pathlib import Path

from distillscale import stages
from distillscale.config import ExperimentConfig, StudentTarget
from distillscale.recipes import run_recipe
from distillscale.runner import Paths, Runner
from distillscale.runner import student_folders as runner_student_folders
from distillscale.stages.rows import load_split

__all__ = [
    "Paths",
    "load_split",
    "run_all",
    "run_data",
    "run_distill",
    "run_eval",
    "run_fit",
    "run_prune",
    "run_report",
    "run_teacher",
    "student_folders",
    "student_steps",
]


def run_data(cfg: ExperimentConfig) -> Path:
    return Runner(cfg)(stages.data)


def run_teacher(cfg: ExperimentConfig) -> Path:
    """The teacher stage, then its supervision stage (labels, traces, logit caches)."""
    run = Runner(cfg)
    folder = run(stages.teacher)
    run(stages.supervision)
    return folder


def _steps(run: Runner, student: StudentTarget, step: int | None) -> list[int]:
    return [s.index for s in run.schedule(student)] if step is None else [step]


def run_prune(cfg: ExperimentConfig, student: StudentTarget, step: int | None = None) -> Path:
    """Prune one step of `student`'s schedule; without `step`, the whole schedule up to the last
    prune (intermediate students are distilled on the way, as the schedule requires)."""
    run = Runner(cfg)
    todo = _steps(run, student, step)
    for k in todo[:-1]:
        run(stages.prune, student=student, step=k)
        run(stages.distill, student=student, step=k)
    return run(stages.prune, student=student, step=todo[-1])


def run_distill(cfg: ExperimentConfig, student: StudentTarget, step: int | None = None) -> Path:
    """Distill one step's pruned student; without `step`, the whole schedule (every prune and
    distillation step, each skipped when up to date)."""
    run = Runner(cfg)
    if step is not None:
        return run(stages.distill, student=student, step=step)
    for k in _steps(run, student, None):
        run(stages.prune, student=student, step=k)
        out = run(stages.distill, student=student, step=k)
    return out


def run_eval(cfg: ExperimentConfig) -> Path:
    return Runner(cfg)(stages.evaluate)


def run_fit(cfg: ExperimentConfig) -> Path:
    return Runner(cfg)(stages.fit)


def run_report(cfg: ExperimentConfig) -> Path:
    Runner(cfg)(stages.report)
    return cfg.run_dir / "report.md"


def run_all(cfg: ExperimentConfig) -> Path:
    """The config's recipe (`recipe:`, default `prune_distill`)."""
    return run_recipe(cfg)


def student_steps(cfg: ExperimentConfig, student: StudentTarget):
    return Runner(cfg).schedule(student)


def student_folders(cfg: ExperimentConfig, student: StudentTarget) -> list[tuple[int, Path, Path]]:
    return runner_student_folders(Runner(cfg).ctx, student)
