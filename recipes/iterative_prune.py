"""Iterative Minitron pruning: several smaller prune steps (uniform or decayed), each distilled before the next."""

# Derived from prune_distill (the same stages in the same order): step k prunes the distilled
# student of step k-1, so every step is recovered before the next prune; `prune.steps` and
# `prune.decay` shape the chain, and the evaluation scores every step, not only the last.

import sys

from distillscale.cli import recipe_script
from distillscale.recipes import load

REQUIRES = {"prune.schedule": ("uniform", "decayed")}
VERIFIED = ["conf/experiments/uniform_schedule.yaml"]

main = load("prune_distill").main

if __name__ == "__main__":
    sys.exit(recipe_script(__file__, sys.argv[1:]))
