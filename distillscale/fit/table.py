"""Scaling fits over a long results table (`results.parquet`, one row per model and metric).

Any table in the results schema works, not only ones this project wrote: `metric`, `value` and
the x column are required; `ci_low` / `ci_high` (point weights), `method`, `supervision`,
`schedule`, `dataset_size`, `compression_ratio`, `seed` are used when present. Rows that cannot
be fitted (missing value, x <= 0) are kept aside with a reason, never silently dropped.

Groups: a curve is fitted per metric, per x (`dataset_size` or `compression_ratio`) and per
value of the other conditions (method x supervision x schedule, and the fixed value of the
other axis). For compression curves the teacher (ratio 1.0, no method) anchors every group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from distillscale.config import FitConfig
from distillscale.fit.estimate import (
    FitResult,
    band,
    bootstrap,
    extrapolation_error,
    fit_form,
    inverse_with_ci,
    sigma_from_ci,
    single_threaded_blas,
)
from distillscale.fit.forms import FORMS
from distillscale.fit.screen import screen_results
from distillscale.knowledge.general import PROBE_CHOICES
from distillscale.manifest import write_json_atomic, write_text_atomic

X_COLUMNS = ("compression_ratio", "dataset_size")
CONDITIONS = ("method", "supervision", "schedule")
# Conditions that split curves only when the table has them: a curve never mixes pruning axes
# (depth and width students of the same size are different models).
OPTIONAL_CONDITIONS = ("axis",)
IN_DOMAIN = ("macro_f1", "weighted_f1", "accuracy", "gold_accuracy")
# `probe`: the synthetic knowledge probe the teacher stage writes; `mmlu`: real MMLU only.
GENERAL = ("mmlu", "mmlu_pro", "probe")
# Chance levels: 4-way MMLU, 10-way MMLU-Pro, the probe by its choices per question. In-domain:
# 1 / number of classes.
GENERAL_FLOORS = {"mmlu": 0.25, "mmlu_pro": 0.10, "probe": 1.0 / PROBE_CHOICES}
# How tables and plots name a metric whose key alone could mislead.
METRIC_LABELS = {"probe": "knowledge probe (synthetic)"}
# Fraction of distinct x values held out (the largest datasets / strongest compressions).
HOLDOUT_FRACTION = 0.25
# Resample whole seeds when there are at least this many, else single points.
MIN_SEEDS_FOR_SEED_BOOTSTRAP = 5


class ResultsTableError(ValueError):
    """A results table that cannot be fitted, phrased as `<file>: <what is wrong>`."""


def is_general(metric: str) -> bool:
    return metric in GENERAL or metric.startswith(("mmlu", "probe"))


def metric_label(metric: str) -> str:
    """The name of `metric` in tables and plots (its key where that says what it is)."""
    return METRIC_LABELS.get(metric, metric)


def chance_floor(metric: str, num_classes: int | None = None,
                 floors: dict[str, float] | None = None) -> float:
    """The chance level of `metric`: multiple-choice benchmarks by their choices, in-domain
    metrics 1 / the task's number of classes (which only the domain knows: required for them)."""
    if floors and metric in floors:
        return float(floors[metric])
    if metric in GENERAL_FLOORS:
        return GENERAL_FLOORS[metric]
    if metric.startswith("mmlu_pro"):
        return 0.10
    if metric.startswith("mmlu"):
        return 0.25
    if metric.startswith("probe"):
        return GENERAL_FLOORS["probe"]
    if metric in IN_DOMAIN or metric.startswith(("f1_", "macro_f1", "accuracy")):
        if num_classes is None:
            raise ValueError(f"{metric}: the chance floor needs the task's number of classes")
        return 1.0 / num_classes
    return 0.0


def metric_ceiling(metric: str) -> float | None:
    """Upper bound of a bounded metric (every metric with a chance floor is a fraction in
    [0, 1]); None for a metric of unknown scale."""
    if (metric in IN_DOMAIN or is_general(metric)
            or metric.startswith(("f1_", "macro_f1", "accuracy"))):
        return 1.0
    return None


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ResultsTableError(f"{path}: results table not found")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        else:
            raise ResultsTableError(f"{path}: expected a .parquet or .csv results table")
    except ResultsTableError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow / pandas parse errors: one line, naming the file
        raise ResultsTableError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return normalize_results(df, str(path))


def normalize_results(df: pd.DataFrame, source: str = "results table") -> pd.DataFrame:
    """Check the required columns and fill the optional ones with neutral defaults."""
    missing = [c for c in ("metric", "value") if c not in df.columns]
    if not any(c in df.columns for c in X_COLUMNS):
        missing.append(" or ".join(X_COLUMNS))
    if missing:
        raise ResultsTableError(f"{source}: missing column(s): {', '.join(missing)}")
    df = df.copy()
    for c in CONDITIONS:
        df[c] = df[c].fillna("none").astype(str) if c in df.columns else "none"
    for c in ("ci_low", "ci_high"):
        if c not in df.columns:
            df[c] = np.nan
    if "seed" not in df.columns:
        df["seed"] = 0
    if "model" not in df.columns:
        df["model"] = [f"row{i}" for i in range(len(df))]
    for c in ("value", "ci_low", "ci_high", *[x for x in X_COLUMNS if x in df.columns]):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


@dataclass
class GroupFit:
    metric: str
    x: str
    group: dict
    points: pd.DataFrame
    fits: dict[str, FitResult] = field(default_factory=dict)
    extrapolation: dict[str, float | None] = field(default_factory=dict)
    holdout_x: list[float] = field(default_factory=list)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def _groups(df: pd.DataFrame, x: str) -> list[tuple[dict, pd.DataFrame]]:
    """(group values, rows) per curve for one metric's rows."""
    other = [c for c in X_COLUMNS if c != x and c in df.columns]
    df = df.copy()
    if "compression_ratio" in other:
        # Students of "the same size" across runs differ in the last digits of their ratio.
        df["compression_ratio"] = df["compression_ratio"].round(2)
    keys = list(CONDITIONS) + [c for c in OPTIONAL_CONDITIONS if c in df.columns] + other
    for c in OPTIONAL_CONDITIONS:
        if c in df.columns:
            df[c] = df[c].fillna("none").astype(str)
    teacher = pd.Series(False, index=df.index)
    if x == "compression_ratio":
        teacher = is_teacher_row(df)
    out = []
    students = df[~teacher]
    for vals, rows in students.groupby(keys, dropna=False, sort=True):
        group = {k: _jsonable(v) for k, v in zip(keys, vals)}
        if x == "compression_ratio":
            anchor = df[teacher]
            if "dataset_size" in keys:
                anchor = anchor[anchor["dataset_size"] == rows["dataset_size"].iloc[0]]
            rows = pd.concat([anchor, rows])
        out.append((group, rows))
    return out


def is_teacher_row(df: pd.DataFrame) -> pd.Series:
    """The teacher's rows of a compression table: ratio 1, no method (it anchors every curve)."""
    return (df["compression_ratio"] >= 0.999) & (df["method"].astype(str) == "none")


def _holdout(x: np.ndarray, axis: str) -> np.ndarray:
    """Held-out points: the largest datasets, or the strongest compressions (smallest ratios)."""
    distinct = np.unique(x)
    m = max(1, int(HOLDOUT_FRACTION * len(distinct)))
    if len(distinct) - m < 2:
        return np.zeros_like(x, bool)
    cut = distinct[-m:] if axis == "dataset_size" else distinct[:m]
    return np.isin(x, cut)


def fit_table(
    long: pd.DataFrame,
    metrics: list[str] | None = None,
    forms: list[str] | None = None,
    xs: list[str] | None = None,
    num_classes: int | None = None,
    floors: dict[str, float] | None = None,
    bootstrap_samples: int = 200,
    seed: int = 0,
    huber_delta: float = 1.345,
) -> tuple[list[GroupFit], list[dict]]:
    """Every (metric, x, group) curve with every form; also the rows left out, with reasons."""
    long, skipped = screen_results(normalize_results(long))
    forms = forms or list(FORMS)
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"unknown scaling form(s) {unknown}; known: {sorted(FORMS)}")
    metrics = metrics or sorted(long["metric"].unique())
    xs = [x for x in (xs or X_COLUMNS) if x in long.columns]
    jobs = []
    for metric in metrics:
        rows = long[long["metric"] == metric]
        for x in xs:
            bad = ~np.isfinite(rows["value"]) | ~(rows[x] > 0)
            for _, r in rows[bad].iterrows():
                skipped.append({"model": r["model"], "metric": metric, "x": x,
                                "reason": f"value {r['value']!r} / {x} {r[x]!r} not fittable"})
            for group, g in _groups(rows[~bad], x):
                if g[x].nunique() < 3:
                    skipped.append({"model": ",".join(map(str, g["model"].unique())),
                                    "metric": metric, "x": x, "group": group,
                                    "reason": f"{g[x].nunique()} distinct {x} value(s); need >= 3"})
                    continue
                if g["value"].nunique() < 2:  # a constant: any curve "fits" it exactly
                    skipped.append({"model": ",".join(map(str, g["model"].unique())),
                                    "metric": metric, "x": x, "group": group,
                                    "reason": f"all {len(g)} values equal: nothing to fit"})
                    continue
                jobs.append((metric, x, group, g))
    out: list[GroupFit] = []
    with Progress(transient=True) as progress, single_threaded_blas():
        task = progress.add_task("scaling fits", total=len(jobs) * len(forms))
        for metric, x, group, g in jobs:
            floor = chance_floor(metric, num_classes, floors)
            ceiling = metric_ceiling(metric)
            xv, yv = g[x].to_numpy(float), g["value"].to_numpy(float)
            sig = sigma_from_ci(yv, g["ci_low"], g["ci_high"])
            seeds = g["seed"].astype(str).to_numpy()
            by_seed = len(set(seeds)) >= MIN_SEEDS_FOR_SEED_BOOTSTRAP
            units = seeds if by_seed else np.arange(len(g))
            hold = _holdout(xv, x)
            gf = GroupFit(metric, x, group, g.assign(sigma=sig),
                          holdout_x=sorted(set(xv[hold].tolist())))
            for name in forms:
                progress.advance(task)
                r = fit_form(FORMS[name], xv, yv, sig, floor, huber_delta, ceiling=ceiling)
                if r is None:
                    skipped.append({"metric": metric, "x": x, "group": group, "form": name,
                                    "reason": f"{len(np.unique(xv))} distinct {x} value(s) too "
                                              f"few for {name} ({len(FORMS[name].params)} "
                                              "parameters need more distinct values)"})
                    continue
                bootstrap(r, xv, yv, sig, units, bootstrap_samples, seed, huber_delta,
                          parametric=not by_seed)
                gf.fits[name] = r
                gf.extrapolation[name] = extrapolation_error(
                    FORMS[name], xv, yv, sig, floor, hold, huber_delta, ceiling)
            if gf.fits:
                out.append(gf)
    return out, skipped


def selected_form(gf: GroupFit, criterion: str = "aic") -> str:
    return min(gf.fits, key=lambda f: getattr(gf.fits[f], criterion))


def supported_estimate(est: dict | None, lo: float, hi: float) -> str | None:
    """Why an estimate with a CI (`value`, `ci_low`, `ci_high`) cannot be reported, or None.

    Reported only inside the measured range [lo, hi], with a finite CI that contains it and
    lies inside that range too: a CI reaching past the measured points (a break's bootstrap
    refits wandering to ratio 2, or below the smallest student) means the data do not bound the
    estimate there."""
    if est is None or est.get("value") is None:
        return "no estimate"
    v, cl, ch = est["value"], est.get("ci_low"), est.get("ci_high")
    if not (lo <= v <= hi):
        return f"the fitted value lies outside the measured range [{lo:.3g}, {hi:.3g}]"
    if cl is None or ch is None or not (math.isfinite(cl) and math.isfinite(ch)):
        return "unbounded CI"
    tol = 1e-6 * max(abs(hi - lo), abs(v), 1e-12)
    if ch - cl <= tol:
        # Every bootstrap refit landed on the same value: the data do not locate it (typically
        # a break between two measured points, where the loss is flat), a point is not a CI.
        return f"degenerate CI [{cl:.4g}, {ch:.4g}]: the bootstrap refits do not move it"
    if not (cl - tol <= v <= ch + tol):
        return f"CI [{cl:.3g}, {ch:.3g}] does not contain the estimate {v:.3g}"
    span = 1e-3 * max(abs(hi - lo), 1e-12)
    if cl < lo - span or ch > hi + span:
        return (f"CI [{cl:.3g}, {ch:.3g}] reaches beyond the measured range "
                f"[{lo:.3g}, {hi:.3g}]: the data do not bound it")
    return None


def _collapse(gf: GroupFit) -> dict | None:
    """The general-knowledge collapse point (break of the broken power law), with `why_not`
    set when the data do not support reporting it (see `supported_estimate`)."""
    r = gf.fits.get("broken_power_law")
    if r is None:
        return None
    p = r.params_with_ci()["x_break"]
    out = {"value": p["value"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}
    lo, hi = measured_range(gf)
    why = supported_estimate(out, lo, hi)
    if why:
        out["why_not"] = why
    return out


def measured_range(gf: GroupFit) -> tuple[float, float]:
    x = gf.points[gf.x].to_numpy(float)
    return float(x.min()), float(x.max())


def inverse_range(gf: GroupFit) -> tuple[float, float]:
    """Where inverse predictions are searched: the measured x range only (never beyond the
    smallest student or the largest dataset measured)."""
    return measured_range(gf)


def fits_records(groups: list[GroupFit]) -> list[dict]:
    """The `fits.json` objects: exactly the keys of the results-table interface."""
    out = []
    for gf in groups:
        collapse = _collapse(gf) if is_general(gf.metric) else None
        for name, r in gf.fits.items():
            rec = {
                "metric": gf.metric, "x": gf.x, "group": gf.group, "form": name,
                "params": r.params_with_ci(), "aic": r.aic, "rmse": r.rmse,
                "extrapolation_error": gf.extrapolation.get(name),
            }
            if is_general(gf.metric):
                rec["collapse_point"] = collapse
            out.append(rec)
    return out


def _checked_inverse(r: FitResult, target: float, lo: float, hi: float, x: str) -> dict:
    """`inverse_with_ci` over the measured range, with `why_not` when it cannot be reported."""
    inv = inverse_with_ci(r, target, lo, hi)
    if inv["value"] is None:
        inv["why_not"] = f"not reached within the measured {x} range [{lo:.3g}, {hi:.3g}]"
    elif inv["value"] <= lo:
        inv["why_not"] = (f"already reached at the smallest measured {x} ({lo:.3g}); "
                          "smaller values were not measured")
    else:
        why = supported_estimate(inv, lo, hi)
        if why:
            inv["why_not"] = why
    return inv


def teacher_value(gf: GroupFit) -> float | None:
    """The teacher's score in a compression curve (its anchor point at ratio 1, method none);
    None for curves without one (dataset-size curves)."""
    if gf.x != "compression_ratio" or "method" not in gf.points:
        return None
    anchor = gf.points[is_teacher_row(gf.points)]
    return float(anchor["value"].astype(float).mean()) if len(anchor) else None


def curve_targets(gf: GroupFit, targets: dict[str, list[float]],
                  relative: dict[str, list[float]]) -> list[tuple[float, str]]:
    """(level, how it reads) of every inverse prediction asked of `gf`: the absolute
    `targets` as given, the `relative` ones as that fraction of the curve's teacher score."""
    out = [(float(t), f"{t:g}") for t in targets.get(gf.metric, [])]
    teacher = teacher_value(gf) if relative.get(gf.metric) else None
    if teacher is not None:
        out += [(f * teacher, f"{f * teacher:.3f} ({f:g} of the teacher's {teacher:.3f})")
                for f in relative[gf.metric]]
    return out


def detail_records(groups: list[GroupFit], targets: dict[str, list[float]],
                   relative_targets: dict[str, list[float]] | None = None) -> list[dict]:
    """Everything else per fit, in the order of `fits.json`: the report's input."""
    out = []
    for gf in groups:
        asked = curve_targets(gf, targets, relative_targets or {})
        best = selected_form(gf)
        best_aic = gf.fits[best].aic
        x = gf.points[gf.x].to_numpy(float)
        grid = np.geomspace(x.min(), x.max(), 60)
        lo, hi = inverse_range(gf)
        collapse = _collapse(gf) if is_general(gf.metric) else None
        for name, r in gf.fits.items():
            mid, blo, bhi = band(r, grid)
            out.append({
                "collapse_point": collapse,
                "metric": gf.metric, "x": gf.x, "group": gf.group, "form": name,
                "selected": name == best, "delta_aic": r.aic - best_aic, "bic": r.bic,
                "floor": r.floor, "n_points": r.n_points, "n_inits": r.n_inits,
                "n_converged_to_best": r.n_converged, "n_bootstrap": len(r.draws),
                "holdout_x": gf.holdout_x,
                "curve": {"x": grid.tolist(), "y": mid.tolist(), "ci_low": blo.tolist(),
                          "ci_high": bhi.tolist()},
                "points": {
                    "x": x.tolist(), "y": gf.points["value"].astype(float).tolist(),
                    "ci_low": gf.points["ci_low"].astype(float).fillna(-1).tolist(),
                    "ci_high": gf.points["ci_high"].astype(float).fillna(-1).tolist(),
                    "model": gf.points["model"].astype(str).tolist(),
                },
                "inverse": [{**_checked_inverse(r, t, lo, hi, gf.x), "target_label": label}
                            for t, label in asked],
            })
    return out


def target_text(inv: dict) -> str:
    """How an inverse prediction's level reads ("0.9", "0.320 (0.9 of the teacher's 0.355)")."""
    return inv.get("target_label") or _fmt(inv["target"])


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def fits_markdown(records: list[dict], details: list[dict], skipped: list[dict],
                  source: str) -> str:
    lines = [f"# Scaling fits of `{source}`", "",
             ("Huber loss on residuals scaled by each point's eval CI, L-BFGS-B from a grid of "
             "starts (`conv` = starts that reached the best loss), percentile bootstrap 95% CIs "
             "(resampling seeds when there are 5 or more, else redrawing each point from its eval CI). `extrap` is the RMSE on "
             "the held-out largest datasets / strongest compressions of a fit on the rest. "
             "★ = lowest AIC in its group."), ""]
    by_curve: dict[tuple, list[tuple[dict, dict]]] = {}
    for rec, det in zip(records, details):
        key = (rec["metric"], rec["x"], json.dumps(rec["group"], sort_keys=True))
        by_curve.setdefault(key, []).append((rec, det))
    for (metric, x, group), items in by_curve.items():
        g = ", ".join(f"{k}={v}" for k, v in json.loads(group).items())
        lines += [f"## {metric} vs {x} ({g})", "",
                  "| form | params (95% CI) | AIC | BIC | RMSE | extrap | conv |",
                  "|---|---|---|---|---|---|---|"]
        for rec, det in items:
            ps = "; ".join(f"{n}={_fmt(p['value'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]"
                           for n, p in rec["params"].items())
            star = " ★" if det["selected"] else ""
            lines.append(f"| {rec['form']}{star} | {ps} | {rec['aic']:.2f} | {det['bic']:.2f} | "
                         f"{rec['rmse']:.4f} | {_fmt(rec['extrapolation_error'], 4)} | "
                         f"{det['n_converged_to_best']}/{det['n_inits']} |")
        lines.append("")
        cp = items[0][0].get("collapse_point")
        if cp and cp.get("why_not"):
            lines += [(f"Collapse point ({x} at the break of the broken power law): not "
                       f"reported ({cp['why_not']})."), ""]
        elif cp:
            lines += [(f"Collapse point ({x} at the break of the broken power law): "
                      f"**{_fmt(cp['value'])}** [{_fmt(cp['ci_low'])}, {_fmt(cp['ci_high'])}]"), ""]
        for rec, det in items:
            if det["selected"] and det["inverse"]:
                for inv in det["inverse"]:
                    if inv.get("why_not"):
                        lines.append(f"- {rec['form']}: {metric} ≥ {target_text(inv)}: not "
                                     f"reported ({inv['why_not']})")
                        continue
                    lines.append(f"- {rec['form']}: {metric} ≥ {target_text(inv)} needs {x} ≥ "
                                 f"{_fmt(inv['value'])} [{_fmt(inv['ci_low'])}, "
                                 f"{_fmt(inv['ci_high'])}]")
                lines.append("")
    if skipped:
        lines += ["## Not fitted", ""]
        lines += [f"- {s.get('metric')} vs {s.get('x')} {s.get('group', '')} "
                  f"{s.get('form', '')}: {s['reason']}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def write_fits(groups: list[GroupFit], skipped: list[dict], out_dir: str | Path,
               targets: dict[str, list[float]] | None = None, source: str = "results",
               relative_targets: dict[str, list[float]] | None = None) -> list[dict]:
    """Write `fits.json`, `fits_detail.json` and `fits.md` into `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    records = fits_records(groups)
    details = detail_records(groups, targets or {}, relative_targets)
    write_json_atomic(out_dir / "fits.json", records)
    write_json_atomic(out_dir / "fits_detail.json", {"fits": details, "skipped": skipped})
    write_text_atomic(out_dir / "fits.md", fits_markdown(records, details, skipped, source))
    return records


def fit_results(long: pd.DataFrame, out_dir: str | Path, fit_cfg=None,
                num_classes: int | None = None, seed: int = 0,
                source: str = "results") -> list[dict]:
    """The fit stage: every curve of `long` per `fit_cfg` (a `FitConfig`), written to `out_dir`."""
    fc = fit_cfg or FitConfig()
    groups, skipped = fit_table(
        long, fc.metrics, list(fc.forms), list(fc.x), num_classes=num_classes,
        bootstrap_samples=fc.bootstrap_samples, seed=seed, huber_delta=fc.huber_delta,
    )
    return write_fits(groups, skipped, out_dir, fc.targets, source, fc.relative_targets)
