"""`models/shared_prefix.py`: a batch with a shared prompt prefix run as one packed sequence
gives every real (row, position) the batched forward's logits, and every weight the batched
loss's gradient (tied and untied heads, rows of different lengths)."""

from __future__ import annotations

import pytest
import torch
from test_logits_at import ARCHS as _ARCHS
from test_logits_at import VOCAB

from distillscale.models.shared_prefix import pack_batch, shared_prefix

# test_logits_at's two models (tied and untied heads), with room for 41-token rows.
ARCHS = {k: a.model_copy(update={"seq_length": 64}) for k, a in _ARCHS.items()}


def _batch(prefix: int = 20, lengths=(30, 26, 41, 21)):
    g = torch.Generator().manual_seed(1)
    s = max(lengths)
    tokens = torch.randint(1, VOCAB, (len(lengths), s), generator=g)
    tokens[:, :prefix] = tokens[0, :prefix]
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0  # right padding
    tokens[1, prefix] = (tokens[0, prefix] + 1) % VOCAB  # the rows part at `prefix`
    return tokens, torch.tensor(lengths)


def test_shared_prefix_and_layout():
    tokens, lengths = _batch()
    assert shared_prefix(tokens, lengths) == 20
    assert pack_batch(tokens, lengths, min_prefix=21) is None
    pack = pack_batch(tokens, lengths)
    assert pack.prefix == 20 and pack.tokens.shape == (1, 20 + 10 + 6 + 21 + 1)
    for i, n in enumerate(lengths.tolist()):
        idx = pack.index[i, :n]
        assert torch.equal(pack.tokens[0, idx], tokens[i, :n])
        assert torch.equal(pack.positions[idx], torch.arange(n))
        # A row's token sees the prefix and its own earlier tokens, nothing else.
        seen = ~pack.mask[0, 0, idx[-1]]
        assert int(seen.sum()) == n and bool(seen[idx].all())
    # Identical rows keep one token each of their own.
    same = torch.ones(3, 10, dtype=torch.long)
    assert shared_prefix(same, torch.tensor([10, 10, 10])) == 9


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_packed_forward_equals_the_batch(megatron, name):
    from distillscale.models.megatron_gpt import build_gpt, forward_logits
    from distillscale.models.shared_prefix import layout_supported, packed_forward, unpack

    torch.manual_seed(0)
    model = build_gpt(ARCHS[name], VOCAB).eval()
    assert layout_supported(model)
    tokens, lengths = _batch()
    pack = pack_batch(tokens, lengths)
    real = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    w = torch.rand(*tokens.shape, generator=torch.Generator().manual_seed(2)) * real

    def batched():
        return forward_logits(model, tokens)

    def packed():
        return unpack(packed_forward(model, pack)[0], pack)

    ref, got = batched(), packed()
    assert got.shape == ref.shape
    assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=1e-5), \
        (got[real] - ref[real]).abs().max()
    # The positions matter: the packed rows without their positions differ.
    assert not torch.allclose(got[2, 30], forward_logits(model, tokens[2:3, 20:31])[0, -1],
                              atol=1e-3)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn().float().log_softmax(-1)[..., :40].sum(-1) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_ref, g_new = grads(batched), grads(packed)
    assert g_ref.keys() == g_new.keys() and len(g_ref) > 4
    for n in g_ref:
        assert torch.allclose(g_new[n], g_ref[n], atol=1e-5, rtol=1e-4), n
    # RoPE is back to the model's own table afterwards.
    assert "forward" not in vars(model.rotary_pos_emb)
    assert torch.allclose(forward_logits(model, tokens), ref, atol=1e-6)


@pytest.mark.parametrize("max_tokens", [1024, 45])
def test_logits_at_with_a_shared_prefix_equals_the_batch(megatron, monkeypatch, max_tokens):
    """`logits_at` packs rows sharing a prefix, in groups of at most MAX_PACKED_TOKENS tokens
    (45: four rows, then the last alone, run unpacked), and gives the batched forward's logits and gradients."""
    import distillscale.models.shared_prefix as sp
    from distillscale.models.megatron_gpt import build_gpt, forward_logits, logits_at

    monkeypatch.setattr(sp, "MAX_PACKED_TOKENS", max_tokens)
    calls = []
    real = sp.packed_forward
    monkeypatch.setattr(sp, "packed_forward", lambda m, p, **k: calls.append(p) or real(m, p, **k))
    torch.manual_seed(0)
    model = build_gpt(ARCHS["tied"], VOCAB).eval()
    tokens, lengths = _batch(lengths=(30, 26, 41, 21, 33))
    positions = lengths - 1 - torch.tensor([0, 3, 10, 0, 2])
    rows = torch.arange(5)
    want = forward_logits(model, tokens)[rows, positions]
    got = logits_at(model, tokens, positions)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert [c.prefix for c in calls] == ([20] if max_tokens == 1024 else [20, 0])
    if max_tokens != 1024:  # the lone row ran as it is
        assert calls[1].tokens.shape == (1, int(positions[4]) + 1)
    model.zero_grad(set_to_none=True)
    logits_at(model, tokens, positions).log_softmax(-1)[:, :30].sum().backward()
    new = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    forward_logits(model, tokens)[rows, positions].log_softmax(-1)[:, :30].sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(new[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_layout_is_refused_for_other_position_embeddings(megatron):
    from distillscale.models.megatron_gpt import build_gpt
    from distillscale.models.shared_prefix import layout_supported

    model = build_gpt(ARCHS["tied"], VOCAB)
    assert layout_supported(model)
    model.position_embedding_type = "yarn"  # its RoPE returns (table, mscale): not packed
    assert not layout_supported(model)


def test_groups_are_refused_when_they_cost_more_than_the_batch():
    """A short shared prefix before long rows: packed groups of rows (capped) would attend more
    pairs than the batch, so the batch runs as it is; the same rows with cheap attention pack."""
    from distillscale.models.shared_prefix import pack_groups

    tokens, lengths = _batch(prefix=16, lengths=(60, 60, 60, 60, 60, 60, 60, 60))
    assert pack_groups(tokens, lengths, max_tokens=400, pair=1 / 3456) is not None
    assert pack_groups(tokens, lengths, max_tokens=400, pair=1 / 20) is None
