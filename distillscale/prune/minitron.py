"""Minitron pruning of a Megatron-core GPTModel with NVIDIA ModelOpt (`mcore_minitron`).

Width (hidden_size, ffn_hidden_size, num_attention_heads: activation-magnitude importance) and
depth (num_layers: ModelOpt's block-influence score, 1 - cos(layer input, layer output)) are both
ModelOpt's own algorithm. This module adds what a pipeline needs around it: a target shape picked
for a compression ratio, a pruned copy (the teacher is left intact), and a validation that the
pruned weights really have the requested shape, returned as a fresh plain GPTModel.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distillscale.compat.cpu import activate, cuda_available
from distillscale.config import ModelArch
from distillscale.manifest import replace_dir
from distillscale.models.megatron_gpt import build_gpt, forward_logits
from distillscale.prune.shapes import (  # noqa: F401  (the shape search, re-exported)
    DEPTH_KEYS,
    PRUNABLE_KEYS,
    WIDTH_KEYS,
    check_target,
    choose_shape,
    pruned_arch,
)

# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def prune_minitron(
    model,
    arch: ModelArch,
    target: dict[str, int],
    forward_loop: Callable[[Any], None],
    *,
    hidden_size_divisor: int = 16,
    ffn_hidden_size_divisor: int = 32,
    inplace: bool = False,
    info: dict | None = None,
    scores_dir: str | Path | None = None,
):
    """Prune `model` (of shape `arch`) to `target` with ModelOpt Minitron; return (student, arch).

    `target` is a ModelOpt export_config subset, e.g. {"hidden_size": 96, "ffn_hidden_size": 256,
    "num_attention_heads": 2} or {"num_layers": 2}. `forward_loop(model)` runs the calibration
    batches. Unless `inplace`, a copy is pruned and `model` is left untouched (ModelOpt prunes in
    place). The returned student is a freshly built plain GPTModel of the pruned shape holding the
    pruned weights, checked to reproduce the pruned model's logits. If `info` is given it receives
    `layer_scores` (1-indexed layer -> ModelOpt block-influence score, higher = more important),
    `dropped_layers` (1-indexed), `prune_seconds` and `scores_cached` (whether the importance
    scores came from `scores_dir`).

    `scores_dir`: a cache of the importance scores of *this* model (ModelOpt's own search
    checkpoint: per-rank activation statistics and layer scores). When it exists the calibration
    forward loop is skipped and the cached scores rank the channels, heads and layers; otherwise
    it is written once the scores are computed, so every other target pruned from the same model
    (sibling students of one teacher, a resumed run) reuses them. Scores depend on the model's
    weights: the caller keys the folder by the source model.
    """
    activate()  # before ModelOpt is imported: its Megatron plugins need the TE stub on CPU
    # heavy: ModelOpt, only where a model is pruned or distilled
    import modelopt.torch.prune as mtp

    target = dict(target)
    if not target:
        raise ValueError("empty pruning target")
    check_target(
        arch,
        target,
        hidden_size_divisor=hidden_size_divisor,
        ffn_hidden_size_divisor=ffn_hidden_size_divisor,
    )
    new_arch = pruned_arch(arch, target)
    vocab_size = model.vocab_size
    work = model if inplace else _rebuild(arch, vocab_size, model.state_dict())

    config = mtp.mcore_minitron.get_mcore_minitron_config(
        hidden_size_divisor=hidden_size_divisor,
        ffn_hidden_size_divisor=ffn_hidden_size_divisor,
        num_layers_divisor=1,
    )
    search_config: dict[str, Any] = {"forward_loop": forward_loop}
    cached = False
    if scores_dir is not None:
        scores_dir = Path(scores_dir)
        cached = scores_dir.is_dir()
        # Written to a fresh sibling folder and renamed when complete: a run killed while
        # ModelOpt writes its checkpoint never leaves a half-written cache behind.
        work_dir = scores_dir if cached else _fresh_partial_dir(scores_dir)
        # A file name, not a folder: ModelOpt 0.47 makes it per rank (`scores<rank>.pth`) and,
        # when that is missing, falls back to the path itself, which for a folder path is then
        # an existing directory that it tries to torch.load.
        search_config["checkpoint"] = str(work_dir / "scores.pth")
    start = time.perf_counter()
    pruned, search_state = mtp.prune(
        work,
        mode=[("mcore_minitron", config)],
        constraints={"export_config": dict(target)},
        dummy_input=None,
        config=search_config,
    )
    seconds = time.perf_counter() - start
    if scores_dir is not None and not cached:
        _publish_dir(work_dir, scores_dir)

    student = validate_pruned(pruned, new_arch, vocab_size, target)
    if info is not None:
        scores = {int(k): float(v) for k, v in (search_state.get("layer_scores") or {}).items()}
        ranked = search_state.get("sorted_layers") or []
        info.update(
            layer_scores=scores,
            dropped_layers=sorted(ranked[new_arch.num_layers :]),
            prune_seconds=seconds,
            scores_cached=cached,
        )
    return student, new_arch


def _fresh_partial_dir(final: Path) -> Path:
    """`.<name>.partial` next to `final`, emptied of anything a killed run left there (one name
    for every rank, so all ranks' files land in one folder)."""
    tmp = final.with_name(f".{final.name}.partial")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return tmp


def _publish_dir(tmp: Path, final: Path) -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank has written its own rank<r>.pth
    if not dist.is_initialized() or dist.get_rank() == 0:
        if final.is_dir():  # another process finished first: keep its (identical) scores
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def rank_layers_by_importance(model, arch: ModelArch, forward_loop) -> list[int]:
    """1-indexed layers, most important first, by ModelOpt's block-influence score (computed on a
    copy; `model` is not modified)."""
    if arch.num_layers < 2:
        return [1]
    info: dict = {}
    prune_minitron(model, arch, {"num_layers": arch.num_layers - 1}, forward_loop, info=info)
    scores = info["layer_scores"]
    return sorted(scores, key=lambda n: scores[n], reverse=True)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _rebuild(arch: ModelArch, vocab_size: int, state_dict: dict):
    """A fresh model of `arch` holding `state_dict`, loaded strictly (copy.deepcopy of a GPTModel
    fails on its process groups)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        fresh = build_gpt(arch, vocab_size)
    fresh.load_state_dict(state_dict, strict=True)
    return fresh


def validate_pruned(pruned, new_arch: ModelArch, vocab_size: int, target: dict[str, int]):
    """Rebuild `pruned` as a fresh GPTModel of `new_arch`; raise RuntimeError on any mismatch."""
    cfg = pruned.config
    for key, value in target.items():
        if getattr(cfg, key) != value:
            raise RuntimeError(
                f"ModelOpt did not prune {key}: model config has {getattr(cfg, key)}, "
                f"requested {value}"
            )
    if len(pruned.decoder.layers) != new_arch.num_layers:
        raise RuntimeError(
            f"ModelOpt left {len(pruned.decoder.layers)} layers, requested {new_arch.num_layers}"
        )
    with torch.random.fork_rng(devices=[]):
        fresh = build_gpt(new_arch, vocab_size)
    want = {n: tuple(p.shape) for n, p in fresh.state_dict().items() if torch.is_tensor(p)}
    got = {n: tuple(p.shape) for n, p in pruned.state_dict().items() if torch.is_tensor(p)}
    wrong = [
        f"{n}: {got.get(n)} (expected {shape})"
        for n, shape in want.items()
        if not n.endswith("_extra_state") and got.get(n) != shape
    ]
    if wrong:
        raise RuntimeError(
            f"pruning to {target} was not applied to the weights (a requested dimension was "
            f"silently not pruned): " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else "")
        )
    student = _rebuild(new_arch, vocab_size, pruned.state_dict())

    device = next(student.parameters()).device
    tokens = torch.randint(
        0, vocab_size, (2, min(new_arch.seq_length, 32)), generator=torch.Generator().manual_seed(0)
    ).to(device)
    was_training = (pruned.training, student.training)
    pruned.eval()
    student.eval()
    with torch.no_grad():
        diff = (forward_logits(pruned, tokens) - forward_logits(student, tokens)).abs().max().item()
    pruned.train(was_training[0])
    student.train(was_training[1])
    tol = 1e-2 if cuda_available() else 1e-5
    if not diff <= tol:
        raise RuntimeError(
            f"the rebuilt {new_arch} does not reproduce the pruned model: max |logit diff| = {diff}"
        )
    return student
