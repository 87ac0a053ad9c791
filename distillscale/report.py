"""`report.md`: the results table and metric-vs-compression plots of one experiment."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from distillscale.manifest import write_text_atomic


def plot_metric(wide, metric: str, chance: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for stage, marker in (("pruned", "x"), ("distilled", "o")):
        for axis, color in (("width", "tab:blue"), ("depth", "tab:orange")):
            sub = wide[(wide["stage"] == stage) & (wide["axis"] == axis)]
            if sub.empty:
                continue
            ax.errorbar(
                sub["compression_ratio"], sub[metric],
                yerr=[sub[metric] - sub[f"{metric}_ci_low"], sub[f"{metric}_ci_high"] - sub[metric]],
                fmt=marker, color=color, capsize=3, label=f"{axis} / {stage}",
                linestyle="none" if stage == "pruned" else "-",
            )
    t = wide[wide["stage"] == "teacher"]
    ax.errorbar(t["compression_ratio"], t[metric], fmt="*", color="black", markersize=12,
                label="teacher")
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.3f})")
    ax.set_xlabel("compression ratio (student params / teacher params)")
    ax.set_ylabel(metric)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(wide, extra: dict) -> str:
    cols = ["model", "params", "compression_ratio", "num_layers", "hidden_size",
            "ffn_hidden_size", "num_attention_heads", "macro_f1", "accuracy"]
    lines = ["| " + " | ".join(cols + ["macro_f1 95% CI", "val KL before → after"]) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for _, r in wide.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        cells.append(f"[{r['macro_f1_ci_low']:.3f}, {r['macro_f1_ci_high']:.3f}]")
        name = r["model"].split("/")[0]
        kl = extra.get(name) if r["model"].endswith("distilled") else None
        cells.append(f"{kl['val_kl_before']:.3f} → {kl['val_kl_after']:.3f}" if kl else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(cfg, wide, extra: dict, root: Path, fits: list | None) -> None:
    from distillscale.domain import load_taxonomy

    k = len(load_taxonomy(cfg.domain.taxonomy).classes)
    wide.to_csv(root / ".results.csv.tmp", index=False)
    (root / ".results.csv.tmp").replace(root / "results.csv")
    plots = []
    for metric in ("macro_f1", "accuracy"):
        path = root / "plots" / f"{metric}_vs_compression.png"
        # Chance for a uniform guesser: 1/k accuracy; macro F1 of a uniform guesser is ~1/k too.
        plot_metric(wide, metric, 1.0 / k, path)
        plots.append(path.relative_to(root))
    parts = [
        f"# {cfg.name}: compression report",
        "",
        (f"Teacher and students on the `{cfg.eval.split}` split ({k} classes, chance ≈ {1 / k:.3f}). "
        f"Students are pruned with ModelOpt Minitron ({cfg.prune.schedule}) and recovered with "
        f"`{cfg.distill.method}` on `{cfg.distill.supervision}` supervision "
        f"({cfg.distill.loss.kind}, T={cfg.distill.loss.temperature}, alpha={cfg.distill.loss.alpha}). "
        "CIs are percentile bootstrap (95%)."),
        "",
        _table(wide, extra),
        "",
    ]
    for p in plots:
        parts += [f"![{p.stem}]({p.as_posix()})", ""]
    if fits:
        parts += ["## Fits vs compression ratio", "", "| metric | form | params | RMSE | AIC |",
                  "|---|---|---|---|---|"]
        for f in fits:
            ps = ", ".join(f"{n}={v['value']:.3g}" for n, v in f["params"].items())
            parts.append(f"| {f['metric']} | {f['form']} | {ps} | {f['rmse']:.4f} | {f['aic']:.2f} |")
        parts.append("")
    write_text_atomic(root / "report.md", "\n".join(parts))
