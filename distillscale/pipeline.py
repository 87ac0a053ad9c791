"""The stages of an experiment, composed by paths under `runs/<name>/`.

    data/                      train/val/test.jsonl, rejects.jsonl, manifest.json
    teacher/                   tokenizer/, checkpoint/, hf/, manifest.json
    students/<name>/pruned/    the Minitron-pruned student (before recovery)
    students/<name>/distilled/ the same student after distillation
    eval/                      results_long.csv, results.parquet, predictions, manifest.json
    fit/                       fits.json, fits.md
    results.csv  report.md  plots/

Each stage is skipped when its manifest matches the config sections and inputs it depends on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from distillscale.config import ExperimentConfig, StudentTarget
from distillscale.data.build import build_dataset, read_jsonl
from distillscale.domain import load_taxonomy
from distillscale.manifest import atomic_stage, is_up_to_date, read_manifest

console = Console(stderr=True)


class Paths:
    def __init__(self, cfg: ExperimentConfig):
        self.root = cfg.run_dir
        self.data = self.root / "data"
        self.teacher = self.root / "teacher"
        self.eval = self.root / "eval"
        self.fit = self.root / "fit"

    def pruned(self, name: str) -> Path:
        return self.root / "students" / name / "pruned"

    def distilled(self, name: str) -> Path:
        return self.root / "students" / name / "distilled"


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
    taxonomy = load_taxonomy(tax_path)
    with atomic_stage(p.data, "data", h, inputs) as out:
        d = cfg.data
        out.metrics.update(
            build_dataset(
                out.path, taxonomy, generator=d.generator, num_examples=d.num_examples,
                target_distribution=d.target_distribution, min_per_class=d.min_per_class,
                val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.seed,
                source_path=d.source_path,
            )
        )
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
    from distillscale.models.megatron_gpt import init_distributed

    init_distributed(cfg.launch.tensor_parallel, cfg.launch.pipeline_parallel, cfg.seed)
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
    p = Paths(cfg)
    inputs = {"data": p.data}
    h = cfg.section_hash("domain", "teacher", "seed")
    if _skip(p.teacher, "teacher", h, inputs):
        return p.teacher
    if cfg.teacher.source == "hf":
        raise NotImplementedError(
            "teacher.source=hf: loading a hub checkpoint as teacher needs the teacher-supervision "
            "stage (multi-token class names); use teacher.source=scratch"
        )
    from distillscale.models.checkpoint import save_model
    from distillscale.models.megatron_gpt import build_gpt, count_params, forward_logits
    from distillscale.tokenizer import PromptEncoder, build_word_tokenizer
    from distillscale.train.loop import train

    _setup(cfg)
    taxonomy = load_taxonomy(cfg.domain.taxonomy)
    train_rows = load_split(p.data, "train")
    val_rows = load_split(p.data, "val")
    arch = cfg.teacher.arch
    with atomic_stage(p.teacher, "teacher", h, inputs) as out:
        tok = build_word_tokenizer([r["text"] for r in train_rows], taxonomy.labels)
        tok.save_pretrained(out.path / "tokenizer")
        vocab = len(tok)
        encoder = PromptEncoder(tok, taxonomy.labels, arch.seq_length)
        batch = encoder.encode(train_rows)
        model = build_gpt(arch, vocab)

        def loss_fn(idx, step):
            logits = forward_logits(model, batch.tokens[idx]).float()
            b, s, v = logits.shape
            ce = F.cross_entropy(logits.view(-1, v), batch.targets[idx].view(-1), reduction="none")
            ce = ce.view(b, s)
            lm = (ce * batch.loss_mask[idx]).sum() / batch.loss_mask[idx].sum()
            ans = (ce * batch.answer_mask[idx]).sum() / batch.answer_mask[idx].sum()
            # Language modelling on the headline keeps a useful representation for pruning
            # calibration; the answer term is the task itself.
            return lm + ans, {"answer_ce": float(ans.detach())}

        result = train(
            model, list(model.parameters()), loss_fn, len(train_rows), cfg.teacher.train,
            cfg.seed, out.path / "checkpoints" / "last.pt", "teacher",
            eval_fn=_accuracy_eval(model, encoder, val_rows),
        )
        save_model(model, arch, vocab, out.path)
        note = _export_hf(model, arch, vocab, tok, out.path)
        (out.path / "checkpoints" / "last.pt").unlink(missing_ok=True)
        out.metrics.update({
            "params": count_params(model), "vocab_size": vocab,
            "final_val_accuracy": result.history[-1].get("val_accuracy"),
            "history": result.history,
        })
        if note:
            out.metrics["hf_export"] = note
    console.print(f"teacher: {count_params(model):,} params, "
                  f"val accuracy {result.history[-1].get('val_accuracy'):.3f}")
    return p.teacher


# ------------------------------------------------------------------------------------ prune


def run_prune(cfg: ExperimentConfig, student: StudentTarget) -> Path:
    p = Paths(cfg)
    out_dir = p.pruned(student.name)
    inputs = {"teacher": p.teacher, "data": p.data}
    h = cfg.section_hash("prune") + ":" + _student_hash(student)
    if _skip(out_dir, f"prune {student.name}", h, inputs):
        return out_dir
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.models.megatron_gpt import count_params, forward_logits
    from distillscale.prune.minitron import choose_shape, prune_minitron

    _setup(cfg)
    teacher, arch, vocab = load_model(p.teacher)
    encoder, _tok = _encoder(cfg, p.teacher, arch.seq_length)
    calib = load_split(p.data, "train")[: cfg.prune.calibration_samples]
    if student.compression_ratio is not None:
        target, predicted = choose_shape(
            arch, vocab, student.axis, student.compression_ratio,
            cfg.prune.hidden_size_divisor, cfg.prune.ffn_hidden_size_divisor,
        )
    else:
        target = {k: v for k, v in student.shape.model_dump().items() if v is not None}
        predicted = None

    def forward_loop(model):
        with torch.no_grad():
            for i in range(0, len(calib), 32):
                forward_logits(model, encoder.encode(calib[i : i + 32]).tokens)

    teacher_params = count_params(teacher)
    with atomic_stage(out_dir, "prune", h, inputs) as out:
        t0 = time.time()
        model, new_arch = prune_minitron(
            teacher, arch, target, forward_loop,
            hidden_size_divisor=cfg.prune.hidden_size_divisor,
            ffn_hidden_size_divisor=cfg.prune.ffn_hidden_size_divisor,
        )
        params = count_params(model)
        save_model(model, new_arch, vocab, out.path)
        out.metrics.update({
            "axis": student.axis, "target": target, "arch": new_arch.model_dump(mode="json"),
            "params": params, "teacher_params": teacher_params,
            "compression_ratio": params / teacher_params,
            "requested_ratio": student.compression_ratio, "planned_ratio": predicted,
            "prune_seconds": round(time.time() - t0, 2),
        })
    console.print(f"prune {student.name}: {student.axis} -> {target}, "
                  f"{params:,} params ({params / teacher_params:.2f} of teacher)")
    return out_dir


def _student_hash(student: StudentTarget) -> str:
    import hashlib

    return hashlib.sha256(student.model_dump_json().encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- distill


def run_distill(cfg: ExperimentConfig, student: StudentTarget) -> Path:
    p = Paths(cfg)
    src, out_dir = p.pruned(student.name), p.distilled(student.name)
    inputs = {"pruned": src, "teacher": p.teacher, "data": p.data}
    h = cfg.section_hash("distill", "seed")
    if _skip(out_dir, f"distill {student.name}", h, inputs):
        return out_dir
    from distillscale.distill.logit_kd import answer_kl, distill
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.models.megatron_gpt import count_params

    _setup(cfg)
    teacher, t_arch, vocab = load_model(p.teacher)
    model, arch, s_vocab = load_model(src)
    if s_vocab != vocab:
        raise ValueError(f"{src}: student vocab {s_vocab} != teacher vocab {vocab}")
    encoder, tok = _encoder(cfg, p.teacher, t_arch.seq_length)
    train_rows = load_split(p.data, "train")
    val_rows = load_split(p.data, "val")
    kl_before = answer_kl(model, teacher, encoder, val_rows)
    with atomic_stage(out_dir, "distill", h, inputs) as out:
        plain, history = distill(
            model, teacher, encoder, train_rows, cfg.distill, cfg.seed,
            out.path / "checkpoints" / "last.pt", f"distill {student.name}",
            eval_fn=_accuracy_eval(model, encoder, val_rows),
        )
        kl_after = answer_kl(plain, teacher, encoder, val_rows)
        save_model(plain, arch, vocab, out.path)
        note = _export_hf(plain, arch, vocab, tok, out.path)
        (out.path / "checkpoints" / "last.pt").unlink(missing_ok=True)
        out.metrics.update({
            "params": count_params(plain), "val_kl_before": kl_before, "val_kl_after": kl_after,
            "method": cfg.distill.method, "supervision": cfg.distill.supervision,
            "history": history,
        })
        if note:
            out.metrics["hf_export"] = note
    console.print(f"distill {student.name}: val KL(teacher||student) {kl_before:.4f} -> {kl_after:.4f}")
    return out_dir


# ------------------------------------------------------------------------------------- eval


def run_eval(cfg: ExperimentConfig) -> Path:
    import pandas as pd

    from distillscale.eval.indomain import predict_labels, score
    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import count_params

    p = Paths(cfg)
    models = {"teacher": p.teacher}
    for s in cfg.students:
        models[f"{s.name}/pruned"] = p.pruned(s.name)
        models[f"{s.name}/distilled"] = p.distilled(s.name)
    inputs = {"data": p.data, **models}
    h = cfg.section_hash("eval", "distill", "seed")
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
    records, preds = [], {}
    by_name = {s.name: s for s in cfg.students}
    with atomic_stage(p.eval, "eval", h, inputs) as out:
        for name, folder in models.items():
            model, arch, _ = (teacher, t_arch, None) if name == "teacher" else load_model(folder)
            pred = predict_labels(model, encoder, rows, cfg.eval.batch_size)
            preds[name] = pred
            metrics = score(y, pred, y_gold, cfg.eval.bootstrap_samples, cfg.seed)
            params = count_params(model)
            student = by_name.get(name.split("/")[0])
            base = {
                "model": name, "params": params, "compression_ratio": params / teacher_params,
                "axis": student.axis if student else "none",
                "stage": name.split("/")[1] if "/" in name else "teacher",
                "schedule": cfg.prune.schedule if student else "none", "step": 1 if student else 0,
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
        long.to_csv(out.path / "results_long.csv", index=False)
        long.to_parquet(out.path / "results.parquet", index=False)
        pd.DataFrame({k: v for k, v in preds.items()}).assign(
            label=[r["label"] for r in rows], id=[r["id"] for r in rows]
        ).to_csv(out.path / "predictions.csv", index=False)
        out.metrics["models"] = len(models)
    return p.eval


def wide_results(long) -> pd.DataFrame:  # noqa: F821
    """One row per model: the convenience view `results.csv`."""
    keys = ["model", "params", "compression_ratio", "axis", "stage", "num_layers",
            "hidden_size", "ffn_hidden_size", "num_attention_heads"]
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

    from distillscale.report import write_report

    p = Paths(cfg)
    long = pd.read_parquet(p.eval / "results.parquet")
    wide = wide_results(long)
    extra = {}
    for s in cfg.students:
        man = read_manifest(p.distilled(s.name))
        if man:
            extra[s.name] = {k: man["metrics"].get(k) for k in ("val_kl_before", "val_kl_after")}
    fits = None
    if (p.fit / "fits.json").is_file():
        fits = json.loads((p.fit / "fits.json").read_text())
    write_report(cfg, wide, extra, p.root, fits)
    return p.root / "report.md"


def run_fit(cfg: ExperimentConfig) -> Path:
    import pandas as pd

    from distillscale.fit import fit_results

    p = Paths(cfg)
    inputs = {"eval": p.eval}
    h = cfg.section_hash("fit")
    if _skip(p.fit, "fit", h, inputs):
        return p.fit
    long = pd.read_parquet(p.eval / "results.parquet")
    with atomic_stage(p.fit, "fit", h, inputs) as out:
        fits = fit_results(long, cfg.fit.metrics, cfg.fit.forms)
        (out.path / "fits.json").write_text(json.dumps(fits, indent=2) + "\n")
        out.metrics["fits"] = len(fits)
    return p.fit


# ------------------------------------------------------------------------------------- run


def run_all(cfg: ExperimentConfig) -> Path:
    t0 = time.time()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    from distillscale.config import config_to_yaml
    from distillscale.manifest import write_text_atomic

    write_text_atomic(cfg.run_dir / "config.yaml", config_to_yaml(cfg))
    run_data(cfg)
    run_teacher(cfg)
    for s in cfg.students:
        run_prune(cfg, s)
        run_distill(cfg, s)
    run_eval(cfg)
    run_fit(cfg)
    report = run_report(cfg)
    console.print(f"[bold green]done[/bold green] in {time.time() - t0:.0f}s: {report}")
    return report
