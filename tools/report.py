"""Thin entry point: `python tools/report.py CONFIG [key=value ...]` or
`python tools/report.py --results R --fits DIR --out DIR` == `distillscale report ...`."""

import sys

from distillscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
