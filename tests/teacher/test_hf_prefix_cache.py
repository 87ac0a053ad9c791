"""The HF backend's shared-prefix KV cache: the same completions as generating every prompt in
full (greedy and sampled), on a tiny random Llama and Qwen3 with a chat template."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distillscale.models.shared_prefix import common_prefix_length as shared_prefix_length
from distillscale.teacher.backends.hf import HFBackend
from tests.fixtures.tiny_hf import (
    build_checkpoint,
    build_tokenizer,
    domain_texts,
    randomize_weights,
)

ROOT = Path(__file__).resolve().parents[2]


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    # Every row keeps at least one token of its own.
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [1, 2]]) == 0
    assert shared_prefix_length([]) == 0


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def backend(request, tmp_path_factory):
    tok = build_tokenizer(domain_texts(ROOT / "conf/domains/finance.yaml"), vocab_size=600)
    folder = build_checkpoint(request.param, tmp_path_factory.mktemp(request.param), tok)
    b = HFBackend(str(folder), batch_size=3)
    randomize_weights(b.model, seed=1, scale=0.3)
    return b


def _prompts(backend):
    system = ("Classify the headline into one event class. Classes: earnings beat, earnings "
              "miss, dividend increase, merger announcement. Answer with the class name only.")
    heads = ["acme beats estimates", "acme cuts its dividend sharply after a weak quarter",
             "acme to merge", "acme misses", "acme raises the payout to shareholders again"]
    return [backend.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": h}],
        tokenize=False, add_generation_prompt=True) for h in heads]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prefix_cache_gives_the_full_prompts_completions(backend, temperature, monkeypatch):
    prompts = _prompts(backend)
    ids = [backend._ids(p) for p in prompts]
    assert shared_prefix_length(ids) >= HFBackend.MIN_SHARED_PREFIX  # the cache is used
    calls = []
    real = backend._prefix_cache
    monkeypatch.setattr(backend, "_prefix_cache", lambda p: calls.append(len(p)) or real(p))
    cached = backend.complete(prompts, 12, None, temperature, seed=3)
    assert calls == [shared_prefix_length(ids)]  # once per call, not per batch (batch 3 of 5)
    monkeypatch.setattr(HFBackend, "MIN_SHARED_PREFIX", 10**9)  # no cache: full prompts
    full = backend.complete(prompts, 12, None, temperature, seed=3)
    assert len(calls) == 1
    assert [c.text for c in cached] == [c.text for c in full]
    assert [(c.n_tokens, c.finish) for c in cached] == [(c.n_tokens, c.finish) for c in full]
    assert sum(c.n_tokens for c in full) > 0


def test_prefix_cache_logits_equal_the_full_forward(backend):
    """The first generated token's logits with the cache equal a full forward's at the last
    prompt position, for rows of different lengths (padding between prefix and row)."""
    prompts = _prompts(backend)[:3]
    ids = [backend._ids(p) for p in prompts]
    n = shared_prefix_length(ids)
    out = backend.model.generate(**_batch(backend, ids, n), max_new_tokens=1, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=backend.tokenizer.pad_token_id)
    with torch.no_grad():
        for j, row in enumerate(ids):
            ref = backend.model(input_ids=torch.tensor([row])).logits[0, -1]
            assert torch.allclose(out.logits[0][j], ref, atol=1e-4), j


def _batch(backend, ids, n):
    import copy

    cache = backend._prefix_cache(ids[0][:n])
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(len(ids))
    own = [r[n:] for r in ids]
    w = max(len(r) for r in own)
    pad = backend.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([ids[0][:n] + [pad] * (w - len(r)) + r for r in own]),
            "attention_mask": torch.tensor([[1] * n + [0] * (w - len(r)) + [1] * len(r)
                                            for r in own]),
            "past_key_values": past}


def test_prefix_cache_is_left_off_where_padding_or_a_cache_of_its_own_would_change_it():
    """A sliding window or chunked attention counts columns (the padding between prefix and row
    would shift what a row sees); a generation config naming its own cache is refused with a
    passed cache by transformers. Full attention (Llama, Qwen2/3 defaults) keeps it."""
    import transformers

    from distillscale.teacher.backends.hf import prefix_cache_applies

    def model(cfg, cache=None):
        return SimpleNamespace(config=cfg,
                               generation_config=SimpleNamespace(cache_implementation=cache))

    assert prefix_cache_applies(model(transformers.LlamaConfig()))
    assert prefix_cache_applies(model(transformers.Qwen3Config()))
    assert prefix_cache_applies(model(transformers.MistralConfig(sliding_window=None)))
    assert not prefix_cache_applies(model(transformers.MistralConfig(sliding_window=64)))
    assert not prefix_cache_applies(model(transformers.Qwen2Config(
        use_sliding_window=True, sliding_window=64, max_window_layers=0)))
    assert not prefix_cache_applies(model(transformers.LlamaConfig(), cache="hybrid"))


def test_backend_without_the_prefix_cache_generates_full_prompts(backend, monkeypatch):
    monkeypatch.setattr(backend, "share_prefix", False)
    monkeypatch.setattr(backend, "_prefix_cache", lambda p: pytest.fail("cache used"))
    assert len(backend.complete(_prompts(backend), 3)) == 5
