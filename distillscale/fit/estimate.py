"""Robust multi-start fitting of one scaling form, with bootstrap uncertainty.

Practice from the Chinchilla-replication literature (Hoffmann et al. 2022; Besiroglu et al.
2024): a Huber loss on residuals so one bad point does not drag the curve, L-BFGS started from
a grid of initialisations (the objective is non-convex; how many starts reach the best loss is
reported as a stability check), and bootstrap refits for parameter CIs instead of the
covariance of a least-squares fit, which is unreliable with few points and bounded parameters.

scipy has the optimiser and the Huber function but not this procedure, so it is written here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.special import huber
from threadpoolctl import threadpool_limits

from distillscale.fit.forms import Form

Z95 = 1.959964
# A point whose eval CI is narrower than this still gets this much noise: bootstrap CIs on a
# few hundred test rows understate run-to-run variation, and a zero width would give a point
# infinite weight.
MIN_SIGMA = 0.005
# Relative distance to the best loss within which a start counts as "converged to the best".
CONVERGED_RTOL = 1e-4


def sigma_from_ci(value, ci_low, ci_high) -> np.ndarray:
    """Standard error of each point from its 95% CI; points without a CI get the median."""
    value = np.asarray(value, float)
    width = np.asarray(ci_high, float) - np.asarray(ci_low, float)
    sigma = width / (2 * Z95)
    ok = np.isfinite(sigma) & (sigma > 0)
    fill = float(np.median(sigma[ok])) if ok.any() else 0.02
    sigma = np.where(ok, sigma, fill)
    return np.maximum(sigma, MIN_SIGMA)


@dataclass
class FitResult:
    form: Form
    theta: np.ndarray  # internal parameters
    scale: float
    floor: float
    loss: float
    n_points: int
    n_inits: int
    n_converged: int
    wrss: float  # weighted residual sum of squares (residual / sigma)
    rmse: float  # unweighted, in metric units
    draws: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # bootstrap thetas
    ceiling: float | None = None  # a bounded metric's upper bound: predictions never exceed it

    @property
    def k(self) -> int:
        return len(self.theta)

    def predict(self, x) -> np.ndarray:
        return _capped(self.form.predict(np.asarray(x, float) / self.scale, self.theta,
                                         self.floor), self.ceiling)

    def predict_draws(self, x) -> np.ndarray:
        u = np.asarray(x, float) / self.scale
        return np.array([_capped(self.form.predict(u, th, self.floor), self.ceiling)
                         for th in self.draws])

    @property
    def aic(self) -> float:
        # Gaussian likelihood with the weighted residuals (the Huber loss is for robustness of
        # the estimate; the information criteria compare forms on the usual footing).
        n = self.n_points
        return float(n * np.log(max(self.wrss, 1e-12) / n) + 2 * self.k)

    @property
    def bic(self) -> float:
        n = self.n_points
        return float(n * np.log(max(self.wrss, 1e-12) / n) + self.k * np.log(n))

    def public(self) -> dict[str, float]:
        return self.form.to_public(self.theta, self.scale)

    def params_with_ci(self) -> dict[str, dict[str, float | None]]:
        point = self.public()
        if len(self.draws) >= 2:
            pub = [self.form.to_public(th, self.scale) for th in self.draws]
        else:
            pub = []
        out = {}
        for name, value in point.items():
            if pub:
                vals = np.array([p[name] for p in pub])
                lo, hi = np.percentile(vals, [2.5, 97.5])
                out[name] = {"value": value, "ci_low": float(lo), "ci_high": float(hi)}
            else:
                out[name] = {"value": value, "ci_low": None, "ci_high": None}
        return out


def _capped(pred, ceiling: float | None):
    return pred if ceiling is None else np.minimum(pred, ceiling)


def _objective(form: Form, u, y, sigma, floor, delta, ceiling=None):
    """Huber loss and its forward-difference gradient from one vectorised evaluation.

    The forms unpack their parameters elementwise, so a (k, k+1, 1) stack of parameter vectors
    (theta and theta + h e_j) evaluates all k+1 points at once: far cheaper than scipy's
    per-coordinate finite differences, which dominated the fitting time.
    """
    k = len(form.params)

    def f(theta):
        h = 1e-7 * np.maximum(1.0, np.abs(theta))
        stack = np.repeat(theta[:, None], k + 1, axis=1)
        stack[np.arange(k), np.arange(1, k + 1)] += h
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            pred = _capped(form.predict(u[None, :], stack[:, :, None], floor), ceiling)
        losses = np.sum(huber(delta, (y[None, :] - pred) / sigma[None, :]), axis=1)
        return float(losses[0]), (losses[1:] - losses[0]) / h

    return f


def single_threaded_blas():
    """Context in which BLAS uses one thread.

    L-BFGS-B calls BLAS on vectors of 3-4 numbers thousands of times per fit; a multi-threaded
    OpenBLAS spins its idle threads on every call, which made a fit ~20x slower in CPU time
    (and far slower in wall time on a busy machine) than with one thread.
    """
    return threadpool_limits(limits=1, user_api="blas")


def fit_form(
    form: Form, x, y, sigma=None, floor: float = 0.0, delta: float = 1.345,
    starts: list[np.ndarray] | None = None, scale: float | None = None,
    ceiling: float | None = None,
) -> FitResult | None:
    """Best fit over a grid of L-BFGS-B starts (or the given `starts`); None if too few points.

    A form is fitted only to more distinct x values than it has parameters (with as many, any
    curve passes through every point and its parameters say nothing). `delta` is the Huber
    threshold in units of each point's standard error (1.345 keeps 95% efficiency under
    Gaussian noise). `ceiling`: the metric's upper bound (1 for a fraction), which neither the
    asymptote nor any prediction may exceed.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    sigma = np.full_like(y, 0.02) if sigma is None else np.asarray(sigma, float)
    n, k = len(x), len(form.params)
    if n < k + 1 or len(np.unique(x)) <= k:
        return None
    if np.any(x <= 0):
        raise ValueError(f"{form.name}: x must be positive (got min {x.min()})")
    scale = float(scale or x.max())
    u = x / scale
    obj = _objective(form, u, y, sigma, floor, delta, ceiling)
    bounds = form.bounds(y, floor, ceiling)
    if starts is None:
        starts = [np.array(s, float) for s in itertools.product(*form.grid(y, floor, ceiling))]
    results = []
    with single_threaded_blas():
        for s in starts:
            s = np.array([np.clip(v, -np.inf if lo is None else lo, np.inf if hi is None else hi)
                          for v, (lo, hi) in zip(s, bounds)])
            r = minimize(obj, s, method="L-BFGS-B", jac=True, bounds=bounds)
            if np.isfinite(r.fun):
                results.append(r)
    if not results:
        return None
    best = min(results, key=lambda r: r.fun)
    tol = CONVERGED_RTOL * max(abs(best.fun), 1e-8)
    converged = sum(abs(r.fun - best.fun) <= tol for r in results)
    pred = _capped(form.predict(u, best.x, floor), ceiling)
    return FitResult(
        form=form, theta=best.x, scale=scale, floor=floor, loss=float(best.fun), n_points=n,
        n_inits=len(starts), n_converged=int(converged),
        wrss=float(np.sum(((y - pred) / sigma) ** 2)),
        rmse=float(np.sqrt(np.mean((y - pred) ** 2))), ceiling=ceiling,
    )


def bootstrap(
    fit: FitResult, x, y, sigma, units, n_boot: int, seed: int = 0, delta: float = 1.345,
    parametric: bool = False,
) -> FitResult:
    """Refit on resampled units (runs/seeds when there are several, else points).

    `units` labels each point's resampling unit. `parametric`: instead, every point is redrawn
    from its own evaluation noise (y + sigma * N(0, 1)) at the same x: with a handful of points
    and no repeated seeds, resampling points leaves too few distinct x for most refits (a form
    needs more distinct x than parameters), and the few that fit are the original data again,
    which gives a zero-width CI. Each refit starts from the full-data optimum (one L-BFGS run
    per draw, not the whole grid). Draws that cannot be fitted are dropped.
    """
    x, y, sigma, units = (np.asarray(a) for a in (x, y, sigma, units))
    ids = np.unique(units)
    rng = np.random.default_rng(seed)
    thetas = []
    for _ in range(n_boot):
        if parametric:
            idx = np.arange(len(x))
            y_draw = y.astype(float) + sigma.astype(float) * rng.standard_normal(len(x))
        else:
            pick = rng.choice(ids, size=len(ids), replace=True)
            idx = np.concatenate([np.flatnonzero(units == i) for i in pick])
            y_draw = y[idx]
        r = fit_form(fit.form, x[idx], y_draw, sigma[idx], fit.floor, delta,
                     starts=[fit.theta], scale=fit.scale, ceiling=fit.ceiling)
        if r is not None:
            thetas.append(r.theta)
    fit.draws = np.array(thetas) if thetas else np.empty((0, fit.k))
    return fit


def band(fit: FitResult, xs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fitted curve and its pointwise 95% bootstrap band on `xs`."""
    mid = fit.predict(xs)
    if len(fit.draws) < 2:
        return mid, mid, mid
    d = fit.predict_draws(xs)
    lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
    return mid, lo, hi


def inverse(form: Form, theta, scale: float, floor: float, target: float,
            lo: float, hi: float, ceiling: float | None = None) -> float | None:
    """Smallest x in [lo, hi] where the (increasing) curve reaches `target`, or None."""
    def g(x):
        return float(_capped(form.predict(np.array([x / scale]), theta, floor), ceiling)[0]) \
            - target

    # Search in log x: the curves are increasing, so the sign change brackets the root.
    glo, ghi = g(lo), g(hi)
    if glo >= 0:
        return lo
    if ghi < 0:
        return None
    return float(np.exp(brentq(lambda t: g(np.exp(t)), np.log(lo), np.log(hi), xtol=1e-10)))


def inverse_with_ci(fit: FitResult, target: float, lo: float, hi: float) -> dict:
    """x needed for the curve to reach `target`, with a bootstrap CI.

    Draws that never reach the target within [lo, hi] count as "beyond hi": the CI's upper end
    is then None (unbounded) if more than 2.5% of draws do.
    """
    value = inverse(fit.form, fit.theta, fit.scale, fit.floor, target, lo, hi, fit.ceiling)
    out = {"target": target, "value": value, "ci_low": None, "ci_high": None,
           "search_range": [lo, hi]}
    if len(fit.draws) >= 2:
        xs = [inverse(fit.form, th, fit.scale, fit.floor, target, lo, hi, fit.ceiling)
              for th in fit.draws]
        reach = np.array([v for v in xs if v is not None])
        miss = len(xs) - len(reach)
        if len(reach):
            q = np.percentile(np.concatenate([reach, np.full(miss, np.inf)]), [2.5, 97.5],
                              method="inverted_cdf")
            out["ci_low"] = float(q[0]) if np.isfinite(q[0]) else None
            out["ci_high"] = float(q[1]) if np.isfinite(q[1]) else None
        out["reached_fraction"] = float(len(reach) / len(xs))
    return out


def extrapolation_error(form: Form, x, y, sigma, floor: float, holdout: np.ndarray,
                        delta: float = 1.345, ceiling: float | None = None) -> float | None:
    """RMSE on the held-out points of a fit on the rest (None if the rest is too small)."""
    x, y, sigma = (np.asarray(a, float) for a in (x, y, sigma))
    holdout = np.asarray(holdout, bool)
    if not holdout.any() or holdout.all():
        return None
    r = fit_form(form, x[~holdout], y[~holdout], sigma[~holdout], floor, delta, ceiling=ceiling)
    if r is None:
        return None
    err = y[holdout] - r.predict(x[holdout])
    return float(np.sqrt(np.mean(err**2)))
