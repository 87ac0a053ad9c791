"""Generation backends for the teacher stage: the same two calls on every engine.

    complete(prompts, max_tokens, stop, temperature, seed) -> [Completion]
    topk_logprobs(sequences, k, tail_samples=0, seed=0) -> [TopK]
                                            (position t: the distribution of token t+1)

`hf` (transformers, CPU / GPU), `vllm` (GPU, offline engine) and `openai` (an OpenAI-compatible
server: NIM, `vllm serve`; completions only, no top-k cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish: str  # "stop" (eos or a stop string) | "length" (max_tokens reached)


@dataclass
class TopK:
    """Top-k next-token log-probabilities at every position of one sequence but the last."""

    ids: np.ndarray  # [n, k] int64, by decreasing probability
    logprobs: np.ndarray  # [n, k] float32 (normalised over the full vocabulary)
    # Optional: m tokens drawn (with replacement) from the teacher's distribution outside the
    # top-k, and their log-probabilities: [n, m] each (see logit_cache: sampled tail).
    tail_ids: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded), and whether one was found."""
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text, False
    at = min(hits)[0]
    return text[:at], True


def make_backend(kind: str, model_path: str, **options):
    if kind == "hf":
        from distillscale.teacher.backends.hf import HFBackend

        return HFBackend(model_path, **options)
    if kind == "vllm":
        from distillscale.teacher.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, **options)
    if kind == "openai":
        from distillscale.teacher.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(model_path, **options)
    raise ValueError(f"unknown teacher backend {kind!r} (hf, vllm, openai)")
