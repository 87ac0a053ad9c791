"""The export check every student passes: its HF checkpoint, reloaded with `transformers`,
must give the logits of the Megatron model it was exported from."""

from __future__ import annotations

from pathlib import Path

import torch

from distillscale.compat.cpu import cuda_available
from distillscale.models.megatron_gpt import forward_logits

# fp32 on CPU: measured max |diff| ~1e-5 at |logit| ~10 (tests/models/test_hf_io.py); bf16 on
# GPU rounds every matmul, so the bound is looser there.
CPU_TOLERANCE = 1e-3
GPU_TOLERANCE = 5e-2


class ExportMismatchError(RuntimeError):
    pass


@torch.no_grad()
def hf_logit_diff(model, hf_dir: str | Path, tokens: torch.Tensor) -> float:
    """max |logits(Megatron model) - logits(transformers reload of hf_dir)| on `tokens`."""
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoModelForCausalLM

    was_training = model.training
    model.eval()
    ref = forward_logits(model, tokens).float().cpu()
    model.train(was_training)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    got = hf(input_ids=tokens.cpu()).logits.float()
    if got.shape != ref.shape:
        raise ExportMismatchError(
            f"{hf_dir}: transformers logits {tuple(got.shape)} vs model {tuple(ref.shape)}"
        )
    return float((got - ref).abs().max())


def check_hf_export(model, hf_dir: str | Path, tokens: torch.Tensor) -> float:
    """`hf_logit_diff`, raising ExportMismatchError above the device's tolerance."""
    return check_logit_diff(hf_logit_diff(model, hf_dir, tokens), hf_dir)


def check_logit_diff(diff: float, hf_dir: str | Path) -> float:
    """`diff` (an HF export's max |logit diff| from its model), raising ExportMismatchError
    above the device's tolerance."""
    tol = GPU_TOLERANCE if cuda_available() else CPU_TOLERANCE
    if not diff <= tol:
        raise ExportMismatchError(
            f"{hf_dir}: HF export does not reproduce the model: max |logit diff| {diff:.3g} > {tol}"
        )
    return diff
