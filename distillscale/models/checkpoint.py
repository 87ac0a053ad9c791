"""Model folders shared by the teacher, prune and distill stages.

`<stage>/checkpoint/` holds the Megatron-core weights and `arch.json`: `model.pt` (a plain state
dict, exact, reloadable into a freshly built model) from a single model-parallel rank, or
`dist/` (megatron-core distributed checkpointing: every TP/PP rank writes its own shards, and
any TP/PP layout, one process included, loads them back) when the model is split over ranks; `<stage>/hf/` holds the same model as an HF checkpoint
(safetensors + config.json + tokenizer) that `transformers` loads. The tokenizer lives in the
teacher stage and is shared by every student.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distillscale.config import ModelArch
from distillscale.manifest import atomic_path, replace_dir, write_text_atomic, writer_path
from distillscale.models.megatron_gpt import build_gpt
from distillscale.runtime import ranks

CHECKPOINT = "checkpoint"
DIST = "dist"


def _model_parallel_size() -> int:
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return (parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_pipeline_model_parallel_world_size())


def save_model(model, arch: ModelArch, vocab_size: int, folder: Path) -> None:
    """Write `model` into `folder/checkpoint/`. Collective when the model is split over TP/PP
    ranks: every rank calls it (with its own stage folder) and all of them write the shards
    of one `dist/` checkpoint in rank 0's folder."""
    if _model_parallel_size() > 1:
        _save_distributed(model, arch, vocab_size, writer_path(Path(folder)) / CHECKPOINT)
        return
    ck = Path(folder) / CHECKPOINT
    ck.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with atomic_path(ck / "model.pt") as tmp:
        torch.save(state, tmp)
    shutil.rmtree(ck / DIST, ignore_errors=True)  # a stale split-model checkpoint
    _write_meta(ck, arch, vocab_size)


def _write_meta(ck: Path, arch: ModelArch, vocab_size: int) -> None:
    write_text_atomic(ck / "arch.json", json.dumps(
        {"arch": arch.model_dump(mode="json"), "vocab_size": vocab_size}, indent=2))


def _save_distributed(model, arch: ModelArch, vocab_size: int, ck: Path) -> None:
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import dist_checkpointing

    tmp = ck / f".{DIST}.partial"
    if ranks.is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    ranks.barrier()
    if ranks.is_rank_zero():
        replace_dir(tmp, ck / DIST)
        (ck / "model.pt").unlink(missing_ok=True)  # a stale single-rank checkpoint
        _write_meta(ck, arch, vocab_size)
    ranks.barrier()


def read_arch(folder: Path) -> tuple[ModelArch, int]:
    """(arch, vocab_size) of a stage folder written by `save_model`, no weights read."""
    meta_path = Path(folder) / CHECKPOINT / "arch.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no model checkpoint ({meta_path} missing)")
    meta = json.loads(meta_path.read_text())
    return ModelArch.model_validate(meta["arch"]), int(meta["vocab_size"])


def load_model(folder: Path):
    """(model, arch, vocab_size) from a stage folder written by `save_model`."""
    ck = Path(folder) / CHECKPOINT
    arch, vocab = read_arch(folder)
    model = build_gpt(arch, vocab)
    if (ck / DIST / "metadata.json").is_file():
        # heavy: megatron-core, only where a Megatron model is built or run
        from megatron.core import dist_checkpointing

        # Resharded to this process's TP/PP layout, whatever layout wrote it.
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ck / DIST))
        source = ck / DIST
    else:
        if _model_parallel_size() > 1:
            raise RuntimeError(
                f"{ck / 'model.pt'}: a single-rank checkpoint cannot be loaded into a model split "
                "over TP/PP ranks; load it with tensor_parallel=pipeline_parallel=1 (or re-save it "
                "from a split model, which writes checkpoint/dist/)")
        state = torch.load(ck / "model.pt", map_location="cpu", weights_only=True)
        source = ck / "model.pt"
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: does not match arch.json (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.eval()
    return model, arch, vocab
