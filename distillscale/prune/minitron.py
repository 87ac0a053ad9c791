"""Minitron pruning of a Megatron-core GPTModel with NVIDIA ModelOpt (`mcore_minitron`).

Width (hidden_size, ffn_hidden_size, num_attention_heads: activation-magnitude importance) and
depth (num_layers: ModelOpt's block-influence score, 1 - cos(layer input, layer output)) are both
ModelOpt's own algorithm. This module adds what a pipeline needs around it: a target shape picked
for a compression ratio, a pruned copy (the teacher is left intact), and a validation that the
pruned weights really have the requested shape, returned as a fresh plain GPTModel.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from distillscale.compat.cpu import apply_modelopt_cpu_shims, cuda_available
from distillscale.config import ModelArch
from distillscale.models.megatron_gpt import arch_params, build_gpt, forward_logits

WIDTH_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads")
DEPTH_KEYS = ("num_layers",)
PRUNABLE_KEYS = WIDTH_KEYS + DEPTH_KEYS


# ---------------------------------------------------------------------------------------------
# Target shapes
# ---------------------------------------------------------------------------------------------


def check_target(
    arch: ModelArch,
    target: dict[str, int],
    *,
    hidden_size_divisor: int = 16,
    ffn_hidden_size_divisor: int = 32,
) -> None:
    """Raise ValueError if ModelOpt cannot prune `arch` to `target` (one line per problem)."""
    problems = []
    unknown = sorted(set(target) - set(PRUNABLE_KEYS))
    if unknown:
        problems.append(f"unknown keys {unknown} (prunable: {list(PRUNABLE_KEYS)})")
    for key in set(target) & set(PRUNABLE_KEYS):
        value, teacher = target[key], getattr(arch, key)
        if not isinstance(value, int) or value < 1 or value > teacher:
            problems.append(f"{key}={value!r} must be an int in 1..{teacher} (the teacher's)")
    divisors = {"hidden_size": hidden_size_divisor, "ffn_hidden_size": ffn_hidden_size_divisor}
    for key, div in divisors.items():
        value = target.get(key)
        if isinstance(value, int) and value != getattr(arch, key) and value % div:
            problems.append(f"{key}={value} must be a multiple of {key}_divisor={div}")
    heads = target.get("num_attention_heads")
    if isinstance(heads, int) and heads % arch.num_query_groups:
        problems.append(
            f"num_attention_heads={heads} must be a multiple of num_query_groups="
            f"{arch.num_query_groups} (query groups are not pruned by ModelOpt since 0.41)"
        )
    if problems:
        raise ValueError("invalid pruning target " + str(target) + ": " + "; ".join(problems))


def pruned_arch(arch: ModelArch, target: dict[str, int]) -> ModelArch:
    """The student's ModelArch. The head dim stays the teacher's (ModelOpt keeps kv_channels fixed
    when heads or hidden_size are pruned), so `kv_channels` is always written out explicitly."""
    update = {k: int(v) for k, v in target.items()}
    update["kv_channels"] = arch.head_dim
    return ModelArch.model_validate({**arch.model_dump(), **update})


def choose_shape(
    arch: ModelArch,
    vocab_size: int,
    axis: Literal["width", "depth"],
    ratio: float,
    hidden_size_divisor: int = 16,
    ffn_hidden_size_divisor: int = 32,
    min_shape: dict[str, int] | None = None,
    head_policy: Literal["scale", "keep"] = "scale",
) -> tuple[dict[str, int], float]:
    """A valid pruning target whose parameter count is closest to `ratio` x the teacher's.

    width: hidden_size in multiples of its divisor, ffn_hidden_size in multiples of its divisor,
    num_attention_heads in multiples of num_query_groups (head dim fixed). Among the shapes within
    1% of the teacher's parameters of the best match:
      head_policy="scale" (default): the shape shrinking hidden, ffn and attention heads most evenly
        wins. Attention cost per token grows with heads x head_dim and (for the score and value
        products) with sequence length, none of which shrinks with hidden_size; a student that
        keeps every head at a quarter of the parameters keeps most of the teacher's attention
        time and is far less faster than it is smaller (tools/bench_student_speed.py).
      head_policy="keep": Minitron's published width recipe (heads kept; hidden and ffn shrink most
        evenly); heads are pruned only when no shape keeping them comes within 1%.
    depth: num_layers in 1..L-1.
    Returns (target with only the changed keys, achieved ratio). The teacher shape itself is never
    returned (a target always prunes something). `min_shape` (e.g. the final student of an
    iterative schedule) bounds every dimension from below.
    """
    floor = min_shape or {}
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    teacher = arch_params(arch, vocab_size)

    if axis == "depth":
        if arch.num_layers < 2:
            raise ValueError("depth pruning needs a teacher with at least 2 layers")
        best = min(
            range(max(1, floor.get("num_layers", 1)), arch.num_layers),
            key=lambda n: abs(_ratio(arch, {"num_layers": n}, vocab_size, teacher) - ratio),
        )
        target = {"num_layers": best}
        return target, _ratio(arch, target, vocab_size, teacher)

    if axis != "width":
        raise ValueError(f"axis must be 'width' or 'depth', got {axis!r}")
    H, F, N, G = (
        arch.hidden_size,
        arch.ffn_hidden_size,
        arch.num_attention_heads,
        arch.num_query_groups,
    )
    hiddens = [h for h in sorted(set(range(hidden_size_divisor, H, hidden_size_divisor)) | {H})
               if h >= floor.get("hidden_size", 0)]
    ffns = [f for f in sorted(set(range(ffn_hidden_size_divisor, F, ffn_hidden_size_divisor)) | {F})
            if f >= floor.get("ffn_hidden_size", 0)]
    heads = [n for n in range(G, N + 1, G) if n >= floor.get("num_attention_heads", 0)]
    want = ratio * teacher
    cands = []
    for h in hiddens:
        for n in heads:
            # Parameters are linear in ffn_hidden_size: only the ffn sizes around the exact
            # solution can be closest (keeps the search small for large teachers).
            p1, p2 = (arch_params(_shape(arch, h, f, n), vocab_size) for f in (ffns[0], ffns[-1]))
            slope = (p2 - p1) / max(ffns[-1] - ffns[0], 1)
            f_star = ffns[0] + (want - p1) / slope if slope else ffns[0]
            i = bisect.bisect_left(ffns, f_star)
            for f in {ffns[max(i - 1, 0)], ffns[min(i, len(ffns) - 1)]}:
                if (h, f, n) != (H, F, N):
                    shape = {"hidden_size": h, "ffn_hidden_size": f, "num_attention_heads": n}
                    err = abs(arch_params(_shape(arch, h, f, n), vocab_size) / teacher - ratio)
                    cands.append((err, shape))
    if not cands:
        raise ValueError(f"no smaller width shape exists for {arch}")
    best_err = min(err for err, _ in cands)
    near = [(err, s) for err, s in cands if err <= best_err + 0.01]
    if head_policy == "keep":
        keep_heads = [(err, s) for err, s in near if s["num_attention_heads"] == N]
        pool = keep_heads or near
        _, shape = min(
            pool,
            key=lambda c: (
                -c[1]["num_attention_heads"],
                round(abs(c[1]["hidden_size"] / H - c[1]["ffn_hidden_size"] / F), 6),
                c[0],
            ),
        )
    elif head_policy == "scale":
        def spread(s: dict[str, int]) -> float:
            fracs = (s["hidden_size"] / H, s["ffn_hidden_size"] / F, s["num_attention_heads"] / N)
            return round(max(fracs) - min(fracs), 6)

        _, shape = min(near, key=lambda c: (spread(c[1]), -c[1]["num_attention_heads"], c[0]))
    else:
        raise ValueError(f"head_policy must be 'scale' or 'keep', got {head_policy!r}")
    target = {k: v for k, v in shape.items() if v != getattr(arch, k)}
    return target, _ratio(arch, target, vocab_size, teacher)


def _shape(arch: ModelArch, hidden: int, ffn: int, heads: int) -> ModelArch:
    # Unvalidated copy: only for counting parameters inside the search.
    return arch.model_copy(
        update={
            "hidden_size": hidden,
            "ffn_hidden_size": ffn,
            "num_attention_heads": heads,
            "kv_channels": arch.head_dim,
        }
    )


def _ratio(arch: ModelArch, target: dict, vocab_size: int, teacher: int) -> float:
    return arch_params(pruned_arch(arch, target), vocab_size) / teacher


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
    apply_modelopt_cpu_shims()
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
    import torch.distributed as dist

    tmp = final.with_name(f".{final.name}.partial")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return tmp


def _publish_dir(tmp: Path, final: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # every rank has written its own rank<r>.pth
    if not dist.is_initialized() or dist.get_rank() == 0:
        if final.is_dir():  # another process finished first: keep its (identical) scores
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
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
