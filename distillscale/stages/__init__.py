"""The stages of the method, one file each. A stage declares its folder, identity, inputs and
body (`distillscale.runner.Stage`); recipes name them: `run(stages.prune, student=s, step=1)`."""

from distillscale.stages import (
    data,
    distill,
    evaluate,
    fit,
    prune,
    report,
    supervision,
    teacher,
)

__all__ = ["data", "distill", "evaluate", "fit", "prune", "report", "supervision", "teacher"]
