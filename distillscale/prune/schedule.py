"""Pruning schedules: how a student's compression is split into prune -> distill steps.

    one_shot   teacher -> target in one prune, then one distillation
    uniform    equal steps in percentage points of the teacher's parameters
               (the paper's 100 -> 79 -> 58 -> 37 -> 16 is `uniform` with 4 steps to 0.16)
    decayed    shrinking steps: each step removes `decay` x the previous step's share, so most
               of the pruning happens early, while the model is closest to the teacher, and the
               last steps, where the student is fragile, are small

Between steps the student is distilled from the teacher, and every intermediate student is kept
and evaluated, so one run yields a whole compression curve. This module is the schedule's
arithmetic only: ratios (`schedule_ratios`) and, for a concrete teacher, the shape of every step
(`plan_schedule`), each step's target expressed relative to the previous step's shape (ModelOpt
prunes the model it is given).
"""

from __future__ import annotations

from dataclasses import dataclass

from distillscale.compat.console import stderr_console
from distillscale.config import ModelArch, PruneConfig, StudentTarget
from distillscale.models.shape import arch_params
from distillscale.prune.shapes import PRUNABLE_KEYS, choose_shape, pruned_arch


def schedule_ratios(final_ratio: float, schedule: str, steps: int = 1, decay: float = 0.5) -> list[float]:
    """Parameter ratios (fraction of the teacher's) after each step; the last is `final_ratio`.

    uniform: 1 - i * (1 - r) / n.  decayed: step i removes d * decay^(i-1) with
    d = (1 - r)(1 - decay) / (1 - decay^n), so the steps sum to 1 - r.
    """
    if not 0 < final_ratio < 1:
        raise ValueError(f"final ratio must be in (0, 1), got {final_ratio}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "one_shot" or steps == 1:
        return [final_ratio]
    total = 1.0 - final_ratio
    if schedule == "uniform":
        sizes = [total / steps] * steps
    elif schedule == "decayed":
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        first = total * (1 - decay) / (1 - decay**steps)
        sizes = [first * decay**i for i in range(steps)]
    else:
        raise ValueError(f"unknown schedule {schedule!r} (one_shot, uniform, decayed)")
    out, r = [], 1.0
    for size in sizes[:-1]:
        r -= size
        out.append(round(r, 12))
    return out + [final_ratio]  # exact, not accumulated float error


@dataclass(frozen=True)
class Step:
    index: int  # 1-based
    planned_ratio: float  # the schedule's ratio for this step (fraction of teacher params)
    ratio: float  # achieved by `arch`
    target: dict  # ModelOpt export_config relative to the previous step's shape
    arch: ModelArch  # shape after this step


_WARNED: set[tuple] = set()


def _warn_unreachable(student: StudentTarget, achieved: float) -> None:
    """One line (once per student and ratio) when the nearest valid shape is far from the
    asked ratio: embeddings and whole layers bound how small a model can get."""
    asked = student.compression_ratio
    far = abs(achieved - asked) > 0.05 or not 0.8 <= achieved / asked <= 1.25
    key = (student.name, student.axis, asked, round(achieved, 4))
    if far and key not in _WARNED:
        _WARNED.add(key)
        stderr_console().print(
            f"warning: students.{student.name}: compression_ratio {asked} cannot be reached "
            f"by {student.axis} pruning of this teacher; the nearest valid shape keeps "
            f"{achieved:.3f} of its parameters")


def plan_schedule(teacher: ModelArch, vocab_size: int, student: StudentTarget,
                  prune: PruneConfig) -> list[Step]:
    """Every prune step of `student` under `prune.schedule`, with shapes and achieved ratios.

    Intermediate shapes are the nearest valid shapes (`choose_shape`) to each step's ratio,
    searched from the previous step's shape so every dimension only shrinks; the last step is
    the student's own target (its ratio's shape, or its explicit shape). A step that would not
    shrink the model, or would reach the final size early, is dropped: the plan may hold fewer
    steps than asked for on small models (a 4-layer teacher has only 3 depth steps).
    """
    hd, fd = prune.hidden_size_divisor, prune.ffn_hidden_size_divisor
    t_params = arch_params(teacher, vocab_size)
    if student.shape is not None:
        final_target = {k: v for k, v in student.shape.model_dump().items() if v is not None}
        final_arch = pruned_arch(teacher, final_target)
    else:
        final_target, _ = choose_shape(teacher, vocab_size, student.axis,
                                       student.compression_ratio, hd, fd,
                                       head_policy=prune.attention_heads)
        final_arch = pruned_arch(teacher, final_target)
    final_ratio = arch_params(final_arch, vocab_size) / t_params
    if student.compression_ratio is not None:
        _warn_unreachable(student, final_ratio)
    ratios = schedule_ratios(final_ratio, prune.schedule, prune.steps, prune.decay)

    steps: list[Step] = []
    current = teacher
    for planned in ratios[:-1]:
        cur_params = arch_params(current, vocab_size)
        rel = planned * t_params / cur_params
        if not 0 < rel < 1:
            continue
        floor = {k: getattr(final_arch, k) for k in PRUNABLE_KEYS}
        try:
            target, _ = choose_shape(current, vocab_size, student.axis, rel, hd, fd, floor,
                                     head_policy=prune.attention_heads)
        except ValueError:  # nothing left between the current and the final shape
            break
        arch = pruned_arch(current, target)
        params = arch_params(arch, vocab_size)
        final_params = arch_params(final_arch, vocab_size)
        shrinks_to_final = all(getattr(arch, k) >= getattr(final_arch, k) for k in PRUNABLE_KEYS)
        if params <= final_params or not shrinks_to_final or params >= cur_params:
            continue
        steps.append(Step(len(steps) + 1, planned, params / t_params, target, arch))
        current = arch
    last_target = {k: getattr(final_arch, k) for k in PRUNABLE_KEYS
                   if getattr(final_arch, k) != getattr(current, k)}
    if not last_target:
        raise ValueError(f"student {student.name}: the schedule reached the final shape early")
    steps.append(Step(len(steps) + 1, ratios[-1], final_ratio, last_target, final_arch))
    return steps
