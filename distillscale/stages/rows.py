"""What the stages read from earlier stages: data splits, the supervision stage's rows, and the
experiment's prompt format."""

from __future__ import annotations

from pathlib import Path

from distillscale.data.build import read_jsonl
from distillscale.runner import Context
from distillscale.teacher.stage import prompt_encoder
from distillscale.teacher.supervision import load_supervision_rows

# Held-out rows on which a trace format's supervised-token KL is measured (bounded: the
# per-token log-probabilities over the vocabulary are kept for the teacher).
FORMAT_VAL_ROWS = 64


def load_split(data_dir: Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the data stage first")
    return read_jsonl(path)


def encoder(ctx: Context, seq_length: int | None = None):
    """(encoder, tokenizer): the prompt format every stage trains and scores with — the tiny
    family's for a scratch teacher, the checkpoint's chat template (through the family
    adapter) for an HF teacher. `seq_length` None: the teacher checkpoint's."""
    return prompt_encoder(ctx.cfg, ctx.paths.teacher, ctx.taxonomy, seq_length)


def train_rows(ctx: Context) -> list[dict]:
    """The distillation rows: the data split for `label`, else the supervision stage's rows with
    the teacher's traces at the format's depth (`supervision/train.jsonl`)."""
    if ctx.cfg.distill.supervision == "label":
        return load_split(ctx.paths.data, "train")
    return load_supervision_rows(ctx.paths.supervision, "train", ctx.cfg.distill.supervision)


def format_val_rows(ctx: Context) -> list[dict] | None:
    """Val rows with the teacher's traces for a trace format (None: label, or val not supervised)."""
    fmt = ctx.cfg.distill.supervision
    if fmt == "label" or not (ctx.paths.supervision / "val.jsonl").is_file():
        return None
    return load_supervision_rows(ctx.paths.supervision, "val", fmt)[:FORMAT_VAL_ROWS]
