"""Scaling laws: metric vs dataset size and vs compression ratio (scipy).

`forms` holds the candidate curves, `estimate` the robust multi-start fit with bootstrap CIs,
extrapolation error and inverse predictions, `table` the grouping of a long results table and
the `fits.json` / `fits.md` outputs.
"""

from distillscale.fit.estimate import FitResult, band, bootstrap, fit_form, inverse_with_ci
from distillscale.fit.forms import FORMS, Form
from distillscale.fit.table import (
    ResultsTableError,
    chance_floor,
    fit_results,
    fit_table,
    is_general,
    read_results,
    write_fits,
)

__all__ = [
    "FORMS", "FitResult", "Form", "ResultsTableError", "band", "bootstrap", "chance_floor",
    "fit_form", "fit_results", "fit_table", "inverse_with_ci", "is_general", "read_results", "write_fits",
]
