"""Prune: one step of a student's schedule with ModelOpt's Minitron (importance from calibration
forwards, then width or depth pruning), saved with its HF export (`prune/minitron.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from distillscale.config import StudentTarget
from distillscale.distill.export import check_hf_export
from distillscale.launch.allocation import prune_layout
from distillscale.launch.ranks import world_size
from distillscale.manifest import StageOutput, input_hash, read_manifest
from distillscale.models.checkpoint import load_model, save_model
from distillscale.models.hf_io import save_hf
from distillscale.models.megatron_gpt import count_params, forward_logits
from distillscale.prune.minitron import prune_minitron
from distillscale.runner import Context, Stage, student_folders, student_steps
from distillscale.stages.rows import encoder, load_split


def step_label(ctx: Context, student: StudentTarget, step: int) -> str:
    n = len(student_steps(ctx, student))
    return student.name if n == 1 else f"{student.name} step {step}/{n}"


def _check(ctx: Context, student: StudentTarget, step: int) -> None:
    n = len(student_steps(ctx, student))
    if not 1 <= step <= n:
        raise ValueError(f"student {student.name}: step {step} not in 1..{n}")


def _source(ctx: Context, student: StudentTarget, step: int) -> Path:
    """Step 1 prunes the teacher; every later step prunes the previous step's distilled student."""
    return ctx.paths.teacher if step == 1 else student_folders(ctx, student)[step - 2][2]


def _body(ctx: Context, out: StageOutput, student: StudentTarget, step: int) -> None:
    cfg, p = ctx.cfg, ctx.paths
    steps = student_steps(ctx, student)
    plan, src, label = steps[step - 1], _source(ctx, student, step), step_label(ctx, student, step)
    teacher_params = int(read_manifest(p.teacher)["metrics"]["params"])
    source, arch, vocab = load_model(src)
    enc, tok = encoder(ctx, arch.seq_length)
    calib = load_split(p.data, "train")[: cfg.prune.calibration_samples]

    def forward_loop(model):
        with torch.no_grad():
            for i in range(0, len(calib), 32):
                forward_logits(model, enc.encode(calib[i : i + 32]).tokens)

    # Importance scores belong to the source model and the calibration set: keyed by both, so
    # every student (and step) pruned from the same model reuses them.
    scores = p.root / "importance" / (
        f"{input_hash(src)}-n{cfg.prune.calibration_samples}-s{cfg.seed}")
    info: dict = {}
    model, new_arch = prune_minitron(
        source, arch, plan.target, forward_loop,
        hidden_size_divisor=cfg.prune.hidden_size_divisor,
        ffn_hidden_size_divisor=cfg.prune.ffn_hidden_size_divisor,
        info=info, scores_dir=scores,
    )
    if new_arch != plan.arch:
        raise RuntimeError(f"prune {label}: got {new_arch}, the schedule planned {plan.arch}")
    params = count_params(model)
    save_model(model, new_arch, vocab, out.path)
    # The pruned student gets its HF export too, so general-knowledge evaluation (lm-eval
    # reads HF checkpoints) scores it before recovery as well as after.
    save_hf(model, new_arch, vocab, out.path / "hf", tokenizer=tok)
    out.metrics["hf_max_abs_logit_diff"] = check_hf_export(
        model, out.path / "hf", enc.encode(calib[:8]).tokens)
    out.metrics.update({
        "axis": student.axis, "target": plan.target, "arch": new_arch.model_dump(mode="json"),
        "params": params, "teacher_params": teacher_params,
        "compression_ratio": params / teacher_params,
        "requested_ratio": student.compression_ratio, "planned_ratio": plan.planned_ratio,
        "schedule": cfg.prune.schedule, "step": step, "steps": len(steps),
        "source": str(src), "importance_cached": info.get("scores_cached", False),
        "dropped_layers": info.get("dropped_layers"),
        "prune_seconds": round(info.get("prune_seconds", 0.0), 2),
    })


def _summary(ctx: Context, m: dict, student: StudentTarget, step: int) -> str:
    return (f"prune {step_label(ctx, student, step)}: {student.axis} -> {m['target']}, "
            f"{m['params']:,} params ({m['compression_ratio']:.2f} of teacher)")


STAGE = Stage(
    "prune", _body,
    folder=lambda ctx, student, step: student_folders(ctx, student)[step - 1][1],
    sections=("prune",),
    identity=lambda ctx, student, step: {"student": student.model_dump(mode="json"), "step": step},
    inputs=lambda ctx, student, step: {"teacher": ctx.paths.teacher, "data": ctx.paths.data,
                                       "source": _source(ctx, student, step)},
    label=lambda ctx, student, step: f"prune {step_label(ctx, student, step)}",
    check=_check, summary=_summary,
    # Minitron scores and slices an unsharded model: TP 1, whatever the distill layout
    # (`launch/allocation.py` prune_layout; the plan shows it next to the distill layout).
    layout=lambda ctx, student, step: prune_layout(ctx.cfg, world_size())[:2])
