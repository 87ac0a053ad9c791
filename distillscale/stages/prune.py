"""Prune: one step of a student's schedule with ModelOpt's Minitron (importance from calibration
forwards, then width or depth pruning), saved with its HF export (`prune/minitron.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from distillscale.compat.cpu import cuda_available
from distillscale.config import ModelArch, StudentTarget
from distillscale.distill.export import check_hf_export, check_logit_diff
from distillscale.launch.allocation import prune_layout
from distillscale.launch.ranks import world_size
from distillscale.manifest import StageOutput, input_hash, read_manifest, writer_path
from distillscale.models.checkpoint import load_model, read_arch, save_model
from distillscale.models.hf_io import save_hf
from distillscale.models.megatron_gpt import count_params, forward_logits
from distillscale.prune.bridge_prune import pipeline_logits, prune_hf_through_bridge
from distillscale.prune.minitron import prune_minitron
from distillscale.prune.shapes import pruned_arch
from distillscale.runner import Context, Stage, student_folders, student_steps
from distillscale.runtime import ranks
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
    if pipeline_stages() > 1:  # a teacher too large for one GPU (`prune_layout`)
        _body_pipelined(ctx, out, student, step)
        return
    cfg, p = ctx.cfg, ctx.paths
    steps = student_steps(ctx, student)
    plan, src, label = steps[step - 1], _source(ctx, student, step), step_label(ctx, student, step)
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
        "arch": new_arch.model_dump(mode="json"), "params": params,
        "importance_cached": info.get("scores_cached", False),
        "dropped_layers": info.get("dropped_layers"),
        "prune_seconds": round(info.get("prune_seconds", 0.0), 2),
        **_step_metrics(ctx, student, step, params),
    })


def _step_metrics(ctx: Context, student: StudentTarget, step: int, params: int) -> dict:
    """What a prune step records of its plan and place in the schedule (both prune paths)."""
    steps = student_steps(ctx, student)
    plan, teacher_params = steps[step - 1], int(read_manifest(ctx.paths.teacher)["metrics"]["params"])
    return {
        "axis": student.axis, "target": plan.target, "teacher_params": teacher_params,
        "compression_ratio": params / teacher_params,
        "requested_ratio": student.compression_ratio, "planned_ratio": plan.planned_ratio,
        "schedule": ctx.cfg.prune.schedule, "step": step, "steps": len(steps),
        "source": str(_source(ctx, student, step)),
    }


def pipeline_stages() -> int:
    """The pipeline size of this process's Megatron parallel state (1 when none is set up)."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def _body_pipelined(ctx: Context, out: StageOutput, student: StudentTarget, step: int) -> None:
    """The prune stage at PP > 1: the source's HF checkpoint (`<source>/hf`) pruned through its
    Bridge provider split over the pipeline stages, into the same files and metrics as PP 1."""
    cfg, p = ctx.cfg, ctx.paths
    steps = student_steps(ctx, student)
    plan, src, label = steps[step - 1], _source(ctx, student, step), step_label(ctx, student, step)
    arch, vocab = read_arch(src)  # no model is loaded
    enc, tok = encoder(ctx, arch.seq_length)
    calib = load_split(p.data, "train")[: cfg.prune.calibration_samples]
    scores = p.root / "importance" / (
        f"{input_hash(src)}-n{cfg.prune.calibration_samples}-s{cfg.seed}")
    metrics = prune_pipelined(
        src / "hf", arch, vocab, plan.target,
        [enc.encode(calib[i : i + 32]).tokens for i in range(0, len(calib), 32)], out.path,
        probe=enc.encode(calib[:8]).tokens, tokenizer=tok, scores_dir=scores,
        hidden_size_divisor=cfg.prune.hidden_size_divisor,
        ffn_hidden_size_divisor=cfg.prune.ffn_hidden_size_divisor)
    if ModelArch.model_validate(metrics["arch"]) != plan.arch:
        raise RuntimeError(f"prune {label}: got {metrics['arch']}, the schedule planned "
                           f"{plan.arch}")
    out.metrics.update({**metrics, **_step_metrics(ctx, student, step, metrics["params"])})


def prune_pipelined(hf_dir: Path, arch: ModelArch, vocab: int, target: dict[str, int],
                    calibration: list[torch.Tensor], folder: Path, *, probe: torch.Tensor,
                    tokenizer=None, scores_dir: Path | None = None, hidden_size_divisor: int = 16,
                    ffn_hidden_size_divisor: int = 32) -> dict:
    """Prune the HF checkpoint `hf_dir` (of shape `arch`, `vocab`) to `target` at TP 1 and this
    process's PP (`prune/bridge_prune.py`), writing what the PP 1 path writes into `folder`:
    `checkpoint/` (`save_model`: a split model writes megatron-core's `dist/` checkpoint, which
    `load_model` reshards to any layout, one process included) with `arch.json`, and `hf/`
    (Bridge's export, checked against the pipelined model's logits on `probe`). Collective: every
    rank calls it with its own stage folder. Returns the metrics the PP 1 path records from the
    prune (arch, params, hf_max_abs_logit_diff, importance_cached, dropped_layers,
    prune_seconds)."""
    # heavy: megatron-core and transformers, only where a model is pruned
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    pp, hf_out = pipeline_stages(), writer_path(Path(folder)) / "hf"
    stem = None
    if scores_dir is not None:  # ModelOpt's per-rank score files, of this pipeline split
        Path(scores_dir).mkdir(parents=True, exist_ok=True)
        stem = Path(scores_dir) / f"pp{pp}-rank"
    cached = stem is not None and any(Path(scores_dir).glob(f"{stem.name}*"))
    info: dict = {}
    _, model, got = prune_hf_through_bridge(
        hf_dir, target, calibration, hf_out, pipeline_parallel=pp, seq_length=arch.seq_length,
        dtype=torch.bfloat16 if cuda_available() else torch.float32,
        hidden_size_divisor=hidden_size_divisor, ffn_hidden_size_divisor=ffn_hidden_size_divisor,
        scores_path=stem, info=info)
    # Bridge's arch carries the shape; the teacher's arch the rest (RoPE, norm epsilon, ...).
    new_arch = pruned_arch(arch, target)
    shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "kv_channels", "qk_layernorm", "add_qkv_bias",
             "tie_word_embeddings")
    if any(getattr(got, k) != getattr(new_arch, k) for k in shape) or model.vocab_size != vocab:
        raise RuntimeError(f"{hf_dir}: Bridge built {got} (vocab {model.vocab_size}), the "
                           f"checkpoint's arch.json says {new_arch} (vocab {vocab})")
    model.eval()
    save_model(model, new_arch, vocab, Path(folder))
    # Parameters of every stage; the last stage's output layer is the first stage's embedding
    # when they are tied, counted once as at PP 1.
    local = sum(p.numel() for n, p in model.named_parameters()
                if not (n == "output_layer.weight" and model.share_embeddings_and_output_weights
                        and not ps.is_pipeline_first_stage()))
    total = torch.tensor([local], dtype=torch.long)
    torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    with torch.no_grad():
        logits = pipeline_logits(model, probe)
    diff = 0.0
    if ranks.is_rank_zero():
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_out)
        hf = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
        with torch.no_grad():
            diff = float((hf(input_ids=probe.cpu()).logits.float() - logits.cpu()).abs().max())
        check_logit_diff(diff, hf_out)
    ranks.barrier()
    kept = info.get("kept_layers") or []
    return {
        "arch": new_arch.model_dump(mode="json"), "params": int(total.item()),
        "hf_max_abs_logit_diff": diff, "importance_cached": cached,
        "dropped_layers": sorted(set(range(1, arch.num_layers + 1)) - set(kept)),
        "prune_seconds": round(info.get("prune_seconds", 0.0), 2),
        "pipeline_parallel": pp, "kept_layers": kept,
    }


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
