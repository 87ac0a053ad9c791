"""Candidate scaling forms: metric as a function of dataset size or compression ratio.

Every form is increasing in x (more data, or a larger share of the teacher kept, never hurts
in expectation) and never predicts below the metric's chance floor: a classifier that has lost
the task answers at chance, not worse (1/N macro F1 for N classes in-domain, 0.25 MMLU,
0.10 MMLU-Pro, 1 / its choices for the knowledge probe).

Internally x is divided by a reference scale (the largest x of the fit) so that all parameters
are O(1) for L-BFGS whatever the unit of x (headlines or a ratio in (0, 1]); `to_public`
converts the parameters back to the units of x that the results table uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Smoothness of the broken power law's knee in log x (0 would be a sharp corner, which
# gives L-BFGS a non-differentiable objective at the break).
BREAK_SMOOTHNESS = 0.1


@dataclass(frozen=True)
class Form:
    name: str
    params: tuple[str, ...]
    # f(u, theta, floor) with u = x / x_scale, theta in internal (optimizer) parameters.
    predict: Callable[[np.ndarray, np.ndarray, float], np.ndarray]
    # Initial values per internal parameter: the multi-start grid is their product. Both take
    # (y, floor, ceiling): a bounded metric's asymptote stays within [floor, ceiling].
    grid: Callable[..., list[list[float]]]
    bounds: Callable[..., list[tuple[float | None, float | None]]]
    # internal theta -> public {name: value} in the units of x
    to_public: Callable[[np.ndarray, float], dict[str, float]]
    # The public parameter whose value is a location on the x axis (for collapse points).
    break_param: str | None = None


def _top(y: np.ndarray, floor: float, ceiling: float | None = None) -> float:
    # Ceiling of an asymptote: a bounded metric's bound (1 for a fraction); for other tables'
    # scales, half again above the largest value seen.
    if ceiling is not None:
        return float(max(ceiling, floor + 1e-3))
    return float(max(1.0, np.nanmax(y) * 1.5, floor + 1e-3))


# y = y_inf - A * x^(-alpha), clipped at the floor ----------------------------------------------


def _spl_predict(u, th, floor):
    y_inf, a, alpha = th
    return np.maximum(floor, y_inf - a * np.power(u, -alpha))


def _spl_grid(y, floor, ceiling=None):
    hi = float(np.nanmax(y))
    span = max(hi - floor, 1e-3)
    return [
        [min(hi + d, _top(y, floor, ceiling)) for d in (0.0, 0.3 * span)],
        [0.1 * span, span],
        [0.1, 0.5, 1.5],
    ]


def _spl_bounds(y, floor, ceiling=None):
    return [(floor, _top(y, floor, ceiling)), (0.0, None), (1e-3, 5.0)]


def _spl_public(th, scale):
    y_inf, a, alpha = th
    # A * (x / s)^(-alpha) == (A * s^alpha) * x^(-alpha)
    return {"y_inf": float(y_inf), "A": float(a * scale**alpha), "alpha": float(alpha)}


SATURATING_POWER_LAW = Form(
    "saturating_power_law", ("y_inf", "A", "alpha"), _spl_predict, _spl_grid, _spl_bounds,
    _spl_public,
)


# y = floor + (y_inf - floor) / (1 + exp(-k (log x - log x0))) -----------------------------------


def _log_predict(u, th, floor):
    y_inf, k, log_x0 = th
    z = np.clip(k * (np.log(u) - log_x0), -50, 50)
    return floor + (y_inf - floor) / (1.0 + np.exp(-z))


def _log_grid(y, floor, ceiling=None):
    hi = float(np.nanmax(y))
    return [
        [hi, min(hi + 0.1 * max(hi - floor, 1e-3), _top(y, floor, ceiling))],
        [1.0, 6.0],
        [np.log(0.01), np.log(0.1), np.log(0.5)],
    ]


def _log_bounds(y, floor, ceiling=None):
    return [(floor, _top(y, floor, ceiling)), (1e-3, 100.0), (np.log(1e-6), np.log(10.0))]


def _log_public(th, scale):
    y_inf, k, log_x0 = th
    return {"y_inf": float(y_inf), "k": float(k), "x0": float(np.exp(log_x0) * scale)}


LOGISTIC_LOG = Form(
    "logistic_log", ("y_inf", "k", "x0"), _log_predict, _log_grid, _log_bounds, _log_public,
)


# Smoothly broken power law of the excess over the floor ------------------------------------------
#   log(y - floor) = log E_b + beta1 * v - (beta2 - beta1) * s * log(1 + exp(-v / s)),
#   v = log(x / x_b): slope beta1 above the break x_b, beta2 (steeper: the collapse) below it.


def _bpl_predict(u, th, floor):
    log_e, beta1, beta2, log_xb = th
    v = np.log(u) - log_xb
    s = BREAK_SMOOTHNESS
    log_excess = log_e + beta1 * v - (beta2 - beta1) * s * np.logaddexp(0.0, -v / s)
    return floor + np.exp(np.clip(log_excess, -50, 5))


def _bpl_grid(y, floor, ceiling=None):
    hi = float(np.nanmax(y))
    e = max(hi - floor, 1e-3)
    return [
        [np.log(0.5 * e), np.log(0.9 * e)],
        [0.0, 0.2],
        [1.0, 4.0],
        [np.log(0.1), np.log(0.3), np.log(0.6)],
    ]


def _bpl_bounds(y, floor, ceiling=None):
    return [(np.log(1e-4), np.log(_top(y, floor, ceiling) - floor)), (0.0, 2.0), (0.0, 20.0),
            (np.log(1e-4), np.log(2.0))]


def _bpl_public(th, scale):
    log_e, beta1, beta2, log_xb = th
    return {"excess_at_break": float(np.exp(log_e)), "beta1": float(beta1),
            "beta2": float(beta2), "x_break": float(np.exp(log_xb) * scale)}


BROKEN_POWER_LAW = Form(
    "broken_power_law", ("excess_at_break", "beta1", "beta2", "x_break"), _bpl_predict,
    _bpl_grid, _bpl_bounds, _bpl_public, break_param="x_break",
)

FORMS: dict[str, Form] = {f.name: f for f in (SATURATING_POWER_LAW, LOGISTIC_LOG, BROKEN_POWER_LAW)}
