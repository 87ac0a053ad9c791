"""Real CPU inference speed of a student against its teacher, from their HF exports.

What is timed is what serving the task costs: a prefill over prompts of the model's full context
that returns next-token logits for the last position only (`logits_to_keep=1`, as `generate`'s
prefill and label-constrained scoring do). Logits at every position (`keep=0`, the training-side
forward) write a batch x seq x vocab tensor that is the same size for every student, which
understates the speedup of narrow students on small models.

Models are timed round-robin in one process (every round times each model once, back to back),
and the speedup is the median of the within-round time ratios: a round's teacher and student run
moments apart, so load from other processes mostly cancels in their ratio. Used by the distill
stage (manifest fields `cpu_tokens_per_s`, `teacher_cpu_tokens_per_s`, `cpu_speedup`) and by
`tools/bench_student_speed.py`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def load_hf_causal_lm(path: str | Path):
    """An HF checkpoint as a transformers causal LM, fp32, in eval mode (what is timed here;
    `models.hf_io.load_hf` loads one as a Megatron-core GPTModel instead)."""
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def random_prompts(vocab_size: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def time_rounds(models: dict, tokens: torch.Tensor, repeats: int,
                keep: int = 1) -> dict[str, list[float]]:
    """Forward seconds of each model in each of `repeats` rounds, after one warm-up call each
    (first-call allocations and kernel choice)."""
    return _round_robin(models, lambda model: model(input_ids=tokens, logits_to_keep=keep),
                        repeats)


def _round_robin(models: dict, call, repeats: int) -> dict[str, list[float]]:
    """Seconds of `call(model)` for each model in each of `repeats` rounds (every round times
    each model once, back to back), after one warm-up call each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            call(model)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                call(model)
                times[name].append(time.perf_counter() - t0)
    return times


def time_generation_rounds(models: dict, prompt: torch.Tensor, new_tokens: int,
                           repeats: int, cache: str = "dynamic") -> dict[str, list[float]]:
    """Seconds each model takes to generate exactly `new_tokens` tokens greedily after `prompt`
    (batch 1 as a rule: one user's request), with its KV cache, per round, after one warm-up
    each; models round-robin as in `time_rounds`. `cache`: transformers' cache implementation
    ("dynamic": grown by concatenation each step; "static": preallocated, the layout
    `compile_for_decoding` needs)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    mask = torch.ones_like(prompt)
    extra = {} if cache == "dynamic" else {"cache_implementation": cache}

    def run(model):
        # min = max new tokens and no stop token: every model produces the same token count.
        out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, use_cache=True, **extra)
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, "
                               f"not {new_tokens}")

    return _round_robin(models, run, repeats)


def compile_for_decoding(model):
    """`model.forward` through `torch.compile` (inductor's C++ CPU backend, static shapes):
    per-token decoding at batch 1 is a few hundred small ops per layer, and their dispatch
    costs the same whatever the width; compiled, the elementwise ops are fused. Use with the
    static cache (fixed shapes: one graph for the prompt, one for every decoded token)."""
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


def non_embedding_params(model) -> int:
    """Parameters outside the input embedding and an untied LM head: the part a width or depth
    pruning step shrinks in proportion (a tied embedding is counted once, as embedding)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    skip = emb.numel()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        skip += out.weight.numel()
    return total - skip


def median_speedup(reference: list[float], other: list[float]) -> float:
    """Median over rounds of reference time / other time (> 1: `other` is faster)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("speedup needs the same non-zero number of rounds for both models")
    return statistics.median(r / o for r, o in zip(reference, other, strict=True))


# The distill stage's speed check times prompts of a task's length, not a real model's whole
# context (8,192 tokens for SmolLM2: minutes per forward on a laptop), and bounds the tokens of
# one timed batch (SPEED_TOKENS) so a real model's check costs seconds.
SPEED_SEQ = 256
SPEED_TOKENS = 512


def student_speed(student_hf: str | Path, teacher_hf: str | Path, batch: int = 8,
                  seq: int | None = None, repeats: int = 7) -> dict[str, float]:
    """Prefill tokens/s of student and teacher (fastest round) and the student's median
    speedup; `seq` defaults to the teacher's `max_position_embeddings` up to SPEED_SEQ, and
    the batch is cut to at most SPEED_TOKENS tokens (at least one row)."""
    teacher, student = load_hf_causal_lm(teacher_hf), load_hf_causal_lm(student_hf)
    seq = seq or min(teacher.config.max_position_embeddings, SPEED_SEQ)
    batch = max(1, min(batch, SPEED_TOKENS // seq))
    tokens = random_prompts(teacher.config.vocab_size, batch, seq)
    times = time_rounds({"teacher": teacher, "student": student}, tokens, repeats)
    n = batch * seq
    return {
        "cpu_tokens_per_s": n / min(times["student"]),
        "teacher_cpu_tokens_per_s": n / min(times["teacher"]),
        "cpu_speedup": median_speedup(times["teacher"], times["student"]),
        "speed_batch": batch, "speed_seq": seq, "speed_threads": torch.get_num_threads(),
    }
