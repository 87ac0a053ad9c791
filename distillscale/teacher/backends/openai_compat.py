"""OpenAI-compatible endpoint backend (NIM, `vllm serve`): completions on a rendered prompt.

The prompt is rendered locally with the teacher's own chat template (the tokenizer at
`model_path`), so depth control is identical to the offline backends; requests go to the
`/v1/completions` route with a timeout. Top-k logits are not offered by that route: the logit
cache needs the `hf` or `vllm` backend.
"""

from __future__ import annotations

from distillscale.teacher.backends.base import Completion, TopK


class OpenAIBackend:
    def __init__(self, model_path: str, base_url: str | None = None, model_name: str | None = None,
                 api_key: str = "EMPTY", timeout_s: float = 60.0, **_ignored):
        # optional: the openai client (and the teacher's tokenizer), only for this backend
        from openai import OpenAI
        from transformers import AutoTokenizer

        if not base_url:
            raise ValueError("teacher.supervision.backend=openai needs teacher.supervision.base_url")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.model_name = model_name or model_path
        self.vocab_size = len(self.tokenizer)

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:
        resp = self.client.completions.create(
            model=self.model_name, prompt=prompts, max_tokens=max_tokens, stop=stop or None,
            temperature=temperature, seed=seed,
        )
        return completions_from_response(resp, len(prompts))

    def topk_logprobs(self, sequences: list[list[int]], k: int, tail_samples: int = 0,
                      seed: int = 0) -> list[TopK]:
        raise NotImplementedError("the openai backend has no top-k logits; set "
                                  "teacher.supervision.cache.formats=[] or use hf / vllm")


def completions_from_response(resp, n: int) -> list[Completion]:
    """A `/v1/completions` response (choices carry `index`) -> Completions in prompt order."""
    out: list[Completion | None] = [None] * n
    for ch in resp.choices:
        out[ch.index] = Completion(text=ch.text, n_tokens=-1,
                                   finish="length" if ch.finish_reason == "length" else "stop")
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        raise ValueError(f"endpoint returned no choice for prompts {missing[:5]}")
    return out  # type: ignore[return-value]
