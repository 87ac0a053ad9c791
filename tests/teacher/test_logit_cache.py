import numpy as np
import pytest
import torch

from distillscale.teacher.backends import TopK
from distillscale.teacher.logit_cache import (
    CachedRow,
    LogitCache,
    build_cache,
    cache_key,
    id_bits,
    kl_full,
    kl_topk,
    pack_ids,
    tail_logprob,
    unpack_ids,
)


@pytest.mark.parametrize("vocab", [2, 1000, 151_936])
def test_pack_roundtrip(vocab):
    ids = np.random.default_rng(0).integers(0, vocab, (37, 5))
    bits = id_bits(vocab)
    buf = pack_ids(ids, bits)
    assert buf.nbytes == -(-ids.size * bits // 8)
    assert (unpack_ids(buf, bits, ids.size).reshape(ids.shape) == ids).all()
    with pytest.raises(ValueError):
        pack_ids(np.array([1 << bits]), bits)


def _topk(logp: torch.Tensor, k: int):
    top = logp.topk(k, -1)
    tail = torch.from_numpy(tail_logprob(top.values.numpy()))
    return top.indices, top.values, tail


def test_topk_kl_is_exact_when_tails_are_proportional():
    """Known distributions: student = teacher reweighted on the top-k only, so both tails are
    the same shape and the merged-tail KL must equal the full KL."""
    g = torch.Generator().manual_seed(0)
    t_logp = torch.log_softmax(torch.randn(4, 50, generator=g) * 3, -1)
    ids, lps, tail = _topk(t_logp, 8)
    s_logits = t_logp.clone()
    s_logits.scatter_add_(-1, ids, torch.randn(4, 8, generator=g))
    s_logp = torch.log_softmax(s_logits, -1)
    torch.testing.assert_close(kl_topk(ids, lps, tail, s_logp), kl_full(t_logp, s_logp))


def test_topk_kl_is_a_lower_bound_that_tightens_with_k():
    g = torch.Generator().manual_seed(1)
    t_logp = torch.log_softmax(torch.randn(64, 200, generator=g) * 2, -1)
    s_logp = torch.log_softmax(torch.randn(64, 200, generator=g) * 2, -1)
    full = kl_full(t_logp, s_logp)
    errors = []
    for k in (4, 32, 128, 200):
        approx = kl_topk(*_topk(t_logp, k), s_logp)
        assert (approx <= full + 1e-5).all()
        errors.append(float((full - approx).sum() / full.sum()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


class _Backend:
    vocab_size = 300

    def __init__(self):
        self.calls = 0

    def topk_logprobs(self, sequences, k):
        self.calls += 1
        out = []
        for s in sequences:
            logits = torch.tensor([[float((t * 7 + j) % 13) for j in range(300)] for t in s[:-1]])
            top = torch.log_softmax(logits, -1).topk(k, -1)
            out.append(TopK(top.indices.numpy(), top.values.numpy()))
        return out


def test_cache_roundtrip_sharded_and_reused(tmp_path):
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    spans = [(1, 3), (1, 1), (0, 3)]
    key = cache_key(teacher="t", tokenizer="tok", chat_template="c", prompt_template="p",
                    data=seqs, k=4)
    backend = _Backend()
    cache = build_cache(backend, seqs, spans, ["a", "b", "c"], 4, LogitCache(tmp_path, key),
                        shard_size=2)
    assert cache.complete and len(list(cache.path.glob("shard-*"))) == 2
    rows = cache.load()
    assert set(rows) == {"a", "b", "c"}
    full = backend.topk_logprobs(seqs, 4)
    for rid, seq_top, (start, n) in zip("abc", full, spans):
        r = rows[rid]
        assert r.start == start and r.ids.shape == (n, 4)
        assert (r.ids == seq_top.ids[start : start + n]).all()
        np.testing.assert_allclose(r.logprobs, seq_top.logprobs[start : start + n], atol=2e-3)
        mass = np.exp(r.logprobs.astype(np.float64)).sum(-1) + np.exp(r.tail_logprob)
        np.testing.assert_allclose(mass, 1.0, atol=5e-3)
    calls = backend.calls
    build_cache(backend, seqs, spans, ["a", "b", "c"], 4, LogitCache(tmp_path, key))
    assert backend.calls == calls  # complete: nothing recomputed
    assert cache.index()["bytes_per_token"] > 0


def test_cache_key_changes_with_any_input():
    base = {"teacher": "t", "tokenizer": "tok", "chat_template": "c", "prompt_template": "p",
            "data": "d", "k": 64}
    key = cache_key(**base)
    assert cache_key(**dict(base)) == key
    for field in base:
        assert cache_key(**{**base, field: "other"}) != key, field


def test_killed_build_resumes_at_the_next_shard(tmp_path):
    seqs = [[1, 2, 3]] * 5
    spans = [(0, 2)] * 5
    cache = LogitCache(tmp_path, "k")
    backend = _Backend()
    # A run that died after its first shard: only that shard exists, no index.
    top = backend.topk_logprobs(seqs[:2], 4)
    cache.write_shard(0, [CachedRow(str(i), 0, t.ids[:2], t.logprobs[:2],
                                    tail_logprob(t.logprobs[:2])) for i, t in enumerate(top)], 300)
    assert not cache.complete
    backend.calls = 0
    build_cache(backend, seqs, spans, [str(i) for i in range(5)], 4, cache, shard_size=2)
    assert backend.calls == 2 and len(cache.load()) == 5


def test_sampled_tail_is_unbiased_where_the_bucket_is_not():
    """Heavy tails: the merged bucket under-estimates the KL; draws from the teacher's tail
    estimate it without bias (the mean over many tokens converges to the full KL)."""
    g = torch.Generator().manual_seed(2)
    t_logp = torch.log_softmax(torch.randn(4000, 300, generator=g), -1)
    s_logp = torch.log_softmax(torch.randn(4000, 300, generator=g), -1)
    full = float(kl_full(t_logp, s_logp).sum())
    ids, lps, tail = _topk(t_logp, 16)
    bucket = float(kl_topk(ids, lps, tail, s_logp).sum())
    tail_p = t_logp.exp().scatter(-1, ids, 0.0)
    draws = torch.multinomial(tail_p, 16, replacement=True, generator=g)
    sampled = float(kl_topk(ids, lps, tail, s_logp, draws, t_logp.gather(-1, draws)).sum())
    assert (full - bucket) / full > 0.3
    assert abs(sampled - full) / full < 0.02


def test_cache_keeps_tail_draws(tmp_path):
    seqs, spans = [[1, 2, 3, 4]], [(0, 3)]

    class WithTail(_Backend):
        def topk_logprobs(self, sequences, k, tail_samples=0, seed=0):
            out = super().topk_logprobs(sequences, k)
            for t in out:
                t.tail_ids = np.full((t.ids.shape[0], tail_samples), 299)
                t.tail_logprobs = np.full((t.ids.shape[0], tail_samples), -9.5, np.float32)
            return out

    cache = build_cache(WithTail(), seqs, spans, ["a"], 4, LogitCache(tmp_path, "x"),
                        tail_samples=3)
    r = cache.load()["a"]
    assert r.tail_ids.shape == (3, 3) and (r.tail_ids == 299).all()
    np.testing.assert_allclose(r.tail_sample_logprobs, -9.5)
    assert cache.index()["tail_samples"] == 3
