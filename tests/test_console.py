"""Tables printed into a log file (Slurm, CI) keep their columns whole."""

import io
import sys

from rich.table import Table

from distillscale.compat.console import LOG_WIDTH, stderr_console


def _table() -> Table:
    t = Table(title="data rounds")
    for name in ("round", "generated", "filters", "labels", "exact", "near", "semantic", "kept",
                 "cumulative", "dedup rate", "seconds"):
        t.add_column(name)
    t.add_row("1", "525,000", "5", "0", "9,319", "30,415", "4,904", "480,357", "480,357",
              "0.085", "261.4")
    return t


def test_off_a_terminal_tables_are_not_cut_to_80_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    buf = io.StringIO()  # not a terminal, like a job's log file
    monkeypatch.setattr(sys, "stderr", buf)
    con = stderr_console()
    assert con.width == LOG_WIDTH
    con.print(_table())
    out = buf.getvalue()
    assert "525,000" in out and "generated" in out and "dedup rate" in out and "…" not in out
    monkeypatch.setenv("COLUMNS", "100")
    assert stderr_console().width == 100
