"""Chain-of-thought distillation: students learn the teacher's reasoning traces (short, long, or blended with the label)."""

# Derived from prune_distill: the supervision stage writes the teacher's traces at the format's
# thinking depth (`teacher.supervision.depths` must include it) and distillation trains on
# them — the KL over trace + answer tokens, or for `blended_cot` the KL over the trace with a
# cross-entropy anchor on the gold answer (`distill.loss.alpha`, 0.5 unless set).

import sys

from distillscale.cli import recipe_script
from distillscale.recipes import load

REQUIRES = {"distill.supervision": ("cot_short", "cot_long", "blended_cot")}
VERIFIED = ["conf/experiments/cot_distill.yaml"]

main = load("prune_distill").main

if __name__ == "__main__":
    sys.exit(recipe_script(__file__, sys.argv[1:]))
