"""The rich console the stages print their progress and tables to.

Off a terminal (a Slurm job's log file, CI, a pipe) rich assumes 80 columns, and the wide
tables (data rounds, the report) come out with every column cut to a few characters. There
the width is `COLUMNS` if set, else 160; on a terminal rich measures it as usual.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 160


def stderr_console() -> Console:
    width = None
    if not sys.stderr.isatty():
        width = int(os.environ.get("COLUMNS") or 0) or LOG_WIDTH
    return Console(stderr=True, width=width)
