"""Supervision formats: what a student is trained on, as token tensors with per-token masks.

Formats (the paper's "spectrum of teacher supervision and thinking depth"):
    label        prompt -> answer                      (answer tokens supervised)
    cot_short    prompt -> short rationale -> answer   (trace + answer supervised)
    cot_long     prompt -> full thinking trace -> answer
    blended_cot  cot_long tokens, with separate trace / answer masks for the blended loss

Masks are float [b, s] tensors aligned with `tokens` such that position t predicts
`targets[:, t]` (= tokens[:, t+1]). `prompt_mask`, `trace_mask` and `answer_mask` are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillscale.tokenizer import PromptEncoder

FORMATS = ("label", "cot_short", "cot_long", "blended_cot")


@dataclass
class SupervisionBatch:
    tokens: torch.Tensor  # [b, s] input ids
    targets: torch.Tensor  # [b, s] next-token ids
    prompt_mask: torch.Tensor  # [b, s] positions whose target is still prompt
    trace_mask: torch.Tensor  # [b, s] positions whose target is a reasoning-trace token
    answer_mask: torch.Tensor  # [b, s] positions whose target is an answer token
    label_ids: torch.Tensor  # [b] gold class index

    @property
    def kd_mask(self) -> torch.Tensor:
        """Tokens the KL term covers: trace and answer."""
        return self.trace_mask + self.answer_mask


def supervision_batch(encoder: PromptEncoder, rows: list[dict], fmt: str) -> SupervisionBatch:
    if fmt not in FORMATS:
        raise ValueError(f"unknown supervision format {fmt!r} (one of {FORMATS})")
    if fmt != "label":
        raise NotImplementedError(f"supervision {fmt!r} needs teacher traces (teacher stage)")
    b = encoder.encode(rows)
    prompt = b.loss_mask - b.answer_mask
    # The eos after the answer is not supervised by `label`: only the class token is.
    prompt = prompt * (torch.arange(b.tokens.shape[1]).unsqueeze(0) < b.answer_pos.unsqueeze(1))
    return SupervisionBatch(
        tokens=b.tokens, targets=b.targets, prompt_mask=prompt.float(),
        trace_mask=torch.zeros_like(b.answer_mask), answer_mask=b.answer_mask,
        label_ids=b.label_ids,
    )
