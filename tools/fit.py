"""Thin entry point: `python tools/fit.py CONFIG [key=value ...]` == `distillscale fit ...`."""

import sys

from distillscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
