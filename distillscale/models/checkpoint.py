"""Model folders shared by the teacher, prune and distill stages.

`<stage>/checkpoint/` holds the Megatron-core weights (`model.pt`, exact, reloadable into a
freshly built model) and `arch.json`; `<stage>/hf/` holds the same model as an HF checkpoint
(safetensors + config.json + tokenizer) that `transformers` loads. The tokenizer lives in the
teacher stage and is shared by every student.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distillscale.config import ModelArch
from distillscale.models.megatron_gpt import build_gpt

CHECKPOINT = "checkpoint"


def save_model(model, arch: ModelArch, vocab_size: int, folder: Path) -> None:
    ck = Path(folder) / CHECKPOINT
    ck.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tmp = ck / f".model.pt.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, ck / "model.pt")
    (ck / "arch.json").write_text(
        json.dumps({"arch": arch.model_dump(mode="json"), "vocab_size": vocab_size}, indent=2)
    )


def load_model(folder: Path):
    """(model, arch, vocab_size) from a stage folder written by `save_model`."""
    ck = Path(folder) / CHECKPOINT
    meta_path = ck / "arch.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no model checkpoint ({meta_path} missing)")
    meta = json.loads(meta_path.read_text())
    arch = ModelArch.model_validate(meta["arch"])
    vocab = int(meta["vocab_size"])
    model = build_gpt(arch, vocab)
    state = torch.load(ck / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(
            f"{ck / 'model.pt'}: does not match arch.json (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.eval()
    return model, arch, vocab
