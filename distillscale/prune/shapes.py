"""Minitron target shapes: which widths / depths ModelOpt can prune a teacher to, and the one
closest to a parameter ratio. Shape arithmetic only (no torch), so the launch planner checks
every planned student's layout on a host without the training stack."""

from __future__ import annotations

import bisect
from typing import Literal

from distillscale.config import ModelArch
from distillscale.models.shape import arch_params, hf_family

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
    hidden, heads = target.get("hidden_size", arch.hidden_size), target.get(
        "num_attention_heads", arch.num_attention_heads)
    if (isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and not _exportable(arch, hidden, heads)):
        problems.append(
            f"hidden_size={hidden} must be a multiple of num_attention_heads={heads} "
            "(transformers' LlamaConfig requires it of the student's HF export)")
    if problems:
        raise ValueError("invalid pruning target " + str(target) + ": " + "; ".join(problems))


def _exportable(arch: ModelArch, hidden: int, heads: int) -> bool:
    """Whether a student of this hidden size and head count can be written as an HF checkpoint
    of the teacher's family: transformers' LlamaConfig (Llama, Mistral, scratch teachers) refuses
    a hidden size that is not a multiple of the head count, even with an explicit head_dim;
    Qwen2 and Qwen3 do not check it."""
    return hf_family(arch) != "llama" or hidden % heads == 0


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
    num_attention_heads in multiples of num_query_groups (head dim fixed), and for a Llama-family
    export hidden_size a multiple of the head count (`_exportable`). Among the shapes within
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
            if not _exportable(arch, h, n):
                continue
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
