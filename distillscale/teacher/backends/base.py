"""What every generation backend returns: completions and top-k log-probabilities."""

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
