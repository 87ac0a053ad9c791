"""The one stage runner: every stage of every recipe goes through `Runner.__call__`.

A stage (`distillscale/stages/`) declares what it is: its folder, the config sections (and any
further keys) that make up its identity, the stage folders and files it reads, and its body.
The runner does the rest, the same way for every stage:

    identity hash -> skip when up to date (outputs verified, `manifest.stale_reason`)
    -> rank-0 gate (a stage one rank computes: the others wait for its manifest)
    -> process groups and the preemption check (stages that run models)
    -> the body, inside the atomic stage folder (`manifest.atomic_stage`)
    -> one summary line

Runs live under `runs/<name>/`:

    data/                      train/val/test.jsonl, rejects.jsonl, manifest.json
    teacher/                   tokenizer/, checkpoint/, hf/, knowledge_probe/, manifest.json
    supervision/               <split>.jsonl (teacher labels, traces per depth), manifest.json
    students/<name>/pruned/    the Minitron-pruned student (before recovery)
    students/<name>/distilled/ the same student after distillation (checkpoint/, hf/, tensorboard/)
    students/<name>/step<k>/   pruned/ + distilled/ of intermediate steps of an iterative schedule
    importance/<source>/       Minitron importance scores, cached per source model
    eval/                      results.parquet, results_long.csv, models.csv, per_class_f1.csv,
                               confusion.csv, predictions.csv, manifest.json
    fit/                       fits.json, fits.md, fits_detail.json
    results.csv  report.md  report.html  plots/
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillscale.compat.console import stderr_console
from distillscale.config import (
    ExperimentConfig,
    ModelArch,
    StudentTarget,
    config_to_yaml,
    payload_hash,
)
from distillscale.domain import Taxonomy, load_taxonomy
from distillscale.launch.allocation import check_world_size
from distillscale.launch.ranks import is_rank_zero, wait_for_stage, world_size
from distillscale.manifest import (
    StageOutput,
    atomic_stage,
    read_manifest,
    stale_reason,
    write_text_atomic,
)
from distillscale.models.hf_io import arch_from_hf_config
from distillscale.models.megatron_gpt import init_distributed, use_model_parallel_layout
from distillscale.prune.schedule import Step, plan_schedule
from distillscale.teacher.stage import resolve_hf_path
from distillscale.train import preemption

console = stderr_console()


class Paths:
    """Where each stage of an experiment lives (the layout above)."""

    def __init__(self, cfg: ExperimentConfig):
        self.root = cfg.run_dir
        self.data = self.root / "data"
        self.teacher = self.root / "teacher"
        self.supervision = self.root / "supervision"
        self.eval = self.root / "eval"
        self.fit = self.root / "fit"

    def pruned(self, name: str, step: int | None = None) -> Path:
        """The student's final pruned model, or (with `step`) an intermediate schedule step's."""
        return self._student(name, step) / "pruned"

    def distilled(self, name: str, step: int | None = None) -> Path:
        return self._student(name, step) / "distilled"

    def _student(self, name: str, step: int | None) -> Path:
        base = self.root / "students" / name
        return base if step is None else base / f"step{step}"


@dataclass(frozen=True)
class Stage:
    """What a stage is; the runner decides when and how it runs.

    Every callable takes the run context first, then the stage's own keyword arguments (a
    student and a schedule step for prune and distill)."""

    name: str
    body: Callable[..., None]  # (ctx, out: StageOutput, **kw): writes into out.path, fills out.metrics
    folder: Callable[..., Path] | None = None  # (ctx, **kw); None: no stage folder (the report)
    sections: tuple[str, ...] = ()  # config sections that make up the identity
    identity: Callable[..., dict] | None = None  # (ctx, **kw) -> further identity keys
    inputs: Callable[..., dict[str, Path]] | None = None  # (ctx, **kw) -> what the stage reads
    summary: Callable[..., str | None] | None = None  # (ctx, metrics, **kw) -> the closing line
    label: Callable[..., str] | None = None  # (ctx, **kw) -> the stage's name in messages
    check: Callable[..., None] | None = None  # (ctx, **kw): refuse before anything is read
    # Every rank runs the body (training, pruning, evaluation) and the ranks meet at barriers;
    # False: rank 0 alone computes it and the other ranks wait for its manifest.
    collective: bool = True
    # The body runs models: process groups first, and a preemption signal that arrived during
    # a stage without a training loop stops the run here, with everything finished saved.
    distributed: bool | Callable[..., bool] = True
    # Bumped when the stage's procedure changes what it writes: its outputs are redone.
    version: int = 1
    # (TP, PP) of a distributed stage when it is not the config's `launch.*` layout.
    layout: Callable[..., tuple[int, int]] | None = None


@dataclass
class Context:
    """What every stage body may use: the config, the paths and shared, cached lookups."""

    cfg: ExperimentConfig
    paths: Paths
    _taxonomy: Taxonomy | None = field(default=None, repr=False)

    @property
    def taxonomy(self) -> Taxonomy:
        if self._taxonomy is None:
            self._taxonomy = load_taxonomy(self.cfg.domain.taxonomy)
        return self._taxonomy


def student_steps(ctx: Context, student: StudentTarget) -> list[Step]:
    """The schedule's prune steps for `student` (`prune/schedule.py`), planned on the teacher's
    shape from its checkpoint (no model is loaded)."""
    meta = ctx.paths.teacher / "checkpoint" / "arch.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        arch, vocab = ModelArch.model_validate(m["arch"]), int(m["vocab_size"])
    elif ctx.cfg.teacher.source == "hf":
        # Before the teacher stage (e.g. a GPU teacher planned on a laptop): the shape is the
        # checkpoint's config.json; no weights are read.
        arch, vocab = arch_from_hf_config(resolve_hf_path(ctx.cfg.teacher.hf_path))
    else:
        raise FileNotFoundError(f"{meta}: missing; run the teacher stage first")
    return plan_schedule(arch, vocab, student, ctx.cfg.prune)


def student_folders(ctx: Context, student: StudentTarget) -> list[tuple[int, Path, Path]]:
    """(step, pruned folder, distilled folder) of every step; the last step is the student's own
    `pruned/` and `distilled/`, earlier ones live under `step<k>/`."""
    p, n = ctx.paths, len(student_steps(ctx, student))
    return [(k, p.pruned(student.name, None if k == n else k),
             p.distilled(student.name, None if k == n else k)) for k in range(1, n + 1)]



def identity_hash(cfg: ExperimentConfig, stage: Stage, extra: dict | None = None) -> str:
    """A stage's resume key: the config sections it depends on plus its further identity keys
    (and its version once bumped). The one place a stage identity is hashed."""
    payload = {**cfg.section_payload(*stage.sections), **(extra or {})}
    if stage.version != 1:
        payload["stage_version"] = stage.version
    return payload_hash(payload)


def setup_process(cfg: ExperimentConfig, layout: tuple[int, int] | None = None) -> None:
    """Process groups (once per process) in the stage's parallel layout, the preemption handler,
    a check for a signal that arrived between stages, and the seed."""
    tp, pp = layout or (cfg.launch.tensor_parallel, cfg.launch.pipeline_parallel)
    check_world_size(cfg, world_size())
    use_model_parallel_layout(tp, pp)
    init_distributed(tp, pp, cfg.seed)
    preemption.install()
    preemption.check("stage start")
    torch.manual_seed(cfg.seed)


class Runner:
    """`run(stage, **kw)` runs one stage of `cfg`'s experiment (or skips it) and returns its
    folder. Recipes call it; so do the CLI's single-stage commands and the launchers."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.ctx = Context(cfg, Paths(cfg))

    def record_config(self) -> Path:
        """The resolved config of this run as `<run>/config.yaml` (rank 0), what it ran with."""
        path = self.paths.root / "config.yaml"
        if is_rank_zero():
            self.paths.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, config_to_yaml(self.cfg))
        return path

    @property
    def paths(self) -> Paths:
        return self.ctx.paths

    def schedule(self, student: StudentTarget) -> list[Step]:
        """The prune steps of `student`'s schedule (one for one-shot), planned on the teacher's
        shape without loading a model."""
        return student_steps(self.ctx, student)

    def __call__(self, stage, folder: Path | None = None, **kw) -> Path:
        """Run `stage` (a `Stage`, or a `distillscale.stages` module) with its keyword arguments;
        `folder` puts its output elsewhere than the run layout says (`distillscale data build`)."""
        stage = getattr(stage, "STAGE", stage)
        ctx, cfg = self.ctx, self.cfg
        if stage.check is not None:
            stage.check(ctx, **kw)
        folder = Path(folder) if folder is not None else (
            stage.folder(ctx, **kw) if stage.folder is not None else None)
        label = stage.label(ctx, **kw) if stage.label is not None else stage.name
        if folder is None:  # writes files of the run folder, not a stage folder: rank 0 only
            if is_rank_zero():
                stage.body(ctx, StageOutput(self.paths.root), **kw)
            return self.paths.root
        inputs = stage.inputs(ctx, **kw) if stage.inputs is not None else {}
        extra = stage.identity(ctx, **kw) if stage.identity is not None else None
        h = identity_hash(cfg, stage, extra)
        why = stale_reason(folder, h, inputs)
        if why is None:
            console.print(f"[dim]{label}: up to date, skipped ({folder})[/dim]")
            return folder
        if (folder / "manifest.json").is_file():  # a finished stage that no longer holds
            console.print(f"{label}: re-running: {why}")
        if not stage.collective and not is_rank_zero():
            return wait_for_stage(folder, h, inputs)
        distributed = stage.distributed(ctx, **kw) if callable(stage.distributed) \
            else stage.distributed
        if distributed:
            setup_process(cfg, stage.layout(ctx, **kw) if stage.layout is not None else None)
        with atomic_stage(folder, stage.name, h, inputs, collective=stage.collective) as out:
            stage.body(ctx, out, **kw)
        if stage.summary is not None:
            line = stage.summary(ctx, read_manifest(folder)["metrics"], **kw)
            if line:
                console.print(line)
        return folder
