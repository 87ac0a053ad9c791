"""vLLM backend (GPU): the offline engine `vllm.LLM`, tensor parallel for large teachers.

vLLM is a GPU build (it is not installed on CPU machines): it is imported when the backend is
built, never at module import. The mapping between our calls and vLLM's request / response
objects lives in plain functions (`sampling_kwargs`, `completion_from_output`,
`topk_from_prompt_logprobs`) that are unit-tested on CPU against recorded vLLM outputs.

vLLM specifics: `LLM(max_logprobs=...)` must be at least k (its default is 20); prompt
log-probabilities are `RequestOutput.prompt_logprobs`, one entry per prompt token (None for the
first), each a dict token id -> Logprob(logprob, rank, decoded_token) holding the top-k plus the
actual token, which may rank below k.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distillscale.teacher.backends.base import Completion, TopK


def sampling_kwargs(max_tokens: int, stop: list[str] | None, temperature: float,
                    seed: int) -> dict[str, Any]:
    """Arguments of `vllm.SamplingParams` for one completion call."""
    kw: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                          "skip_special_tokens": False}
    if stop:
        kw["stop"] = list(stop)
    if temperature > 0:
        kw["seed"] = seed
    return kw


def completion_from_output(request_output) -> Completion:
    """A `vllm.RequestOutput` -> Completion (first sample)."""
    c = request_output.outputs[0]
    finish = "length" if c.finish_reason == "length" else "stop"
    return Completion(text=c.text, n_tokens=len(c.token_ids), finish=finish)


def topk_from_prompt_logprobs(prompt_logprobs: list, k: int) -> TopK:
    """`RequestOutput.prompt_logprobs` -> TopK over positions 0..n-2 (the distribution of the
    next token), keeping the k best-ranked entries of each position."""
    entries = prompt_logprobs[1:]
    ids = np.zeros((len(entries), k), dtype=np.int64)
    lps = np.full((len(entries), k), -np.inf, dtype=np.float32)
    for t, entry in enumerate(entries):
        if entry is None:
            raise ValueError(f"prompt_logprobs[{t + 1}] is missing")
        best = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
        if len(best) < k:
            raise ValueError(f"prompt_logprobs[{t + 1}] has {len(best)} entries < k={k} "
                             "(raise LLM(max_logprobs=...))")
        ids[t] = [tid for tid, _ in best]
        lps[t] = [lp.logprob for _, lp in best]
    return TopK(ids=ids, logprobs=lps)


class VLLMBackend:
    def __init__(self, model_path: str, tensor_parallel: int = 1, max_logprobs: int = 64,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0, **_ignored):
        try:
            # optional: vLLM is a GPU-only install (the `gpu` extra), loaded when the engine is built
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - CPU machines
            raise RuntimeError(f"teacher.supervision.backend=vllm needs vLLM (GPU extra): {e}") from None
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel,
                       max_logprobs=max_logprobs, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = len(self.tokenizer)

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:  # pragma: no cover
        # optional: vLLM is a GPU-only install (the `gpu` extra), loaded when the engine is built
        from vllm import SamplingParams

        params = SamplingParams(**sampling_kwargs(max_tokens, stop, temperature, seed))
        # Prompts are fully rendered by the chat template: pass token ids so vLLM adds no bos.
        reqs = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                for p in prompts]
        return [completion_from_output(o) for o in self.llm.generate(reqs, params)]

    def topk_logprobs(self, sequences: list[list[int]], k: int, tail_samples: int = 0,
                      seed: int = 0) -> list[TopK]:  # pragma: no cover
        # optional: vLLM is a GPU-only install (the `gpu` extra), loaded when the engine is built
        from vllm import SamplingParams

        if tail_samples:
            raise ValueError("vLLM returns top-k prompt log-probabilities only: set "
                             "teacher.supervision.cache.tail_samples=0 (or raise k)")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params)
        return [topk_from_prompt_logprobs(o.prompt_logprobs, k) for o in outs]
