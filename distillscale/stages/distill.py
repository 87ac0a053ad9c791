"""Distill: recover one step's pruned student from the teacher — logit KD through ModelOpt's
distillation model or LoRA KD (`distill/logit_kd.py`, `distill/lora_kd.py`), online or from the
teacher's logit cache, on the local loop; or Megatron-Bridge's distillation on GPUs
(`distill/bridge.py`). Writes the student, its HF export and the KL before and after."""

from __future__ import annotations

from pathlib import Path

from distillscale.config import StudentTarget
from distillscale.distill.bridge import distill_bridge, select_backend
from distillscale.distill.export import check_hf_export
from distillscale.distill.logit_kd import (
    aligned_vocab,
    answer_kl,
    answer_logprobs,
    distill,
    load_cached_teacher,
    mask_token_counts,
    supervised_kl,
    supervised_logprobs,
)
from distillscale.distill.lora_kd import lora_distill_megatron
from distillscale.distill.speed import student_speed
from distillscale.eval.indomain import label_accuracy, multi_token
from distillscale.manifest import StageOutput
from distillscale.models.checkpoint import load_model, save_model
from distillscale.models.hf_io import save_hf
from distillscale.models.megatron_gpt import count_params
from distillscale.runner import Context, Stage, student_folders, student_steps
from distillscale.stages.prune import step_label
from distillscale.stages.rows import encoder, format_val_rows, load_split, train_rows
from distillscale.teacher.supervision import load_supervision_rows
from distillscale.tokenizer import ChatPromptEncoder


def _folders(ctx: Context, student: StudentTarget, step: int) -> tuple[Path, Path]:
    _k, pruned, distilled = student_folders(ctx, student)[step - 1]
    return pruned, distilled


def _inputs(ctx: Context, student: StudentTarget, step: int) -> dict[str, Path]:
    p = ctx.paths
    inputs = {"pruned": _folders(ctx, student, step)[0], "teacher": p.teacher, "data": p.data}
    if ctx.cfg.distill.supervision != "label" or ctx.cfg.distill.teacher_logits == "cache":
        inputs["supervision"] = p.supervision  # traces, or the logit cache's key
    return inputs


def _accuracy_eval(model, enc, rows):
    """The in-training val check (single-token class names: one forward per batch). None for
    multi-token names: scored on the model in training they would cost a full forward per class
    (35 x a 224-token prompt per row for SmolLM2, minutes per check on a laptop); the stage
    scores the HF export on every val row after training instead (`final_val_accuracy`)."""
    if multi_token(enc):
        return None

    def fn(step: int) -> dict:
        return {"val_accuracy": label_accuracy(model, enc, rows)}

    return fn


def _body(ctx: Context, out: StageOutput, student: StudentTarget, step: int) -> None:
    if select_backend(ctx.cfg.distill.backend) == "bridge":
        _bridge_body(ctx, out, student, step)
    else:
        _local_body(ctx, out, student, step)


def _local_body(ctx: Context, out: StageOutput, student: StudentTarget, step: int) -> None:
    cfg, p = ctx.cfg, ctx.paths
    src, _ = _folders(ctx, student, step)
    label = step_label(ctx, student, step)
    with out.phase("load"):
        teacher, t_arch, vocab = load_model(p.teacher)
        model, arch, s_vocab = load_model(src)
        enc, tok = encoder(ctx, t_arch.seq_length)
    # One tokenizer (else an error); differently padded vocabularies are compared on its real
    # range (None: same padding, nothing to align).
    real_vocab = aligned_vocab(tok, src, vocab, s_vocab)
    rows = train_rows(ctx)
    val_rows = load_split(p.data, "val")
    with out.phase("val_kl"):
        teacher_val = answer_logprobs(teacher, enc, val_rows, real_vocab=real_vocab)
        kl_before = answer_kl(model, teacher_val, enc, val_rows, real_vocab=real_vocab)
    # The format's own supervised tokens (trace + answer; the trace for blended CoT) on held-out
    # rows with the teacher's traces, when the supervision stage covered the val split.
    fmt = cfg.distill.supervision
    fmt_val = format_val_rows(ctx)
    teacher_fmt = fmt_kl_before = fmt_kl_after = None
    if fmt_val:
        with out.phase("val_kl"):
            teacher_fmt = supervised_logprobs(teacher, enc, fmt_val, fmt, real_vocab=real_vocab)
            fmt_kl_before = supervised_kl(model, teacher_fmt, enc, fmt_val, fmt, real_vocab)
    masks = mask_token_counts(enc, rows, fmt)
    if cfg.distill.loss.alpha == 1.0:
        masks["ce_term"] = 0  # no CE anchor: the KL term alone
    cached = None
    if cfg.distill.teacher_logits == "cache":
        cached = load_cached_teacher(cfg, p.supervision, p.teacher, rows)
        teacher = None  # only its validation log-probs are kept; training never runs it
    ckpt, tb = out.path / "checkpoints" / "last.pt", out.path / "tensorboard"
    with out.phase("train"):
        if cfg.distill.method == "lora_kd":
            plain, history, adapters = lora_distill_megatron(
                model, arch, s_vocab, p.teacher / "hf", tok, enc, rows, cfg.distill,
                cfg.seed, ckpt, f"lora_kd {label}", tensorboard_dir=tb, cached=cached,
                real_vocab=real_vocab)
            out.metrics["lora_trainable_params"] = adapters
        else:
            plain, history = distill(
                model, teacher, enc, rows, cfg.distill, cfg.seed, ckpt,
                f"distill {label}", eval_fn=_accuracy_eval(model, enc, val_rows),
                tensorboard_dir=tb, cached=cached, real_vocab=real_vocab,
            )
    with out.phase("val_kl"):
        kl_after = answer_kl(plain, teacher_val, enc, val_rows, real_vocab=real_vocab)
        if fmt_val:
            fmt_kl_after = supervised_kl(plain, teacher_fmt, enc, fmt_val, fmt, real_vocab)
    with out.phase("save"):
        save_model(plain, arch, s_vocab, out.path)
        save_hf(plain, arch, s_vocab, out.path / "hf", tokenizer=tok)
    (out.path / "checkpoints" / "last.pt").unlink(missing_ok=True)
    out.metrics.update({
        "params": count_params(plain), "val_kl_before": kl_before, "val_kl_after": kl_after,
        "method": cfg.distill.method, "supervision": cfg.distill.supervision,
        "teacher_logits": cfg.distill.teacher_logits, "aligned_vocab": real_vocab,
        "schedule": cfg.prune.schedule, "step": step, "steps": len(student_steps(ctx, student)),
        "loss": cfg.distill.loss.model_dump(mode="json"), "mask_tokens": masks,
        # KL on the format's supervised tokens of held-out rows (for label: the answer KL).
        "val_kl_supervised_before": kl_before if fmt == "label" else fmt_kl_before,
        "val_kl_supervised_after": kl_after if fmt == "label" else fmt_kl_after,
        "val_kl_supervised_rows": len(val_rows) if fmt == "label" else len(fmt_val or []),
        "history": history,
    })
    # The exported checkpoint must be the trained model (raises beyond tolerance).
    with out.phase("export_check"):
        out.metrics["hf_max_abs_logit_diff"] = check_hf_export(
            plain, out.path / "hf", enc.encode(val_rows[:8]).tokens)
    if multi_token(enc):
        # Multi-token class names: the val accuracy of the trained model, scored on its export
        # with the packed scorer (every val row), after the last step.
        with out.phase("final_val_accuracy"):
            out.metrics["final_val_accuracy"] = label_accuracy(plain, enc, val_rows,
                                                               hf_dir=out.path / "hf")
    if (p.teacher / "hf" / "config.json").is_file():
        # A pruned student must actually be faster: CPU prefill speed vs the teacher.
        with out.phase("speed_check"):
            out.metrics.update(student_speed(out.path / "hf", p.teacher / "hf"))


def _bridge_body(ctx: Context, out: StageOutput, student: StudentTarget, step: int) -> None:
    """The GPU path: Megatron-Bridge trains from the HF exports of the pruned student and the
    teacher and writes the distilled student's `hf/`."""
    cfg, p = ctx.cfg, ctx.paths
    src, _ = _folders(ctx, student, step)
    rows = train_rows(ctx)
    # Validation rows carry the teacher's traces only when the supervision stage covered the
    # val split; otherwise Bridge validates on the label format (the answer tokens).
    if cfg.distill.supervision != "label" and (p.supervision / "val.jsonl").is_file():
        val_rows = load_supervision_rows(p.supervision, "val", cfg.distill.supervision)
        val_format = cfg.distill.supervision
    else:
        val_rows, val_format = load_split(p.data, "val"), "label"
    # An HF teacher used as is (teacher.source=hf) may have no export in the stage folder.
    teacher_hf = p.teacher / "hf"
    if not (teacher_hf / "config.json").is_file() and cfg.teacher.hf_path:
        teacher_hf = Path(cfg.teacher.hf_path)
    # The SFT rows in the prompt format every other stage uses (an HF teacher's chat template).
    enc, _ = encoder(ctx)
    chat = enc if isinstance(enc, ChatPromptEncoder) else None
    out.metrics.update(distill_bridge(cfg, src / "hf", teacher_hf, out.path, rows, val_rows,
                                      val_format=val_format, chat=chat))
    out.metrics.update({"method": cfg.distill.method, "supervision": cfg.distill.supervision,
                        "schedule": cfg.prune.schedule, "step": step,
                        "steps": len(student_steps(ctx, student))})


def _summary(ctx: Context, m: dict, student: StudentTarget, step: int) -> str:
    label = step_label(ctx, student, step)
    if "val_kl_before" not in m:
        return f"distill {label}: Megatron-Bridge backend done"
    extra = ""
    if ctx.cfg.distill.supervision != "label" and m["val_kl_supervised_rows"]:
        extra = (f"; on {ctx.cfg.distill.supervision} tokens "
                 f"{m['val_kl_supervised_before']:.4f} -> {m['val_kl_supervised_after']:.4f}")
    return (f"distill {label}: val KL(teacher||student) {m['val_kl_before']:.4f} -> "
            f"{m['val_kl_after']:.4f}{extra}")


def _check(ctx: Context, student: StudentTarget, step: int) -> None:
    # First: a forced `bridge` on a machine without CUDA / transformer-engine fails at once.
    select_backend(ctx.cfg.distill.backend)


STAGE = Stage(
    "distill", _body,
    folder=lambda ctx, student, step: _folders(ctx, student, step)[1],
    sections=("distill", "seed"), inputs=_inputs, check=_check, summary=_summary,
    label=lambda ctx, student, step: f"distill {step_label(ctx, student, step)}",
    # Megatron-Bridge initializes its own process groups.
    distributed=lambda ctx, student, step: select_backend(ctx.cfg.distill.backend) != "bridge")
