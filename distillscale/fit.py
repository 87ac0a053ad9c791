"""Scaling fits of a metric against the compression ratio (scipy).

A first, small set of forms; the scaling-law issue extends it (saturating and broken power
laws, robust losses, bootstrap CIs, extrapolation error). Fits use the teacher (ratio 1.0) and
the recovered (distilled) students.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import curve_fit


def power_law(x, a, b):
    return a * np.power(x, b)


def linear(x, a, b):
    return a + b * x


FORMS = {
    "power_law": (power_law, ("a", "b"), (1.0, 0.5)),
    "linear": (linear, ("a", "b"), (0.0, 1.0)),
}


def fit_form(form: str, x: np.ndarray, y: np.ndarray) -> dict | None:
    fn, names, p0 = FORMS[form]
    if len(x) < len(names) + 1:
        return None
    try:
        params, cov = curve_fit(fn, x, y, p0=p0, maxfev=20000)
    except RuntimeError:
        return None
    resid = y - fn(x, *params)
    rss = float(np.sum(resid**2))
    n, k = len(x), len(names)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else [np.nan] * k
    return {
        "form": form,
        "params": {
            nm: {"value": float(v), "ci_low": float(v - 1.96 * s), "ci_high": float(v + 1.96 * s)}
            for nm, v, s in zip(names, params, sd)
        },
        "rmse": float(np.sqrt(rss / n)),
        "aic": float(n * np.log(max(rss, 1e-12) / n) + 2 * k),
    }


def fit_results(long, metrics: list[str], forms: list[str]) -> list[dict]:
    """Fits for each metric over teacher + distilled rows of a long results table."""
    keep = long[(long["stage"].isin(["teacher", "distilled"]))]
    out = []
    for metric in metrics:
        sub = keep[keep["metric"] == metric]
        x = sub["compression_ratio"].to_numpy(float)
        y = sub["value"].to_numpy(float)
        for form in forms:
            res = fit_form(form, x, y)
            if res is None:
                continue
            out.append({"metric": metric, "x": "compression_ratio",
                        "group": {"method": str(sub["method"].iloc[-1]),
                                  "supervision": str(sub["supervision"].iloc[-1])},
                        "n_points": len(x), **res})
    return out
