"""lm-eval task folder: `lm_eval --include_path <this folder> --tasks distillscale_mmlu ...`.

Tasks: `distillscale_mmlu` / `_cloze`, `distillscale_mmlu_pro` / `_cloze` (local copies, see
`loaders.py`), `distillscale_probe` / `_cloze` (the synthetic knowledge probe the teacher stage
writes) and `distillscale_indomain` (label-constrained, with a macro-F1 aggregation).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
