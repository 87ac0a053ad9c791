"""Thin entry point: `python tools/eval.py CONFIG [key=value ...]` == `distillscale eval ...`."""

import sys

from distillscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
