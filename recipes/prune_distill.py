"""Minitron pruning of the teacher into each student, distilled after every prune step (one-shot or iterative)."""

# The default recipe: `distillscale run CONFIG` or `python recipes/prune_distill.py CONFIG`.
# It reads like the method: every line is one stage, skipped when its manifest says it is done.

import sys

from distillscale import stages
from distillscale.cli import recipe_script

VERIFIED = ["conf/experiments/quickstart.yaml", "conf/experiments/uniform_schedule.yaml",
            "conf/experiments/smollm2_cpu.yaml"]


def main(run):
    run(stages.data)                        # in-domain rows from the taxonomy, stratified splits
    run(stages.teacher)                     # the teacher: trained from scratch, or an HF checkpoint
    run(stages.supervision)                 # its labels, traces per depth, top-k logit caches
    for student in run.cfg.students:
        for step in run.schedule(student):  # prune.schedule: one_shot | uniform | decayed
            run(stages.prune, student=student, step=step.index)    # ModelOpt Minitron, width or depth
            run(stages.distill, student=student, step=step.index)  # logit_kd or lora_kd
    run(stages.evaluate)                    # in-domain F1 / accuracy, general knowledge, with CIs
    run(stages.fit)                         # metric vs compression ratio, per pruning axis
    run(stages.report)                      # results.csv, report.md, plots/


if __name__ == "__main__":
    sys.exit(recipe_script(__file__, sys.argv[1:]))
