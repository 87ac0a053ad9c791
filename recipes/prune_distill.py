"""Recipe: teacher -> Minitron-pruned students -> distillation -> evaluation -> report.

    python recipes/prune_distill.py conf/experiments/quickstart.yaml [key.sub=value ...]

Reads top to bottom like the method: every step is one library call on paths under
`runs/<name>/`, and each is skipped when its manifest says it is already done.
"""

import sys

from distillscale import pipeline
from distillscale.cli import _offline_defaults
from distillscale.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    _offline_defaults()
    try:
        cfg = load_config(argv[0], argv[1:])
    except (ConfigError, IndexError) as e:
        print(f"error: {e or 'usage: prune_distill.py CONFIG [key=value ...]'}", file=sys.stderr)
        return 2
    pipeline.run_data(cfg)                      # in-domain headlines, stratified splits
    pipeline.run_teacher(cfg)                   # the teacher (trained tiny, or loaded)
    for student in cfg.students:                # prune.schedule: one_shot | uniform | decayed
        for step, _pruned, _distilled in pipeline.student_folders(cfg, student):
            pipeline.run_prune(cfg, student, step)    # ModelOpt Minitron: width or depth
            pipeline.run_distill(cfg, student, step)  # logit_kd (ModelOpt) or lora_kd (peft)
    pipeline.run_eval(cfg)                      # macro F1 / accuracy with bootstrap CIs
    pipeline.run_fit(cfg)                       # metric vs compression ratio
    pipeline.run_report(cfg)                    # results.csv, report.md, plots/
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
