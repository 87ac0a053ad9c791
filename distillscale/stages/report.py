"""Report: `results.csv` (one row per model), `report.md` / `report.html` with the findings,
tables and plots (`distillscale/report.py`). Always rewritten from the eval and fit stages."""

from __future__ import annotations

import pandas as pd

from distillscale.manifest import StageOutput, read_manifest, write_text_atomic
from distillscale.report import build_report
from distillscale.runner import Context, Stage


def wide_results(long: pd.DataFrame) -> pd.DataFrame:
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


def _body(ctx: Context, out: StageOutput) -> None:
    cfg, p = ctx.cfg, ctx.paths
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
    k = len(ctx.taxonomy.classes)
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
    out.metrics["report"] = str(build_report(long, p.root, p.fit, num_classes=k, title=cfg.name,
                                             intro=intro, extra=extra))


# No stage folder: results.csv and the report sit at the top of the run folder and are
# rewritten on every run (rank 0 only).
STAGE = Stage("report", _body)
