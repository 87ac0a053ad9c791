"""Thin entry point: `python tools/fit.py CONFIG [key=value ...]` or
`python tools/fit.py --results results.parquet --out DIR` == `distillscale fit ...`."""

import sys

from distillscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
