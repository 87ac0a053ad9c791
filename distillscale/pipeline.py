"""The stages of an experiment, composed by paths under `runs/<name>/`.

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

Each stage is skipped when its manifest matches the config sections and inputs it depends on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from distillscale.compat.console import stderr_console
from distillscale.config import ExperimentConfig, StudentTarget
from distillscale.data.build import build_dataset, read_jsonl
from distillscale.domain import load_taxonomy
from distillscale.launch.ranks import is_rank_zero, wait_for_stage
from distillscale.manifest import atomic_stage, is_up_to_date, read_manifest

console = stderr_console()


class Paths:
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


def _skip(folder: Path, stage: str, h: str, inputs: dict) -> bool:
    if is_up_to_date(folder, h, inputs):
        console.print(f"[dim]{stage}: up to date, skipped ({folder})[/dim]")
        return True
    return False


# ------------------------------------------------------------------------------------- data


def run_data(cfg: ExperimentConfig) -> Path:
    p = Paths(cfg)
    tax_path = Path(cfg.domain.taxonomy)
    inputs = {"taxonomy": tax_path}
    if cfg.data.generator == "file":
        inputs["source"] = Path(cfg.data.source_path)
    h = cfg.section_hash("domain", "data", "seed")
    if _skip(p.data, "data", h, inputs):
        return p.data
    if not is_rank_zero():  # under srun: one rank builds the data, the others wait for it
        return wait_for_stage(p.data, h, inputs)
    taxonomy = load_taxonomy(tax_path)
    with atomic_stage(p.data, "data", h, inputs, collective=False) as out:
        out.metrics.update(build_dataset(out.path, taxonomy, cfg.data, seed=cfg.seed))
        out.extra.update({k: out.metrics[k] for k in ("rows_in", "rows_kept", "rows_rejected")})
    m = read_manifest(p.data)["metrics"]
    console.print(
        f"data: {m['rows_kept']} headlines kept of {m['rows_in']} "
        f"({m['rows_rejected']} rejected), splits {m['split_sizes']}"
    )
    return p.data


def load_split(data_dir: Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the data stage first")
    return read_jsonl(path)


# ------------------------------------------------------------------------------------ shared


def _setup(cfg: ExperimentConfig):
    from distillscale.launch.allocation import check_world_size
    from distillscale.launch.ranks import world_size
    from distillscale.models.megatron_gpt import init_distributed
    from distillscale.train import preemption

    check_world_size(cfg, world_size())
    init_distributed(cfg.launch.tensor_parallel, cfg.launch.pipeline_parallel, cfg.seed)
    # A preemption signal that arrived during a stage without a training loop stops here,
    # between stages, with everything finished so far saved.
    preemption.install()
    preemption.check("stage start")
    torch.manual_seed(cfg.seed)


def _encoder(cfg: ExperimentConfig, teacher_dir: Path, seq_length: int):
    from distillscale.tokenizer import PromptEncoder, load_tokenizer

    taxonomy = load_taxonomy(cfg.domain.taxonomy)
    tok = load_tokenizer(teacher_dir / "tokenizer")
    return PromptEncoder(tok, taxonomy.labels, seq_length), tok


def _accuracy_eval(model, encoder, rows):
    from distillscale.eval.indomain import predict_labels

    idx = {n: i for i, n in enumerate(encoder.labels)}
    y = np.array([idx[r["label"]] for r in rows])

    def fn(step: int) -> dict:
        return {"val_accuracy": float((predict_labels(model, encoder, rows) == y).mean())}

    return fn


def _export_hf(model, arch, vocab: int, tokenizer, folder: Path) -> str | None:
    """HF export next to the Megatron checkpoint; failures are recorded, not fatal."""
    try:
        from distillscale.models.hf_io import save_hf
    except ImportError as e:  # pragma: no cover - only when the module is missing
        return f"hf export unavailable: {e}"
    save_hf(model, arch, vocab, folder / "hf", tokenizer=tokenizer)
    return None


# ---------------------------------------------------------------------------------- teacher


def run_teacher(cfg: ExperimentConfig) -> Path:
    """Train the scratch teacher (`teacher/`), then generate its supervision (`supervision/`):
    labels, traces per thinking depth, top-k logit caches (distillscale/teacher/)."""
    import hashlib

    from distillscale.teacher.stage import supervise, train_scratch_teacher

    p = Paths(cfg)
    taxonomy = load_taxonomy(cfg.domain.taxonomy)
    inputs = {"data": p.data}
    # Supervision settings are not part of the teacher's identity: changing them re-runs only
    # the supervision stage.
    ident = {"domain": cfg.domain.model_dump(mode="json"), "seed": cfg.seed,
             "teacher": cfg.teacher.model_dump(mode="json", exclude={"supervision"})}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    if cfg.teacher.source == "hf":
        raise NotImplementedError(
            "teacher.source=hf: pruning and distilling a hub teacher needs its Megatron "
            "checkpoint; its supervision alone runs with distillscale.teacher.stage.supervise"
        )
    if not _skip(p.teacher, "teacher", h, inputs):
        _setup(cfg)
        with atomic_stage(p.teacher, "teacher", h, inputs) as out:
            out.metrics.update(train_scratch_teacher(
                cfg, out.path, taxonomy, load_split(p.data, "train"), load_split(p.data, "val")))
        m = read_manifest(p.teacher)["metrics"]
        console.print(f"teacher: {m['params']:,} params, val accuracy "
                      f"{m['final_val_accuracy']:.3f}, knowledge perplexity {m['knowledge_ppl']:.2f}")
    sup_inputs = {"teacher": p.teacher, "data": p.data, "family": Path(cfg.teacher.supervision.family)}
    hs = cfg.section_hash("domain", "seed") + ":" + hashlib.sha256(
        cfg.teacher.supervision.model_dump_json().encode()).hexdigest()[:16]
    if not _skip(p.supervision, "supervision", hs, sup_inputs):
        with atomic_stage(p.supervision, "supervision", hs, sup_inputs) as out:
            out.metrics.update(supervise(cfg, p.teacher, p.data, out.path, taxonomy))
        for split, depths in read_manifest(p.supervision)["metrics"]["depths"].items():
            console.print(f"supervision ({split}): " + ", ".join(
                f"{d} acc {v['accuracy']:.3f} rejected {v['rejected']}"
                + (f" trace {v['trace_tokens']['mean']:.1f} tok" if "trace_tokens" in v else "")
                for d, v in depths.items()))
    return p.teacher


# ------------------------------------------------------------------------------------ prune


def student_steps(cfg: ExperimentConfig, student: StudentTarget):
    """The schedule's prune steps for `student` (distillscale/prune/schedule.py), planned on the
    teacher's shape from its checkpoint (no model is loaded)."""
    from distillscale.prune.schedule import plan_schedule

    meta = Paths(cfg).teacher / "checkpoint" / "arch.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing; run the teacher stage first")
    m = json.loads(meta.read_text())
    from distillscale.config import ModelArch

    return plan_schedule(ModelArch.model_validate(m["arch"]), int(m["vocab_size"]), student,
                         cfg.prune)


def student_folders(cfg: ExperimentConfig, student: StudentTarget) -> list[tuple[int, Path, Path]]:
    """(step, pruned folder, distilled folder) of every step; the last step is the student's own
    `pruned/` and `distilled/`, earlier ones live under `step<k>/`."""
    p, n = Paths(cfg), len(student_steps(cfg, student))
    return [(k, p.pruned(student.name, None if k == n else k),
             p.distilled(student.name, None if k == n else k)) for k in range(1, n + 1)]


def run_prune(cfg: ExperimentConfig, student: StudentTarget, step: int | None = None) -> Path:
    """Prune one step of `student`'s schedule; without `step`, the whole schedule up to the last
    prune (intermediate students are distilled on the way, as the schedule requires)."""
    steps = student_steps(cfg, student)
    if step is None:
        for k in range(1, len(steps)):
            run_prune(cfg, student, k)
            run_distill(cfg, student, k)
        return run_prune(cfg, student, len(steps))
    if not 1 <= step <= len(steps):
        raise ValueError(f"student {student.name}: step {step} not in 1..{len(steps)}")
    plan = steps[step - 1]
    folders = {k: (pr, di) for k, pr, di in student_folders(cfg, student)}
    p = Paths(cfg)
    out_dir = folders[step][0]
    src = p.teacher if step == 1 else folders[step - 1][1]
    label = student.name if len(steps) == 1 else f"{student.name} step {step}/{len(steps)}"
    inputs = {"teacher": p.teacher, "data": p.data, "source": src}
    h = cfg.section_hash("prune") + ":" + _student_hash(student) + f":{step}"
    if _skip(out_dir, f"prune {label}", h, inputs):
        return out_dir
    from distillscale.distill.export import check_hf_export
    from distillscale.manifest import input_hash
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.models.megatron_gpt import count_params, forward_logits
    from distillscale.prune.minitron import prune_minitron

    _setup(cfg)
    teacher_params = int(read_manifest(p.teacher)["metrics"]["params"])
    source, arch, vocab = load_model(src)
    encoder, tok = _encoder(cfg, p.teacher, arch.seq_length)
    calib = load_split(p.data, "train")[: cfg.prune.calibration_samples]
    target = plan.target

    def forward_loop(model):
        with torch.no_grad():
            for i in range(0, len(calib), 32):
                forward_logits(model, encoder.encode(calib[i : i + 32]).tokens)

    # Importance scores belong to the source model and the calibration set: keyed by both, so
    # every student (and step) pruned from the same model reuses them.
    scores = p.root / "importance" / (
        f"{input_hash(src)}-n{cfg.prune.calibration_samples}-s{cfg.seed}")
    with atomic_stage(out_dir, "prune", h, inputs) as out:
        info: dict = {}
        model, new_arch = prune_minitron(
            source, arch, target, forward_loop,
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
        note = _export_hf(model, new_arch, vocab, tok, out.path)
        if note:
            out.metrics["hf_export"] = note
        else:
            out.metrics["hf_max_abs_logit_diff"] = check_hf_export(
                model, out.path / "hf", encoder.encode(calib[:8]).tokens)
        out.metrics.update({
            "axis": student.axis, "target": target, "arch": new_arch.model_dump(mode="json"),
            "params": params, "teacher_params": teacher_params,
            "compression_ratio": params / teacher_params,
            "requested_ratio": student.compression_ratio, "planned_ratio": plan.planned_ratio,
            "schedule": cfg.prune.schedule, "step": step, "steps": len(steps),
            "source": str(src), "importance_cached": info.get("scores_cached", False),
            "dropped_layers": info.get("dropped_layers"),
            "prune_seconds": round(info.get("prune_seconds", 0.0), 2),
        })
    console.print(f"prune {label}: {student.axis} -> {target}, "
                  f"{params:,} params ({params / teacher_params:.2f} of teacher)")
    return out_dir


def _student_hash(student: StudentTarget) -> str:
    import hashlib

    return hashlib.sha256(student.model_dump_json().encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- distill


def run_distill(cfg: ExperimentConfig, student: StudentTarget, step: int | None = None) -> Path:
    """Distill one step's pruned student; without `step`, the whole schedule (every prune and
    distillation step, each skipped when up to date)."""
    from distillscale.distill.bridge import select_backend

    # First: a forced `bridge` on a machine without CUDA / transformer-engine fails at once.
    backend = select_backend(cfg.distill.backend)
    steps = student_steps(cfg, student)
    if step is None:
        for k in range(1, len(steps) + 1):
            run_prune(cfg, student, k)
            out = run_distill(cfg, student, k)
        return out
    folders = {k: (pr, di) for k, pr, di in student_folders(cfg, student)}
    p = Paths(cfg)
    src, out_dir = folders[step]
    label = student.name if len(steps) == 1 else f"{student.name} step {step}/{len(steps)}"
    inputs = {"pruned": src, "teacher": p.teacher, "data": p.data}
    if cfg.distill.supervision != "label" or cfg.distill.teacher_logits == "cache":
        inputs["supervision"] = p.supervision  # traces, or the logit cache's key
    h = cfg.section_hash("distill", "seed")
    if _skip(out_dir, f"distill {label}", h, inputs):
        return out_dir
    if backend == "bridge":
        return _run_distill_bridge(cfg, src, out_dir, h, inputs, label, step, len(steps))
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
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.models.megatron_gpt import count_params

    _setup(cfg)
    teacher, t_arch, vocab = load_model(p.teacher)
    model, arch, s_vocab = load_model(src)
    encoder, tok = _encoder(cfg, p.teacher, t_arch.seq_length)
    # One tokenizer (else an error); differently padded vocabularies are compared on its real
    # range (None: same padding, nothing to align).
    real_vocab = aligned_vocab(tok, src, vocab, s_vocab)
    train_rows = _train_rows(cfg, p)
    val_rows = load_split(p.data, "val")
    teacher_val = answer_logprobs(teacher, encoder, val_rows, real_vocab=real_vocab)
    kl_before = answer_kl(model, teacher_val, encoder, val_rows, real_vocab=real_vocab)
    # The format's own supervised tokens (trace + answer; the trace for blended CoT) on held-out
    # rows with the teacher's traces, when the supervision stage covered the val split.
    fmt = cfg.distill.supervision
    fmt_val = _format_val_rows(cfg, p)
    teacher_fmt = fmt_kl_before = None
    if fmt_val:
        teacher_fmt = supervised_logprobs(teacher, encoder, fmt_val, fmt, real_vocab=real_vocab)
        fmt_kl_before = supervised_kl(model, teacher_fmt, encoder, fmt_val, fmt, real_vocab)
    masks = mask_token_counts(encoder, train_rows, fmt)
    if cfg.distill.loss.alpha == 1.0:
        masks["ce_term"] = 0  # no CE anchor: the KL term alone
    cached = None
    if cfg.distill.teacher_logits == "cache":
        cached = load_cached_teacher(cfg, p.supervision, p.teacher, train_rows)
        teacher = None  # only its validation log-probs are kept; training never runs it
    with atomic_stage(out_dir, "distill", h, inputs) as out:
        ckpt, tb = out.path / "checkpoints" / "last.pt", out.path / "tensorboard"
        if cfg.distill.method == "lora_kd":
            from distillscale.distill.lora_kd import lora_distill_megatron

            plain, history, adapters = lora_distill_megatron(
                model, arch, s_vocab, p.teacher / "hf", tok, encoder, train_rows, cfg.distill,
                cfg.seed, ckpt, f"lora_kd {label}", tensorboard_dir=tb, cached=cached,
                real_vocab=real_vocab)
            out.metrics["lora_trainable_params"] = adapters
        else:
            plain, history = distill(
                model, teacher, encoder, train_rows, cfg.distill, cfg.seed, ckpt,
                f"distill {label}", eval_fn=_accuracy_eval(model, encoder, val_rows),
                tensorboard_dir=tb, cached=cached, real_vocab=real_vocab,
            )
        kl_after = answer_kl(plain, teacher_val, encoder, val_rows, real_vocab=real_vocab)
        fmt_kl_after = (supervised_kl(plain, teacher_fmt, encoder, fmt_val, fmt, real_vocab)
                        if fmt_val else None)
        save_model(plain, arch, s_vocab, out.path)
        note = _export_hf(plain, arch, s_vocab, tok, out.path)
        (out.path / "checkpoints" / "last.pt").unlink(missing_ok=True)
        out.metrics.update({
            "params": count_params(plain), "val_kl_before": kl_before, "val_kl_after": kl_after,
            "method": cfg.distill.method, "supervision": cfg.distill.supervision,
            "teacher_logits": cfg.distill.teacher_logits, "aligned_vocab": real_vocab,
            "schedule": cfg.prune.schedule, "step": step, "steps": len(steps),
            "loss": cfg.distill.loss.model_dump(mode="json"), "mask_tokens": masks,
            # KL on the format's supervised tokens of held-out rows (for label: the answer KL).
            "val_kl_supervised_before": kl_before if fmt == "label" else fmt_kl_before,
            "val_kl_supervised_after": kl_after if fmt == "label" else fmt_kl_after,
            "val_kl_supervised_rows": len(val_rows) if fmt == "label" else len(fmt_val or []),
            "history": history,
        })
        if note:
            out.metrics["hf_export"] = note
        else:
            # The exported checkpoint must be the trained model (raises beyond tolerance).
            out.metrics["hf_max_abs_logit_diff"] = check_hf_export(
                plain, out.path / "hf", encoder.encode(val_rows[:8]).tokens)
            if (p.teacher / "hf" / "config.json").is_file():
                from distillscale.distill.speed import student_speed

                # A pruned student must actually be faster: CPU prefill speed vs the teacher.
                out.metrics.update(student_speed(out.path / "hf", p.teacher / "hf"))
    extra = ""
    if fmt_val:
        extra = f"; on {fmt} tokens {fmt_kl_before:.4f} -> {fmt_kl_after:.4f}"
    console.print(f"distill {label}: val KL(teacher||student) {kl_before:.4f} -> "
                  f"{kl_after:.4f}{extra}")
    return out_dir


# Held-out rows on which a trace format's supervised-token KL is measured (bounded: the
# per-token log-probabilities over the vocabulary are kept for the teacher).
FORMAT_VAL_ROWS = 64


def _format_val_rows(cfg: ExperimentConfig, p: Paths) -> list[dict] | None:
    """Val rows with the teacher's traces for a trace format (None: label, or val not supervised)."""
    if cfg.distill.supervision == "label" or not (p.supervision / "val.jsonl").is_file():
        return None
    from distillscale.teacher.supervision import load_supervision_rows

    return load_supervision_rows(p.supervision, "val", cfg.distill.supervision)[:FORMAT_VAL_ROWS]


def _train_rows(cfg: ExperimentConfig, p: Paths) -> list[dict]:
    """The distillation rows: the data split for `label`, else the supervision stage's rows with
    the teacher's traces at the format's depth (`supervision/train.jsonl`)."""
    if cfg.distill.supervision == "label":
        return load_split(p.data, "train")
    from distillscale.teacher.supervision import load_supervision_rows

    return load_supervision_rows(p.supervision, "train", cfg.distill.supervision)


def _run_distill_bridge(cfg: ExperimentConfig, src: Path, out_dir: Path, h: str, inputs: dict,
                        label: str, step: int, n_steps: int) -> Path:
    """The GPU path (distillscale/distill/bridge.py): Megatron-Bridge trains from the HF exports
    of the pruned student and the teacher and writes the distilled student's `hf/`."""
    from distillscale.distill.bridge import distill_bridge

    p = Paths(cfg)
    train_rows = _train_rows(cfg, p)
    # Validation rows carry the teacher's traces only when the supervision stage covered the
    # val split; otherwise Bridge validates on the label format (the answer tokens).
    val_sup = p.supervision / "val.jsonl"
    if cfg.distill.supervision != "label" and val_sup.is_file():
        from distillscale.teacher.supervision import load_supervision_rows

        val_rows, val_format = (load_supervision_rows(p.supervision, "val", cfg.distill.supervision),
                                cfg.distill.supervision)
    else:
        val_rows, val_format = load_split(p.data, "val"), "label"
    with atomic_stage(out_dir, "distill", h, inputs) as out:
        # An HF teacher used as is (teacher.source=hf) may have no export in the stage folder.
        teacher_hf = p.teacher / "hf"
        if not (teacher_hf / "config.json").is_file() and cfg.teacher.hf_path:
            teacher_hf = Path(cfg.teacher.hf_path)
        out.metrics.update(distill_bridge(cfg, src / "hf", teacher_hf, out.path,
                                          train_rows, val_rows, val_format=val_format))
        out.metrics.update({"method": cfg.distill.method, "supervision": cfg.distill.supervision,
                            "schedule": cfg.prune.schedule, "step": step, "steps": n_steps})
    console.print(f"distill {label}: Megatron-Bridge backend done")
    return out_dir


# ------------------------------------------------------------------------------------- eval


def run_eval(cfg: ExperimentConfig) -> Path:
    import pandas as pd

    from distillscale.eval.general import evaluate_hf_export
    from distillscale.eval.indomain import generate_labels, predict_labels, score_detailed
    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import count_params

    p = Paths(cfg)
    general_cfg = cfg.eval.general.model_copy(update={
        k: getattr(cfg.eval.general, k).replace("{run_dir}", str(cfg.run_dir))
        for k in ("mmlu_path", "mmlu_pro_path") if getattr(cfg.eval.general, k)
    })
    models = {"teacher": p.teacher}
    step_of: dict[str, int] = {"teacher": 0}
    for s in cfg.students:  # every step of the schedule; the last is `<name>/pruned|distilled`
        folders = student_folders(cfg, s)
        for k, pruned, distilled in folders:
            prefix = s.name if k == len(folders) else f"{s.name}/step{k}"
            models[f"{prefix}/pruned"], models[f"{prefix}/distilled"] = pruned, distilled
            step_of[f"{prefix}/pruned"] = step_of[f"{prefix}/distilled"] = k
    inputs = {"data": p.data, **models}
    h = cfg.section_hash("eval", "prune", "distill", "seed")
    if _skip(p.eval, "eval", h, inputs):
        return p.eval
    _setup(cfg)
    rows = load_split(p.data, cfg.eval.split)
    teacher, t_arch, _ = load_model(p.teacher)
    encoder, _ = _encoder(cfg, p.teacher, t_arch.seq_length)
    idx = {n: i for i, n in enumerate(encoder.labels)}
    y = np.array([idx[r["label"]] for r in rows])
    y_gold = np.array([idx.get(r.get("gold_label", r["label"]), -1) for r in rows])
    teacher_params = count_params(teacher)
    records, preds, per_class, cells, notes = [], {}, [], [], set()
    by_name = {s.name: s for s in cfg.students}
    generative = cfg.eval.scoring == "generative"
    with atomic_stage(p.eval, "eval", h, inputs) as out:
        for name, folder in models.items():
            model, arch, _ = (teacher, t_arch, None) if name == "teacher" else load_model(folder)
            if generative:
                # CoT-supervised students open their reasoning as they were trained to.
                depth = cfg.distill.supervision if (
                    name.endswith("distilled") and cfg.distill.supervision.startswith("cot")
                ) else None
                pred, _texts = generate_labels(model, encoder, rows, cfg.eval.max_new_tokens,
                                               depth, cfg.eval.batch_size)
            else:
                pred = predict_labels(model, encoder, rows, cfg.eval.batch_size)
            preds[name] = pred
            metrics, pc, cm = score_detailed(
                y, pred, y_gold, cfg.eval.bootstrap_samples, cfg.seed, generative, encoder.labels)
            per_class += [{"model": name, **r} for r in pc]
            cells += [{"model": name, **r} for r in cm]
            general, why = evaluate_hf_export(folder / "hf", general_cfg,
                                              cfg.teacher.source == "scratch")
            notes.update(why)
            metrics.update({k: {c: v[c] for c in ("value", "ci_low", "ci_high")}
                            for k, v in general.items()})
            params = count_params(model)
            student = by_name.get(name.split("/")[0])
            base = {
                "model": name, "params": params, "compression_ratio": params / teacher_params,
                "axis": student.axis if student else "none",
                "stage": name.rsplit("/", 1)[1] if "/" in name else "teacher",
                "schedule": cfg.prune.schedule if student else "none", "step": step_of[name],
                "method": cfg.distill.method if name.endswith("distilled") else "none",
                "supervision": cfg.distill.supervision if name.endswith("distilled") else "none",
                "dataset_size": len(load_split(p.data, "train")), "seed": cfg.seed,
                "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
                "ffn_hidden_size": arch.ffn_hidden_size,
                "num_attention_heads": arch.num_attention_heads,
            }
            for metric, v in metrics.items():
                records.append({**base, "metric": metric, **v})
        long = pd.DataFrame.from_records(records)
        long["manifest_hash"] = h
        # The results table has exactly the columns of the results schema (the fit stage's
        # only input); the per-model shape columns go to models.csv for the wide view.
        long[list(RESULT_COLUMNS)].to_csv(out.path / "results_long.csv", index=False)
        long[list(RESULT_COLUMNS)].to_parquet(out.path / "results.parquet", index=False)
        model_cols = [c for c in long.columns if c not in RESULT_COLUMNS or c == "model"]
        long[model_cols].drop_duplicates("model").to_csv(out.path / "models.csv", index=False)
        pd.DataFrame(per_class).to_csv(out.path / "per_class_f1.csv", index=False)
        pd.DataFrame(cells).to_csv(out.path / "confusion.csv", index=False)
        out.metrics["notes"] = sorted(notes)
        for n in sorted(notes):
            console.print(f"[yellow]eval: {n}[/yellow]")
        pd.DataFrame({k: v for k, v in preds.items()}).assign(
            label=[r["label"] for r in rows], id=[r["id"] for r in rows]
        ).to_csv(out.path / "predictions.csv", index=False)
        out.metrics["models"] = len(models)
    return p.eval


RESULT_COLUMNS = ("model", "params", "compression_ratio", "axis", "schedule", "step", "method",
                  "supervision", "dataset_size", "seed", "metric", "value", "ci_low", "ci_high",
                  "manifest_hash")


def wide_results(long) -> pd.DataFrame:  # noqa: F821
    """One row per model: the convenience view `results.csv`."""
    keys = ["model", "params", "compression_ratio", "axis", "stage", "schedule", "step",
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"]
    wide = long.pivot_table(index=keys, columns="metric", values="value").reset_index()
    lows = long.pivot_table(index="model", columns="metric", values="ci_low").add_suffix("_ci_low")
    highs = long.pivot_table(index="model", columns="metric", values="ci_high").add_suffix("_ci_high")
    wide = wide.merge(lows, left_on="model", right_index=True).merge(
        highs, left_on="model", right_index=True
    )
    wide.columns.name = None
    order = wide["stage"].map({"teacher": 0, "pruned": 1, "distilled": 2})
    wide = wide.assign(_order=order).sort_values(["compression_ratio", "_order"],
                                                 ascending=[False, True])
    return wide.drop(columns="_order").reset_index(drop=True)


# ---------------------------------------------------------------------------------- report


def run_report(cfg: ExperimentConfig) -> Path:
    import pandas as pd

    from distillscale.manifest import write_text_atomic
    from distillscale.report import build_report

    p = Paths(cfg)
    if not is_rank_zero():
        return p.root / "report.md"
    long = pd.read_parquet(p.eval / "results.parquet")
    models = p.eval / "models.csv"
    full = long.merge(pd.read_csv(models), on="model", how="left") if models.is_file() else long
    write_text_atomic(p.root / "results.csv", wide_results(full).to_csv(index=False))
    extra = {}
    for s in cfg.students:
        man = read_manifest(p.distilled(s.name))
        if man:
            extra[s.name] = {k: man["metrics"].get(k)
                             for k in ("val_kl_before", "val_kl_after", "cpu_speedup")}
    taxonomy = load_taxonomy(cfg.domain.taxonomy)
    k = len(taxonomy.classes)
    notes = (read_manifest(p.eval) or {}).get("metrics", {}).get("notes", [])
    intro = (
        f"Teacher and students on the `{cfg.eval.split}` split ({k} classes, chance ≈ {1 / k:.3f}), "
        f"scored `{cfg.eval.scoring}`. Students are pruned with ModelOpt Minitron "
        f"(`{cfg.prune.schedule}`) and recovered with `{cfg.distill.method}` on "
        f"`{cfg.distill.supervision}` supervision ({cfg.distill.loss.kind}, "
        f"T={cfg.distill.loss.temperature}, alpha={cfg.distill.loss.alpha}). Per-class F1 and "
        "the confusion matrix (with CIs) are in `eval/per_class_f1.csv` and `eval/confusion.csv`."
        + "".join(f"\n\n- {n}" for n in notes)
    )
    return build_report(long, p.root, p.fit, num_classes=k, title=cfg.name, intro=intro,
                        extra=extra)


def run_fit(cfg: ExperimentConfig) -> Path:
    import pandas as pd

    from distillscale.fit import fit_results

    p = Paths(cfg)
    inputs = {"eval": p.eval}
    h = cfg.section_hash("fit", "domain", "seed")
    if _skip(p.fit, "fit", h, inputs):
        return p.fit
    if not is_rank_zero():
        return wait_for_stage(p.fit, h, inputs)
    long = pd.read_parquet(p.eval / "results.parquet")
    num_classes = len(load_taxonomy(cfg.domain.taxonomy).classes)
    with atomic_stage(p.fit, "fit", h, inputs, collective=False) as out:
        fits = fit_results(long, out.path, cfg.fit, num_classes, cfg.seed,
                           source=str(p.eval / "results.parquet"))
        out.metrics["fits"] = len(fits)
    return p.fit


# ------------------------------------------------------------------------------------- run


def run_all(cfg: ExperimentConfig) -> Path:
    t0 = time.time()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    from distillscale.config import config_to_yaml
    from distillscale.manifest import write_text_atomic

    if is_rank_zero():
        write_text_atomic(cfg.run_dir / "config.yaml", config_to_yaml(cfg))
    run_data(cfg)
    run_teacher(cfg)
    for s in cfg.students:  # every step of the schedule: prune, distill, prune, ...
        run_distill(cfg, s)
    run_eval(cfg)
    run_fit(cfg)
    report = run_report(cfg)
    console.print(f"[bold green]done[/bold green] in {time.time() - t0:.0f}s: {report}")
    return report
