"""`fit` and `report` on a results table alone (no experiment config): a user's own table, or
a sweep's gathered cells (`launch/commands.py`)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from distillscale.config import ConfigError, FitConfig
from distillscale.fit import ResultsTableError, fit_results, read_results
from distillscale.fit.screen import screen_results
from distillscale.report import build_report


def fit_or_report_table(command: str, results: Path, out: Path, fcfg: FitConfig,
                        num_classes: int, fits_dir: Path | None = None) -> str:
    """Fit (`command="fit"`) or report on the long table `results` into `out`; rows the screen
    sets aside are counted on stderr. Returns the closing line."""
    try:
        long = read_results(results)
    except ResultsTableError as e:
        raise ConfigError(str(e)) from None
    kept, set_aside = screen_results(long)
    if set_aside:
        why = Counter(r["reason"].split(":")[0].split(" = ")[0] for r in set_aside)
        print(f"{results}: {len(set_aside)} row(s) or metric(s) set aside before fitting ("
              + "; ".join(f"{k}: {n}" for k, n in why.most_common(3)) + ")", file=sys.stderr)
    if kept.empty:
        first = set_aside[0]["reason"] if set_aside else "the table is empty"
        raise ConfigError(f"{results}: no rows left to fit after setting aside "
                          f"{len(set_aside)} (first: {first})")
    if command == "fit":
        fits = fit_results(long, out, fcfg, num_classes, source=str(results))
        return f"{len(fits)} fits -> {out / 'fits.json'}, {out / 'fits.md'}"
    path = build_report(kept, out, fits_dir=fits_dir, num_classes=num_classes,
                        title=Path(results).stem)
    return f"report -> {path}, {path.with_suffix('.html')}"
