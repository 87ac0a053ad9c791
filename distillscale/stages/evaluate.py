"""Evaluate: the teacher and every pruned and distilled student (every schedule step) on the
held-out split — in-domain macro F1 / accuracy with bootstrap CIs (`eval/indomain.py`) and
general knowledge through lm-eval on the HF exports (`eval/general.py`).

A model is read from its Megatron checkpoint, or, for a student distilled on the Bridge path
(which writes only `hf/`), from its HF export with transformers. General knowledge runs first,
before this process loads any model: on GPU each export gets a vLLM engine in a process of
its own, which must be the only model on its GPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from distillscale.config import ModelArch
from distillscale.eval.general import benchmark_paths, evaluate_hf_export
from distillscale.eval.indomain import generate_labels, hf_causal_lm, predict_labels, score_detailed
from distillscale.manifest import StageOutput
from distillscale.models.checkpoint import CHECKPOINT, load_model, read_arch
from distillscale.models.hf_io import arch_from_hf_config
from distillscale.models.megatron_gpt import count_params
from distillscale.runner import Context, Stage, console, student_folders
from distillscale.stages.rows import encoder, load_split

RESULT_COLUMNS = ("model", "params", "compression_ratio", "axis", "schedule", "step", "method",
                  "supervision", "dataset_size", "seed", "metric", "value", "ci_low", "ci_high",
                  "manifest_hash")


def evaluated_models(ctx: Context) -> tuple[dict[str, Path], dict[str, int]]:
    """Name -> folder of the teacher and every step of every student's schedule (the last step
    is `<name>/pruned|distilled`, earlier ones `<name>/step<k>/...`), and each one's step."""
    models, step_of = {"teacher": ctx.paths.teacher}, {"teacher": 0}
    for s in ctx.cfg.students:
        folders = student_folders(ctx, s)
        for k, pruned, distilled in folders:
            prefix = s.name if k == len(folders) else f"{s.name}/step{k}"
            models[f"{prefix}/pruned"], models[f"{prefix}/distilled"] = pruned, distilled
            step_of[f"{prefix}/pruned"] = step_of[f"{prefix}/distilled"] = k
    return models, step_of


def _inputs(ctx: Context) -> dict[str, Path]:
    return {"data": ctx.paths.data, **evaluated_models(ctx)[0]}


def _hf_only(folder: Path) -> bool:
    """No Megatron checkpoint but an HF export: a student distilled on the Bridge path."""
    folder = Path(folder)
    return (not (folder / CHECKPOINT / "arch.json").is_file()
            and (folder / "hf" / "config.json").is_file())


def model_shape(folder: Path) -> ModelArch:
    """A model folder's shape, no weights read: `arch.json`, or the HF export's config.json."""
    folder = Path(folder)
    if _hf_only(folder):
        return arch_from_hf_config(folder / "hf")[0]
    try:
        return read_arch(folder)[0]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} and no HF export") from None


def load_evaluated(folder: Path):
    """(model, shape, parameter count) of a model folder: the Megatron-core model of its
    checkpoint, or for an HF-only folder (`_hf_only`) the transformers model of its export, the
    shape from its config.json. `parameters()` yields a tied embedding / LM head once in both,
    so the counts agree."""
    folder = Path(folder)
    if _hf_only(folder):
        model, arch = hf_causal_lm(folder / "hf"), model_shape(folder)
    else:
        model, arch, _ = load_model(folder)
    return model, arch, count_params(model)


def indomain_predictions(ctx: Context, name: str, folder: Path, model, enc,
                         rows: list[dict]) -> np.ndarray:
    """Class index (generative: -1 for no answer) predicted by the model `name` for each row."""
    cfg = ctx.cfg
    if cfg.eval.scoring == "generative":
        # CoT-supervised students open their reasoning as they were trained to.
        depth = cfg.distill.supervision if (
            name.endswith("distilled") and cfg.distill.supervision.startswith("cot")
        ) else None
        pred, _texts = generate_labels(model, enc, rows, cfg.eval.max_new_tokens, depth,
                                       cfg.eval.batch_size)
        return pred
    # Multi-token class names are scored on the HF export's KV cache.
    hf_dir = Path(folder) / "hf"
    return predict_labels(model, enc, rows, cfg.eval.batch_size,
                          hf_dir=hf_dir if (hf_dir / "config.json").is_file() else None)


def _body(ctx: Context, out: StageOutput) -> None:
    cfg, p = ctx.cfg, ctx.paths
    general_cfg = cfg.eval.general.model_copy(
        update=benchmark_paths(cfg.eval.general, cfg.run_dir))
    models, step_of = evaluated_models(ctx)
    seq_length = model_shape(p.teacher).seq_length
    # General knowledge first, while this process holds no model (vLLM: one child process per
    # export). On GPU lm-eval runs vLLM: the launch plan's TP, the context the models have.
    general, notes = {}, set()
    for name, folder in models.items():
        with out.phase("general"):
            general[name], why = evaluate_hf_export(
                folder / "hf", general_cfg, cfg.teacher.source == "scratch",
                tensor_parallel=cfg.launch.vllm_tensor_parallel, max_model_len=seq_length)
        notes.update(why)
    rows = load_split(p.data, cfg.eval.split)
    dataset_size = len(load_split(p.data, "train"))
    enc, _ = encoder(ctx, seq_length)
    idx = {n: i for i, n in enumerate(enc.labels)}
    y = np.array([idx[r["label"]] for r in rows])
    y_gold = np.array([idx.get(r.get("gold_label", r["label"]), -1) for r in rows])
    records, preds, per_class, cells = [], {}, [], []
    by_name = {s.name: s for s in cfg.students}
    generative = cfg.eval.scoring == "generative"
    teacher_params = None
    for name, folder in models.items():  # the teacher first
        with out.phase("indomain"):
            model, arch, params = load_evaluated(folder)
            pred = preds[name] = indomain_predictions(ctx, name, folder, model, enc, rows)
            del model  # one model resident at a time
        if name == "teacher":
            teacher_params = params
        metrics, pc, cm = score_detailed(
            y, pred, y_gold, cfg.eval.bootstrap_samples, cfg.seed, generative, enc.labels)
        per_class += [{"model": name, **r} for r in pc]
        cells += [{"model": name, **r} for r in cm]
        metrics.update({k: {c: v[c] for c in ("value", "ci_low", "ci_high")}
                        for k, v in general[name].items()})
        student = by_name.get(name.split("/")[0])
        base = {
            "model": name, "params": params, "compression_ratio": params / teacher_params,
            "axis": student.axis if student else "none",
            "stage": name.rsplit("/", 1)[1] if "/" in name else "teacher",
            "schedule": cfg.prune.schedule if student else "none", "step": step_of[name],
            "method": cfg.distill.method if name.endswith("distilled") else "none",
            "supervision": cfg.distill.supervision if name.endswith("distilled") else "none",
            "dataset_size": dataset_size, "seed": cfg.seed,
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
            "ffn_hidden_size": arch.ffn_hidden_size,
            "num_attention_heads": arch.num_attention_heads,
        }
        for metric, v in metrics.items():
            records.append({**base, "metric": metric, **v})
    long = pd.DataFrame.from_records(records)
    long["manifest_hash"] = out.config_hash
    # The results table has exactly the columns of the results schema (the fit stage's only
    # input); the per-model shape columns go to models.csv for the wide view.
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


STAGE = Stage("eval", _body, folder=lambda ctx: ctx.paths.eval,
              sections=("eval", "prune", "distill", "seed"), inputs=_inputs)
