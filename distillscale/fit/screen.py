"""Screening a results table before any curve is fitted to it.

A fit reports what the data support; degenerate data support nothing, yet a least-squares fit
still returns numbers (all-equal values gave a "collapse point" with a zero-width CI). So rows
that cannot be true are set aside with a reason before fitting, the way unfittable rows already
are:

- a value, CI bound or x that is not finite (inf, -inf);
- a bounded metric (F1, accuracy, MMLU, the knowledge probe: fractions) outside [0, 1];
- a CI whose low end is above its high end;
- a row given twice (the copy is dropped: it would count twice in the fit), and rows that give
  one model, metric and seed different values (which one is true is unknown: both set aside);
- a metric whose values are all equal (no curve can be told from a constant).

`screen_results` returns the kept rows and the set-aside ones (the `skipped` records of
`fits.json`); `fit_table` calls it first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BOUNDED_PREFIXES = ("macro_f1", "weighted_f1", "accuracy", "gold_accuracy", "f1_", "mmlu",
                    "probe")
# Columns that identify one measurement; two rows agreeing on them must agree on the value.
# `cell`: a sweep's results name each cell's students alike (`width_0.16/step2/pruned` in every
# chain), so across cells one name is several models; its pruned-only rows share their method
# ("none") and schedule as well.
_KEY = ("model", "metric", "seed", "method", "supervision", "schedule", "step",
        "compression_ratio", "dataset_size", "cell")


def is_bounded(metric: str) -> bool:
    """Whether `metric` is a fraction in [0, 1]."""
    return str(metric).startswith(BOUNDED_PREFIXES)


def screen_results(long: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """(`long` without the rows that cannot be fitted honestly, one record per set-aside row
    or group with its reason). `long` is a normalized table (`normalize_results`)."""
    skipped: list[dict] = []
    df = long.reset_index(drop=True)

    def set_aside(mask: pd.Series, reason) -> None:
        nonlocal df
        for _, r in df[mask].iterrows():
            skipped.append({"model": str(r["model"]), "metric": str(r["metric"]),
                            "reason": reason(r) if callable(reason) else reason})
        df = df[~mask].reset_index(drop=True)

    numeric = [c for c in ("value", "ci_low", "ci_high", "compression_ratio", "dataset_size")
               if c in df.columns]
    for c in numeric:
        set_aside(np.isinf(df[c].to_numpy(float)) if len(df) else df[c].astype(bool),
                  lambda r, c=c: f"{c} {r[c]} is not finite")
    bounded = df["metric"].map(is_bounded).astype(bool)
    out_of_range = bounded & df["value"].notna() & ~df["value"].between(0, 1)
    set_aside(out_of_range, lambda r: f"{r['metric']} = {r['value']} is outside [0, 1] "
                                      "(a fraction is expected)")
    has_ci = df["ci_low"].notna() & df["ci_high"].notna()
    set_aside(has_ci & (df["ci_low"] > df["ci_high"]),
              lambda r: f"inverted CI: ci_low {r['ci_low']} > ci_high {r['ci_high']}")

    copies = df.astype(str).duplicated(keep="first")
    if copies.any():
        set_aside(copies, "the same row given again (the copy is dropped)")
    key = [c for c in _KEY if c in df.columns]
    conflict = df.astype(str).duplicated(subset=key, keep=False)
    if conflict.any():
        set_aside(conflict, lambda r: f"another row gives model {r['model']}, metric "
                                      f"{r['metric']}, seed {r['seed']} a different value")

    for metric, rows in df.groupby("metric", sort=True):
        values = rows["value"].dropna()
        if len(values) > 1 and values.nunique() == 1:
            skipped.append({"model": ",".join(map(str, rows["model"].unique())),
                            "metric": str(metric),
                            "reason": f"all {len(values)} values equal ({values.iloc[0]}): "
                                      "nothing to fit"})
            df = df[df["metric"] != metric]
    return df.reset_index(drop=True), skipped
