"""LoRA knowledge distillation: the pruned student recovers through low-rank adapters, merged into its weights after training."""

# Derived from prune_distill: only the recovery differs (`distill.method: lora_kd`: peft LoRA
# adapters on the student's HF modules, trained on the same divergence against the teacher,
# online or from its logit cache; `distill.lora_rank` and `distill.lora_alpha` size them).

import sys

from distillscale.cli import recipe_script
from distillscale.recipes import load

REQUIRES = {"distill.method": ("lora_kd",)}
VERIFIED = ["conf/experiments/lora_kd.yaml"]

main = load("prune_distill").main

if __name__ == "__main__":
    sys.exit(recipe_script(__file__, sys.argv[1:]))
