"""`megatron_gpt.logits_at`: the head on the scored positions only, equal to the full logits
indexed there (tied and untied heads, values and gradients)."""

from __future__ import annotations

import pytest
import torch

from distillscale.config import ModelArch

VOCAB = 300
ARCHS = {
    "untied": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, seq_length=32),
    "tied": ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                      num_query_groups=1, seq_length=32, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_logits_at_equals_the_full_logits_at_those_positions(megatron, name):
    from distillscale.models.megatron_gpt import build_gpt, forward_logits, logits_at

    torch.manual_seed(0)
    model = build_gpt(ARCHS[name], VOCAB).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (5, 32), generator=g)
    positions = torch.tensor([31, 0, 7, 19, 31])
    full = forward_logits(model, tokens)
    want = full[torch.arange(5), positions]
    got = logits_at(model, tokens, positions)
    assert got.shape == (5, VOCAB)
    # The same products on fewer rows: equal up to BLAS blocking.
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # Rows really differ by position: a wrong [s, b] indexing would pick other rows' states.
    assert not torch.allclose(got[0], full[0, 30], atol=1e-3)

    # Gradients to every weight agree too (the head weight included, tied or not).
    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn().float().log_softmax(-1)[:, :50].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(lambda: forward_logits(model, tokens)[torch.arange(5), positions])
    new = grads(lambda: logits_at(model, tokens, positions))
    assert ref.keys() == new.keys() and len(ref) > 4
    for n in ref:
        assert torch.allclose(new[n], ref[n], atol=1e-5, rtol=1e-4), n
