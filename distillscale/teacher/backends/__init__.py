"""Generation backends for the teacher stage: the same two calls on every engine.

    complete(prompts, max_tokens, stop, temperature, seed) -> [Completion]
    topk_logprobs(sequences, k, tail_samples=0, seed=0) -> [TopK]
                                            (position t: the distribution of token t+1)

`hf` (transformers, CPU / GPU), `vllm` (GPU, offline engine) and `openai` (an OpenAI-compatible
server: NIM, `vllm serve`; completions only, no top-k cache).
"""

from __future__ import annotations

from distillscale.teacher.backends.base import Completion, TopK, cut_at_stop
from distillscale.teacher.backends.hf import HFBackend
from distillscale.teacher.backends.openai_compat import OpenAIBackend
from distillscale.teacher.backends.vllm import VLLMBackend

__all__ = ["Completion", "HFBackend", "OpenAIBackend", "TopK", "VLLMBackend", "cut_at_stop",
           "make_backend"]


def make_backend(kind: str, model_path: str, **options):
    if kind == "hf":
        return HFBackend(model_path, **options)
    if kind == "vllm":
        return VLLMBackend(model_path, **options)
    if kind == "openai":
        return OpenAIBackend(model_path, **options)
    raise ValueError(f"unknown teacher backend {kind!r} (hf, vllm, openai)")
