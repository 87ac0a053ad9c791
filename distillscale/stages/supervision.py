"""Supervision: the teacher's labels and reasoning traces per thinking depth for the configured
splits, and its top-k logit caches (`teacher/stage.py`, `teacher/generate.py`)."""

from __future__ import annotations

from distillscale.manifest import StageOutput
from distillscale.runner import Context, Stage
from distillscale.teacher.stage import supervise, supervision_family


def _body(ctx: Context, out: StageOutput) -> None:
    out.metrics.update(supervise(ctx.cfg, ctx.paths.teacher, ctx.paths.data, out.path,
                                 ctx.taxonomy))


def _summary(ctx: Context, m: dict) -> str:
    return "\n".join(
        f"supervision ({split}): " + ", ".join(
            f"{d} acc {v['accuracy']:.3f} rejected {v['rejected']}"
            + (f" trace {v['trace_tokens']['mean']:.1f} tok" if "trace_tokens" in v else "")
            for d, v in depths.items())
        for split, depths in m["depths"].items())


# The generation backends (transformers, vLLM, an endpoint) load the teacher themselves: no
# Megatron process groups.
STAGE = Stage(
    "supervision", _body, folder=lambda ctx: ctx.paths.supervision, sections=("domain", "seed"),
    identity=lambda ctx: {"supervision": ctx.cfg.teacher.supervision.model_dump(mode="json")},
    inputs=lambda ctx: {"teacher": ctx.paths.teacher, "data": ctx.paths.data,
                        "family": supervision_family(ctx.cfg)},
    summary=_summary, distributed=False)
