"""Supervision formats: what a student is trained on, as token tensors with per-token masks.

Formats (the paper's "spectrum of teacher supervision and thinking depth"):
    label        prompt -> answer                      (answer tokens supervised)
    cot_short    prompt -> short rationale -> answer   (trace + answer supervised)
    cot_long     prompt -> full thinking trace -> answer
    blended_cot  cot_long tokens, with separate trace / answer masks for the blended loss

Masks are float [b, s] tensors aligned with `tokens` such that position t predicts
`targets[:, t]` (= tokens[:, t+1]). `prompt_mask`, `trace_mask` and `answer_mask` are disjoint.

Rows. Every format takes rows `{"id", "text", "label", ...}` (a data split); the CoT formats
also need `row["traces"]`, a mapping from thinking depth to the teacher's trace text:
`traces["cot_short"]` for `cot_short`, `traces["cot_long"]` for `cot_long` and `blended_cot`.
The teacher stage writes such rows to `runs/<name>/supervision/<split>.jsonl` (`Paths.supervision`);
`load_supervision_rows(supervision_dir, split, fmt)` reads them back, dropping the rows whose
teacher answer at that depth was rejected (each kept in the file with its `error`).

Sequence layout (the tiny family; `distillscale.tokenizer`): the trace covers the depth's
thinking token's successors up to and including `</think> event :`, and the answer is the class
token right after — for every format the gold class (`label_ids`), so the CE anchor is on gold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distillscale.config import FORMAT_DEPTH  # noqa: F401  (re-exported)
from distillscale.tokenizer import PromptEncoder

FORMATS = tuple(FORMAT_DEPTH)


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
    depth = FORMAT_DEPTH[fmt]
    # `label` asks for no trace, so any encoder with the plain `encode(rows)` surface works.
    b = encoder.encode(rows) if depth is None else encoder.encode(rows, depth=depth)
    s = b.tokens.shape[1]
    pos = torch.arange(s).unsqueeze(0)
    trace_len = b.trace_len if b.trace_len is not None else torch.zeros_like(b.answer_pos)
    trace_start = (b.answer_pos - trace_len).unsqueeze(1)
    # Everything before the trace is prompt; the eos after the answer is not supervised.
    prompt = (pos < trace_start).float() * b.loss_mask
    trace = ((pos >= trace_start) & (pos < b.answer_pos.unsqueeze(1))).float()
    return SupervisionBatch(
        tokens=b.tokens, targets=b.targets, prompt_mask=prompt, trace_mask=trace,
        answer_mask=b.answer_mask, label_ids=b.label_ids,
    )


def load_supervision_rows(supervision_dir: str | Path, split: str, fmt: str) -> list[dict]:
    """Rows of `<supervision_dir>/<split>.jsonl` usable for `fmt` (see module doc)."""
    path = Path(supervision_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the teacher stage with this split in "
                                "teacher.supervision.splits")
    if fmt not in FORMATS:
        raise ValueError(f"unknown supervision format {fmt!r} (one of {FORMATS})")
    depth = FORMAT_DEPTH[fmt]
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if depth is None or (row.get("traces") or {}).get(depth) is not None:
                rows.append(row)
    if depth is not None and not rows:
        raise ValueError(f"{path}: no row has a {depth!r} trace (teacher.supervision.depths?)")
    return rows
