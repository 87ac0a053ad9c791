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
    # rich itself reads `COLUMNS` when no width is given.
    wide = not sys.stderr.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=True, width=LOG_WIDTH if wide else None)
