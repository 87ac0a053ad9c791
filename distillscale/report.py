"""`report.md` and a self-contained `report.html`: results, the paper's figure families for
this run's data, scaling fits and recommendations derived from them.

Figure families (each drawn only when the results have that dimension):
- metric vs dataset size (paper figs 4, 5, 11): one series per condition and model size;
- metric vs compression ratio (figs 6, 7, 12) for the non-decayed schedules, one panel per
  supervision format (formats side by side);
- decayed vs uniform schedules (figs 8, 9, 13).
Measured points carry their eval CIs; fitted curves (the AIC-selected form of each group, from
`fit/fits_detail.json`) carry their bootstrap 95% bands. `plots/figures.json` lists every
figure with its series, so what was drawn can be checked.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from distillscale.fit.findings import findings, findings_markdown
from distillscale.fit.table import (
    CONDITIONS,
    chance_floor,
    is_general,
    metric_label,
    normalize_results,
    target_text,
)
from distillscale.manifest import write_json_atomic, write_text_atomic

HEADLINE = ("macro_f1", "weighted_f1", "accuracy", "gold_accuracy", "parse_failure_rate",
            "mmlu", "mmlu_pro", "probe")
PLOTTED = ("macro_f1", "accuracy", "gold_accuracy", "mmlu", "mmlu_pro", "probe")


def _label(row_or_group: dict, keys) -> str:
    return " / ".join(str(row_or_group[k]) for k in keys if k in row_or_group)


def _curve_for(details: list[dict], metric: str, x: str, group: dict) -> dict | None:
    for d in details:
        if d["selected"] and d["metric"] == metric and d["x"] == x and all(
            d["group"].get(k) == v for k, v in group.items() if k in d["group"]
        ):
            return d
    return None


def _errorbar(ax, sub: pd.DataFrame, x: str, label: str, color, marker="o"):
    sub = sub.sort_values(x)
    y = sub["value"].to_numpy(float)
    lo = np.where(np.isfinite(sub["ci_low"]), sub["ci_low"], y)
    hi = np.where(np.isfinite(sub["ci_high"]), sub["ci_high"], y)
    return ax.errorbar(sub[x], y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)],
                       fmt=marker, color=color, capsize=3, label=label, linestyle="none")


def _band(ax, det: dict, color) -> None:
    c = det["curve"]
    ax.plot(c["x"], c["y"], color=color, linewidth=1.4)
    ax.fill_between(c["x"], c["ci_low"], c["ci_high"], color=color, alpha=0.15, linewidth=0)


def _finish(ax, metric: str, xlabel: str, floor: float, logx: bool) -> None:
    if floor > 0:
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1, label=f"chance {floor:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_label(metric))
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def figure_vs_dataset_size(long, metric, details, floor, path: Path) -> list[str] | None:
    rows = long[(long["metric"] == metric)].dropna(subset=["dataset_size"])
    if rows["dataset_size"].nunique() < 2:
        return None
    rows = rows.assign(size=rows["compression_ratio"].round(2))
    axis = ["axis"] if "axis" in rows.columns else []
    keys = [*CONDITIONS, *axis, "size"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    series = []
    colors = plt.cm.tab10.colors
    for i, (vals, sub) in enumerate(rows.groupby(keys, sort=True)):
        g = dict(zip(keys, vals))
        name = ("teacher" if g["method"] == "none" and g["size"] >= 0.999
                else f"{_group_label(g)} @ {g['size']:.2f}")
        color = colors[i % len(colors)]
        _errorbar(ax, sub, "dataset_size", name, color)
        group = {k: g[k] for k in (*CONDITIONS, *axis)} | {"compression_ratio": g["size"]}
        det = _curve_for(details, metric, "dataset_size", group)
        if det:
            _band(ax, det, color)
        series.append(name)
    _finish(ax, metric, "training examples (dataset size)", floor, logx=True)
    ax.set_title(f"{metric_label(metric)} vs dataset size")
    _save(fig, path)
    return series


def figure_vs_compression(long, metric, details, floor, path: Path,
                          schedules: list[str] | None = None) -> list[str] | None:
    rows = long[long["metric"] == metric]
    if rows["compression_ratio"].nunique() < 2:
        return None
    teacher = rows[(rows["method"] == "none") & (rows["compression_ratio"] >= 0.999)]
    students = rows.drop(teacher.index)
    if schedules is not None:
        students = students[students["schedule"].isin(schedules)]
    if students.empty:
        return None
    sups = sorted(s for s in students["supervision"].unique())
    fig, axes = plt.subplots(1, len(sups), figsize=(5.5 * len(sups), 4.2), squeeze=False)
    series = []
    colors = plt.cm.tab10.colors
    for ax, sup in zip(axes[0], sups):
        sub_s = students[students["supervision"] == sup]
        # One curve per pruning axis too: depth and width students are different models.
        axis = ["axis"] if "axis" in sub_s.columns else []
        keys = ["method", "schedule", *axis, "dataset_size"]
        for i, (vals, sub) in enumerate(sub_s.groupby(keys, sort=True, dropna=False)):
            g = dict(zip(keys, vals))
            name = (f"{sup}: {g['method'] if _recovered(g) else 'before recovery'} / "
                    f"{g['schedule']}" + (f" / {g['axis']}" if axis else "")
                    + f" / n={g['dataset_size']}")
            color = colors[i % len(colors)]
            anchor = teacher[teacher["dataset_size"] == g["dataset_size"]]
            _errorbar(ax, pd.concat([anchor, sub]), "compression_ratio", name, color)
            group = {"method": g["method"], "supervision": sup, "schedule": g["schedule"],
                     **{k: g[k] for k in axis}, "dataset_size": g["dataset_size"]}
            det = _curve_for(details, metric, "compression_ratio", group)
            if det:
                _band(ax, det, color)
            series.append(name)
        if not teacher.empty:
            ax.plot(teacher["compression_ratio"], teacher["value"], "*", color="black",
                    markersize=11, label="teacher")
        _finish(ax, metric, "compression ratio (student / teacher params)", floor, logx=False)
        ax.set_xlim(0, 1.05)
        ax.set_title(f"{metric_label(metric)}: " + ("before recovery (pruned only)" if sup == "none"
                                       else f"supervision = {sup}"))
    _save(fig, path)
    return series


def figure_schedules(long, metric, details, floor, path: Path) -> list[str] | None:
    rows = long[long["metric"] == metric]
    if not {"uniform", "decayed"} <= set(rows["schedule"]):
        return None
    return figure_vs_compression(long, metric, details, floor, path, ["uniform", "decayed"])


# ------------------------------------------------------------------------------ recommendations


def _recovered(group: dict) -> bool:
    """Pruned-only students (method `none`) are shown as "before recovery", never recommended."""
    return group.get("method") not in (None, "none")


def _group_label(g: dict) -> str:
    if not _recovered(g):
        return f"before recovery ({_label(g, ('schedule', 'axis'))})"
    return _label(g, (*CONDITIONS, "axis"))


def recommendations(details: list[dict], id_metric: str = "macro_f1",
                    gk_metrics: tuple[str, ...] = ("mmlu", "mmlu_pro", "probe")) -> list[str]:
    """Plain-language advice from the selected fits' inverse predictions, with their CIs.

    Only what the data support: an inverse prediction or a collapse point is stated only inside
    the measured range with a finite CI that contains it (`fit.table.supported_estimate`);
    otherwise the line says what is missing. Pruned-only students get no advice."""
    lines: list[str] = []
    comp = [d for d in details if d["selected"] and d["x"] == "compression_ratio"
            and _recovered(d["group"])]
    by_group: dict[str, dict[str, dict]] = {}
    for d in comp:
        by_group.setdefault(json.dumps(d["group"], sort_keys=True), {})[d["metric"]] = d
    options = []
    for key, fits in by_group.items():
        g = json.loads(key)
        idf = fits.get(id_metric)
        if not idf or not idf["inverse"]:
            continue
        where = f"{_group_label(g)} (dataset size {g.get('dataset_size')})"
        for inv in idf["inverse"]:
            need = [inv]
            floors = []
            for gm in gk_metrics:
                if gm in fits and fits[gm]["inverse"]:
                    first = fits[gm]["inverse"][0]
                    need.append(first)
                    floors.append(f"{metric_label(gm)} ≥ {target_text(first)}")
            cond = f"{id_metric} ≥ {inv['target']}" + (" and " + ", ".join(floors) if floors else "")
            missing = [n["why_not"] for n in need if n.get("why_not")]
            if missing:
                lines.append(f"- {where}, {cond}: not enough signal ({missing[0]}).")
                continue
            options.append((max(n["value"] for n in need), where, cond,
                            max(n["ci_low"] for n in need), max(n["ci_high"] for n in need)))
    for ratio, where, cond, lo, hi in sorted(options, key=lambda o: o[0]):
        lines.append(f"- For {cond}: {where} can compress to **{ratio:.2f}** of the teacher's "
                     f"parameters (95% CI [{lo:.2f}, {hi:.2f}]; keeping {hi:.2f} is the "
                     "cautious choice).")
    data = [d for d in details if d["selected"] and d["x"] == "dataset_size"
            and d["metric"] == id_metric and _recovered(d["group"])]
    for d in data:
        where = f"{_group_label(d['group'])} at ratio {d['group'].get('compression_ratio')}"
        for inv in d["inverse"]:
            if inv.get("why_not"):
                lines.append(f"- Data: {where}, {id_metric} ≥ {inv['target']}: not enough "
                             f"signal ({inv['why_not']}).")
                continue
            lines.append(f"- Data: {where} needs about **{inv['value']:,.0f}** training examples "
                         f"for {id_metric} ≥ {inv['target']} (95% CI {inv['ci_low']:,.0f} – "
                         f"{inv['ci_high']:,.0f}).")
    for d in details:
        # Collapse points come from the broken power law of each general-knowledge curve.
        if not (d["form"] == "broken_power_law" and is_general(d["metric"])
                and d["x"] == "compression_ratio" and d.get("collapse_point")
                and _recovered(d["group"])):
            continue
        cp = d["collapse_point"]
        where = f"{_group_label(d['group'])} (dataset size {d['group'].get('dataset_size')})"
        if cp.get("why_not"):
            lines.append(f"- {metric_label(d['metric'])} collapse point for {where}: not enough signal "
                         f"({cp['why_not']}).")
            continue
        idf = by_group.get(json.dumps(d["group"], sort_keys=True), {}).get(id_metric)
        at = ""
        if idf:
            y = float(np.interp(cp["value"], idf["curve"]["x"], idf["curve"]["y"]))
            at = f"; the in-domain {id_metric} fit there is still {y:.3f}"
        lines.append(f"- {metric_label(d['metric'])} collapses below a compression ratio of "
                     f"**{cp['value']:.2f}** (95% CI [{_n(cp['ci_low'])}, {_n(cp['ci_high'])}]) "
                     f"for {where}{at}.")
    if not lines:
        lines.append("- No recommendation: not enough signal. No recovered student's curve has "
                     "more distinct compression ratios or dataset sizes than its scaling form has "
                     "parameters (a 3-parameter form needs 4); add ratios, sizes or seeds.")
    return lines


# ----------------------------------------------------------------------------------- build


def _results_table(long: pd.DataFrame, extra: dict | None) -> str:
    metrics = [m for m in HEADLINE if m in set(long["metric"])]
    keys = ["model", "params", "compression_ratio", *CONDITIONS, "dataset_size", "seed"]
    keys = [k for k in keys if k in long.columns]
    wide = long[long["metric"].isin(metrics)].pivot_table(
        index=keys, columns="metric", values=["value", "ci_low", "ci_high"], aggfunc="first")
    head = keys + [f"{metric_label(m)} [95% CI]" for m in metrics]
    speed = bool(extra) and any(e.get("cpu_speedup") is not None for e in extra.values())
    if extra:
        head.append("val KL before → after")
    if speed:
        head.append("CPU speedup vs teacher")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wide = wide.reset_index().sort_values(["compression_ratio", "model"], ascending=[False, True])
    for _, r in wide.iterrows():
        cells = []
        for k in keys:
            v = r[(k, "")] if (k, "") in r.index else r[k]
            cells.append(f"{v:.3f}" if isinstance(v, float) else
                         f"{v:,}" if isinstance(v, (int, np.integer)) else str(v))
        for m in metrics:
            v, lo, hi = r.get(("value", m)), r.get(("ci_low", m)), r.get(("ci_high", m))
            cells.append("" if v is None or pd.isna(v)
                         else f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else f"{v:.3f}")
        if extra:
            model = str(r[("model", "")])
            kl = extra.get(model.split("/")[0]) if model.endswith("distilled") else None
            cells.append(f"{kl['val_kl_before']:.3f} → {kl['val_kl_after']:.3f}"
                         if kl and kl.get("val_kl_after") is not None else "")
            if speed:
                cells.append(f"{kl['cpu_speedup']:.2f}×"
                             if kl and kl.get("cpu_speedup") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fits_table(fits: list[dict], details: list[dict]) -> list[str]:
    lines = ["| metric | x | group | form | key parameters (95% CI) | AIC | RMSE | extrap. error | collapse point |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f, d in zip(fits, details):
        if not d["selected"]:
            continue
        ps = "; ".join(f"{n}={p['value']:.3g} [{_n(p['ci_low'])}, {_n(p['ci_high'])}]"
                       for n, p in f["params"].items())
        cp = f.get("collapse_point")
        cps = ("" if not cp else f"not reported ({cp['why_not']})" if cp.get("why_not")
               else f"{cp['value']:.2f} [{_n(cp['ci_low'])}, {_n(cp['ci_high'])}]")
        g = ", ".join(f"{k}={v}" for k, v in f["group"].items())
        lines.append(f"| {metric_label(f['metric'])} | {f['x']} | {g} | {f['form']} | {ps} | {f['aic']:.1f} | "
                     f"{f['rmse']:.4f} | {_n(f['extrapolation_error'])} | {cps} |")
    return lines


def _n(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def build_report(
    long: pd.DataFrame, out_dir: str | Path, fits_dir: str | Path | None = None,
    num_classes: int | None = None, title: str = "distillscale",
    intro: str = "", extra: dict | None = None,
) -> Path:
    """Write `report.md`, `report.html` and `plots/` into `out_dir`; returns report.md."""
    out = Path(out_dir)
    long = normalize_results(long)
    fits, details = [], []
    if fits_dir and (Path(fits_dir) / "fits.json").is_file():
        fits = json.loads((Path(fits_dir) / "fits.json").read_text())
        det_path = Path(fits_dir) / "fits_detail.json"
        details = json.loads(det_path.read_text())["fits"] if det_path.is_file() else []
    figures = []
    metrics = [m for m in PLOTTED if m in set(long["metric"])]
    for metric in metrics:
        floor = chance_floor(metric, num_classes)
        for family, fn, name in (
            ("vs_dataset_size", figure_vs_dataset_size, f"{metric}_vs_dataset_size.png"),
            ("vs_compression", figure_vs_compression, f"{metric}_vs_compression.png"),
            ("decayed_vs_uniform", figure_schedules, f"{metric}_decayed_vs_uniform.png"),
        ):
            path = out / "plots" / name
            if family == "vs_compression":
                series = fn(long, metric, details, floor, path,
                            sorted(set(long["schedule"]) - {"decayed"}))
            else:
                series = fn(long, metric, details, floor, path)
            if series:
                figures.append({"family": family, "metric": metric,
                                "path": f"plots/{name}", "series": series})
    write_json_atomic(out / "plots" / "figures.json", figures)

    parts = [f"# {title}: compression report", ""]
    if intro:
        parts += [intro, ""]
    parts += ["## Results", "", ("Eval CIs are 95% (percentile bootstrap in-domain; normal "
              "approximation from lm-eval's standard error for the general-knowledge "
              "benchmarks)."), "",
              _results_table(long, extra), ""]
    titles = {"vs_dataset_size": "vs dataset size", "vs_compression": "vs compression ratio",
              "decayed_vs_uniform": "decayed vs uniform schedule"}
    if figures:
        parts += ["## Figures", ""]
        for f in figures:
            name = metric_label(f["metric"])
            parts += [f"### {name} {titles[f['family']]}", "",
                      f"![{name} {titles[f['family']]}]({f['path']})", ""]
    parts += ["## Scaling fits", ""]
    if fits:
        parts += ["AIC-selected form per curve; all forms are in `fit/fits.md`.", "",
                  *_fits_table(fits, details), ""]
    else:
        parts += ["No fits (run the fit stage, or too few points per condition).", ""]
    found = findings(long, details, num_classes=num_classes)
    write_json_atomic(out / "findings.json", found)
    parts += ["## Findings of the paper, checked on these results", "",
              ("Each verdict comes from the CI of its measured quantity: `supported` and `not "
               "supported` only when the CI excludes the other answer, otherwise `not enough "
               "signal`. The decision rules are in `distillscale/fit/findings.py`."), "",
              *findings_markdown(found), ""]
    parts += ["## Recommendations", "",
              ("From the selected fits' inverse predictions; each number carries the 95% "
              "bootstrap CI of the fit, and a CI that is wide or unbounded means more runs "
              "(seeds, sizes, ratios) are needed before acting on it."), "",
              *recommendations(details), ""]
    md = "\n".join(parts)
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", markdown_to_html(md, out, title))
    return out / "report.md"


def markdown_to_html(md: str, root: Path, title: str) -> str:
    """A small renderer for the report's own markdown (headings, tables, lists, images),
    with every image embedded as base64 so the file stands alone."""
    body, in_table, in_list = [], False, False

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    for line in md.splitlines():
        if in_table and not line.startswith("|"):
            body.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            body.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "td" if in_table else "th"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("!["):
            m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
            img = root / m.group(2)
            data = base64.b64encode(img.read_bytes()).decode() if img.is_file() else ""
            body.append(f'<p><img alt="{html.escape(m.group(1))}" '
                        f'src="data:image/png;base64,{data}"></p>')
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    if in_table:
        body.append("</table>")
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")
