"""The paper's findings, checked against this run's results: one verdict per finding.

Each finding gets a measured quantity with a 95% CI and a verdict of `supported`,
`not supported` or `not enough signal`, decided by the CI alone (never forced):

1. In-domain quality degrades smoothly with compression: the drop of the in-domain metric from
   the teacher to the smallest recovered student, and whether the selected monotone fit of that
   curve has bounded parameter CIs.
2. General knowledge collapses first: per recovered curve, the largest compression ratio at
   which the general-knowledge fit has lost half of the teacher's margin over chance, against
   the largest ratio at which the in-domain fit has lost the same share of its own margin
   (ratios read off the fitted curves and their bootstrap bands, inside the measured range).
3. CoT supervision keeps more general knowledge than label supervision at the same ratio: the
   paired difference (CoT format minus label, same dataset size, schedule, method, axis, step
   and seed), averaged per seed; its CI is a t-interval over seeds, so one seed is never enough.

No library computes these verdicts; the decision rules are written here and stated in the report.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from distillscale.fit.estimate import Z95
from distillscale.fit.table import chance_floor, is_general

# Share of the teacher's margin over chance whose loss counts as collapse, the same for the
# in-domain and the general-knowledge metric so neither is favoured (finding 2).
COLLAPSE_SHARE = 0.5
# A drop whose CI stays within this of zero counts as "no measurable degradation".
FLAT_TOLERANCE = 0.02
SUPPORTED, NOT_SUPPORTED, NO_SIGNAL = "supported", "not supported", "not enough signal"


def _row(finding: str, quantity: str, value=None, lo=None, hi=None, verdict=NO_SIGNAL,
         note: str = "") -> dict:
    clean = [None if v is None or not math.isfinite(float(v)) else float(v) for v in (value, lo, hi)]
    return {"finding": finding, "quantity": quantity, "value": clean[0], "ci_low": clean[1],
            "ci_high": clean[2], "verdict": verdict, "note": note}


def _recovered(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["method"] != "none") & (df["compression_ratio"] < 0.999)]


def _sigma(r: pd.DataFrame) -> np.ndarray:
    w = (r["ci_high"] - r["ci_low"]).to_numpy(float) / (2 * Z95)
    return np.where(np.isfinite(w) & (w > 0), w, np.nan)


def degrades_smoothly(long: pd.DataFrame, details: list[dict], metric: str) -> dict:
    name = "In-domain quality degrades smoothly with compression"
    rows = long[long["metric"] == metric]
    teacher = rows[(rows["method"] == "none") & (rows["compression_ratio"] >= 0.999)]
    students = _recovered(rows)
    if teacher.empty or students.empty:
        return _row(name, f"{metric}: teacher − smallest recovered student",
                    note="no teacher or no recovered student in the results")
    smallest = students[students["compression_ratio"].round(2)
                        == students["compression_ratio"].round(2).min()]
    t_val = float(teacher["value"].mean())
    drop = t_val - float(smallest["value"].mean())
    # Evaluation noise of both means; across seeds / groups the spread of the smallest students.
    se_t = np.nanmean(_sigma(teacher)) / math.sqrt(len(teacher))
    spread = float(smallest["value"].std(ddof=1)) / math.sqrt(len(smallest)) \
        if len(smallest) > 1 else np.nanmean(_sigma(smallest))
    se = math.sqrt(se_t**2 + spread**2) if math.isfinite(se_t) else spread
    lo, hi = drop - Z95 * se, drop + Z95 * se
    ratio = float(smallest["compression_ratio"].min())
    fits = [d for d in details if d["selected"] and d["metric"] == metric
            and d["x"] == "compression_ratio" and d["group"].get("method") not in (None, "none")]
    bounded = [d for d in fits if d.get("n_bootstrap", 0) >= 2
               and all(np.isfinite(d["curve"]["ci_low"]) & np.isfinite(d["curve"]["ci_high"]))]
    quantity = f"{metric}: teacher − students at ratio {ratio:.2f} ({len(smallest)} run(s))"
    fit_note = f"{len(bounded)} of {len(fits)} recovered curve(s) have a bounded monotone fit"
    if not fits:
        return _row(name, quantity, drop, lo, hi, NO_SIGNAL,
                    "no recovered curve has enough distinct ratios for a fit")
    if lo > 0 and bounded:
        return _row(name, quantity, drop, lo, hi, SUPPORTED, fit_note)
    if -FLAT_TOLERANCE < lo and hi < FLAT_TOLERANCE:
        return _row(name, quantity, drop, lo, hi, NOT_SUPPORTED,
                    f"no measurable drop down to ratio {ratio:.2f}; {fit_note}")
    return _row(name, quantity, drop, lo, hi, NO_SIGNAL, fit_note)


def _crossing(curve: dict, key: str, level: float) -> float | None:
    """Largest x of the curve (increasing in x) at or below `level`; None if it never is."""
    x, y = np.asarray(curve["x"], float), np.asarray(curve[key], float)
    below = np.flatnonzero(y <= level)
    return float(x[below.max()]) if len(below) else None


def collapses_first(long: pd.DataFrame, details: list[dict], id_metric: str, gk_metric: str,
                    floor_gk: float, floor_id: float) -> dict:
    name = "General knowledge collapses before in-domain quality"
    quantity = (f"ratio where {gk_metric} lost {COLLAPSE_SHARE:.0%} of its margin over chance "
                f"− ratio where {id_metric} lost {COLLAPSE_SHARE:.0%} of its own")
    teacher = long[(long["method"] == "none") & (long["compression_ratio"] >= 0.999)]
    sel = {}
    for d in details:
        if d["selected"] and d["x"] == "compression_ratio" and \
                d["group"].get("method") not in (None, "none"):
            sel.setdefault(tuple(sorted((k, str(v)) for k, v in d["group"].items())),
                           {})[d["metric"]] = d
    diffs, favour, against, unclear = [], 0, 0, 0
    for key, fits in sel.items():
        if id_metric not in fits or gk_metric not in fits:
            continue
        g = dict(key)
        t = teacher
        if "dataset_size" in g and "dataset_size" in t.columns:
            t = t[t["dataset_size"].astype(str) == g["dataset_size"]]
        t_id = t.loc[t["metric"] == id_metric, "value"].mean()
        t_gk = t.loc[t["metric"] == gk_metric, "value"].mean()
        if not (math.isfinite(t_id) and math.isfinite(t_gk)) or t_gk <= floor_gk \
                or t_id <= floor_id:
            unclear += 1
            continue
        id_level = t_id - COLLAPSE_SHARE * (t_id - floor_id)
        gk_level = t_gk - COLLAPSE_SHARE * (t_gk - floor_gk)
        c_id, c_gk = fits[id_metric]["curve"], fits[gk_metric]["curve"]
        r_id = [_crossing(c_id, k, id_level) for k in ("y", "ci_high", "ci_low")]
        r_gk = [_crossing(c_gk, k, gk_level) for k in ("y", "ci_high", "ci_low")]
        if r_gk[0] is None or r_id[0] is None:
            unclear += 1
            continue
        diffs.append(r_gk[0] - r_id[0])
        # Bounds of each crossing from the band (the upper band crosses at the smaller ratio).
        gk_lo, gk_hi = r_gk[1] if r_gk[1] is not None else 0.0, r_gk[2]
        id_lo, id_hi = r_id[1] if r_id[1] is not None else 0.0, r_id[2]
        if gk_hi is None or id_hi is None:
            unclear += 1
        elif gk_lo > id_hi:
            favour += 1
        elif gk_hi < id_lo:
            against += 1
        else:
            unclear += 1
    n = favour + against + unclear
    if not diffs:
        return _row(name, quantity, note=(
            f"in none of {n} recovered curve(s) did both fits cross their levels inside the "
            "measured ratios" if n else "no recovered curve with both an in-domain and a "
            "general-knowledge fit"))
    value = float(np.median(diffs))
    note = (f"{favour} curve(s) general knowledge first (band-separated), {against} in-domain "
            f"first, {unclear} overlapping or not crossing; value = median over curves")
    verdict = SUPPORTED if favour and not against else NOT_SUPPORTED if against and not favour \
        else NO_SIGNAL
    if len(diffs) > 1:
        note += f" (range {min(diffs):.3f} to {max(diffs):.3f})"
    # Per curve the verdict rests on the fitted bands; over curves there is no single CI.
    return _row(name, quantity, value, None, None, verdict, note)


def cot_keeps_knowledge(long: pd.DataFrame, gk_metric: str) -> list[dict]:
    name = "CoT supervision keeps more general knowledge than label supervision"
    rows = _recovered(long[long["metric"] == gk_metric]).copy()
    out = []
    formats = sorted(f for f in rows["supervision"].unique() if f not in ("label", "none"))
    if "label" not in set(rows["supervision"]) or not formats:
        return [_row(name, f"{gk_metric}: CoT − label, paired",
                     note="the results need label and CoT-supervised students of the same setup")]
    keys = [k for k in ("dataset_size", "schedule", "method", "axis", "step", "seed")
            if k in rows.columns]
    rows["ratio"] = rows["compression_ratio"].round(2)
    keys.append("ratio")
    label = rows[rows["supervision"] == "label"].groupby(keys)["value"].mean()
    for fmt in formats:
        other = rows[rows["supervision"] == fmt].groupby(keys)["value"].mean()
        paired = (other - label).dropna()
        quantity = f"{gk_metric}: {fmt} − label, same setup and seed"
        if paired.empty:
            out.append(_row(name, quantity, note="no paired runs"))
            continue
        seeds = paired.groupby(level="seed").mean() if "seed" in keys else paired
        value = float(seeds.mean())
        if len(seeds) < 2:
            out.append(_row(name, quantity, value, note=(
                f"{len(paired)} pair(s) from one seed: run-to-run variation unknown; add seeds")))
            continue
        half = float(stats.t.ppf(0.975, len(seeds) - 1) * seeds.std(ddof=1) / math.sqrt(len(seeds)))
        lo, hi = value - half, value + half
        verdict = SUPPORTED if lo > 0 else NOT_SUPPORTED if hi < 0 else NO_SIGNAL
        out.append(_row(name, quantity, value, lo, hi, verdict,
                        f"{len(paired)} pairs over {len(seeds)} seeds (t-interval over seeds)"))
    return out


def findings(long: pd.DataFrame, details: list[dict], id_metric: str = "macro_f1",
             num_classes: int | None = None, floors: dict[str, float] | None = None) -> list[dict]:
    """Every finding's row (see the module docstring) from a normalized long results table."""
    # Real benchmarks first; the synthetic probe stands in where neither was scored.
    gk = next((m for m in ("mmlu", "mmlu_pro", "probe") if m in set(long["metric"])), None)
    if gk is None:
        gk = next((m for m in sorted(set(long["metric"])) if is_general(m)), None)
    out = [degrades_smoothly(long, details, id_metric)]
    if gk is None:
        out.append(_row("General knowledge collapses before in-domain quality",
                        "general-knowledge metric", note="no general-knowledge metric in the results"))
        out.append(_row("CoT supervision keeps more general knowledge than label supervision",
                        "general-knowledge metric", note="no general-knowledge metric in the results"))
        return out
    floor = chance_floor(gk, floors=floors)
    out.append(collapses_first(long, details, id_metric, gk, floor,
                               chance_floor(id_metric, num_classes, floors)))
    out += cot_keeps_knowledge(long, gk)
    return out


def findings_markdown(rows: list[dict]) -> list[str]:
    def f(v):
        return "–" if v is None else f"{v:.3f}"

    lines = ["| finding (paper) | measured quantity | value [95% CI] | verdict | note |",
             "|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{f(r['ci_low'])}, {f(r['ci_high'])}]" if r["ci_low"] is not None else ""
        lines.append(f"| {r['finding']} | {r['quantity']} | {f(r['value'])}{ci} | "
                     f"**{r['verdict']}** | {r['note']} |")
    return lines
