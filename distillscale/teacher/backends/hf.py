"""HF transformers backend: batched greedy / sampled generation and a forward pass for top-k."""

from __future__ import annotations

import copy

import numpy as np
import torch

from distillscale.models.shared_prefix import common_prefix_length
from distillscale.teacher.backends.base import Completion, TopK, cut_at_stop


class HFBackend:
    def __init__(self, model_path: str, batch_size: int = 64, device: str | None = None,
                 dtype: str | None = None, **_ignored):
        # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.vocab_size = self.model.config.vocab_size
        self.share_prefix = prefix_cache_applies(self.model)

    def _ids(self, prompt: str) -> list[int]:
        # The chat template already wrote every special token (bos included).
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    # A shared prompt prefix shorter than this is not worth a cache of its own.
    MIN_SHARED_PREFIX = 16

    @torch.no_grad()
    def _prefix_cache(self, prefix: list[int]):
        """The KV cache of `prefix` (batch 1): computed once per `complete` call and copied
        into every batch's generation."""
        ids = torch.tensor([prefix], device=self.device)
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

    @torch.no_grad()
    def complete(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:
        """Greedy (temperature 0) or sampled completions, `batch_size` prompts per `generate`.

        Prompts rendered from one chat template share a long prefix (system prompt, task, class
        list: about 180 of SmolLM2's ~224 prompt tokens). Its KV cache is computed once per call
        and each batch generates from a copy of it, with every row's own tokens after it and the
        left padding between the two: positions come from the attention mask's running count
        (transformers' generate), so each row sees the positions it has unpadded. vLLM does the
        same by itself (prefix caching); transformers' generate takes the cache but does not find
        the shared prefix, which is what this adds."""
        out: list[Completion] = []
        tok = self.tokenizer
        specials = {tok.pad_token_id, tok.eos_token_id}
        encoded = [self._ids(p) for p in prompts]
        shared = common_prefix_length(encoded)
        prefix = encoded[0][:shared] if (self.share_prefix
                                         and shared >= self.MIN_SHARED_PREFIX) else []
        cache = self._prefix_cache(prefix) if prefix else None
        for i in range(0, len(encoded), self.batch_size):
            enc = [e[len(prefix):] for e in encoded[i : i + self.batch_size]]
            width = max(len(e) for e in enc)
            # Left padding of the rows' own tokens: every row's next token is generated at the
            # same column.
            pad = [[tok.pad_token_id] * (width - len(e)) for e in enc]
            ids = torch.tensor([prefix + p + e for p, e in zip(pad, enc)])
            mask = torch.tensor([[1] * len(prefix) + [0] * len(p) + [1] * len(e)
                                 for p, e in zip(pad, enc)])
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_tokens,
                      "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(enc))
                kwargs["past_key_values"] = past
            if temperature > 0:
                torch.manual_seed(seed + i)
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            gen = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device), **kwargs)
            for row in gen[:, ids.shape[1]:].tolist():
                n = len(row)
                ended = tok.eos_token_id in row
                if ended:
                    n = row.index(tok.eos_token_id)
                body = [t for t in row[:n] if t not in specials]
                text = tok.decode(body, skip_special_tokens=False)
                text, hit = cut_at_stop(text, stop or [])
                n_tokens = len(self._ids(text)) if hit else len(body)
                finish = "stop" if (ended or hit or n < max_tokens) else "length"
                out.append(Completion(text=text, n_tokens=n_tokens, finish=finish))
        return out

    @torch.no_grad()
    def topk_logprobs(self, sequences: list[list[int]], k: int, tail_samples: int = 0,
                      seed: int = 0) -> list[TopK]:
        out: list[TopK] = []
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i : i + self.batch_size]
            width = max(len(s) for s in chunk)
            # Right padding: positions of a sequence keep their index.
            ids = torch.tensor([s + [self.tokenizer.pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits.float()
            lp = torch.log_softmax(logits, -1)
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            if tail_samples:
                # Draw from the teacher's distribution with its top-k removed.
                tail_p = lp.exp().scatter(-1, top.indices, 0.0).cpu()
                flat = tail_p.flatten(0, 1).clamp_min(0) + 1e-30
                drawn = torch.multinomial(flat, tail_samples, replacement=True, generator=gen)
                drawn = drawn.view(*tail_p.shape[:2], tail_samples)
                drawn_lp = lp.cpu().gather(-1, drawn)
            for j, s in enumerate(chunk):
                n = len(s) - 1
                extra = {}
                if tail_samples:
                    extra = {"tail_ids": drawn[j, :n].numpy().astype(np.int64),
                             "tail_logprobs": drawn_lp[j, :n].numpy().astype(np.float32)}
                out.append(TopK(ids=top.indices[j, :n].cpu().numpy().astype(np.int64),
                                logprobs=top.values[j, :n].cpu().numpy().astype(np.float32),
                                **extra))
        return out


def prefix_cache_applies(model) -> bool:
    """Whether `complete` may generate from a shared-prefix cache on `model`: not where the
    padding it puts between the prefix and a row's own tokens would change what the row sees
    (a sliding window or chunked attention counts columns, not positions), nor where the model's
    generation config names a cache of its own (transformers refuses a cache passed with it)."""
    cfg = model.config
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    windowed = (getattr(text, "sliding_window", None) is not None
                and getattr(text, "use_sliding_window", True) is not False)
    chunked = getattr(text, "attention_chunk_size", None) is not None
    layered = "sliding_attention" in (getattr(text, "layer_types", None) or [])
    own_cache = getattr(model.generation_config, "cache_implementation", None) is not None
    return not (windowed or chunked or layered or own_cache)

