"""Teacher: train the scratch teacher on the data, or import a pretrained HF checkpoint
(`teacher/stage.py`); the checkpoint, its HF export, tokenizer and knowledge probe."""

from __future__ import annotations

from distillscale.manifest import StageOutput
from distillscale.runner import Context, Stage, console
from distillscale.stages.rows import load_split
from distillscale.teacher.logit_cache import fingerprint_path
from distillscale.teacher.stage import (
    import_hf_teacher,
    resolve_hf_path,
    scratch_only_settings,
    train_scratch_teacher,
)


def _identity(ctx: Context) -> dict:
    # Supervision settings are not part of the teacher's identity: changing them re-runs only
    # the supervision stage.
    ident = {"teacher": ctx.cfg.teacher.model_dump(mode="json", exclude={"supervision"})}
    if ctx.cfg.teacher.source == "hf":
        # The checkpoint's content is part of the teacher's identity, not only its path.
        ident["hf_fingerprint"] = fingerprint_path(resolve_hf_path(ctx.cfg.teacher.hf_path))
    return ident


def _body(ctx: Context, out: StageOutput) -> None:
    cfg, p = ctx.cfg, ctx.paths
    if cfg.teacher.source == "hf":
        ignored = scratch_only_settings(cfg)
        if ignored:
            console.print(f"[yellow]teacher: {', '.join(ignored)} only shape a scratch "
                          "teacher; ignored for teacher.source=hf[/yellow]")
        out.metrics.update(import_hf_teacher(cfg, out.path, ctx.taxonomy,
                                             load_split(p.data, "val")))
    else:
        out.metrics.update(train_scratch_teacher(cfg, out.path, ctx.taxonomy,
                                                 load_split(p.data, "train"),
                                                 load_split(p.data, "val")))


def _summary(ctx: Context, m: dict) -> str:
    if ctx.cfg.teacher.source == "hf":
        return (f"teacher: {m['hf_path']} ({m['hf_family']}), {m['params']:,} params, "
                f"val accuracy {m['final_val_accuracy']:.3f}")
    return (f"teacher: {m['params']:,} params, val accuracy {m['final_val_accuracy']:.3f}, "
            f"knowledge perplexity {m['knowledge_ppl']:.2f}")


STAGE = Stage("teacher", _body, folder=lambda ctx: ctx.paths.teacher, sections=("domain", "seed"),
              identity=_identity, inputs=lambda ctx: {"data": ctx.paths.data}, summary=_summary)
