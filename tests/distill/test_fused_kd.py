"""Golden tests: the fused LM head + divergence (distillscale/distill/fused_kd.py) against a
brute-force reference (float64 full logits, explicit probabilities, a loop over positions):
values and gradients for every divergence, temperatures, blended-CoT masks, tied and untied
heads, the CE anchor, and the benchmark's last line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillscale.distill import losses as L
from distillscale.distill.fused_kd import (
    fused_blended_cot_loss,
    fused_head_divergence,
    per_sequence_weights,
)

B, S, V, HS, HT = 3, 7, 13, 6, 9


def _ref_div(zs, zt, kind, t):
    """One position: the divergence between softmax(z / t), float64, from probabilities."""
    ps, pt = torch.softmax(zs.double() / t, -1), torch.softmax(zt.double() / t, -1)
    if kind == "forward_kl":
        return (pt * (pt.log() - ps.log())).sum()
    if kind == "reverse_kl":
        return (ps * (ps.log() - pt.log())).sum()
    m = 0.5 * (ps + pt)
    return 0.5 * (pt * (pt.log() - m.log())).sum() + 0.5 * (ps * (ps.log() - m.log())).sum()


def _ref_loss(hs, ws, ht, wt, targets, kl_mask, answer_mask, alpha, t, kind):
    """alpha T^2 per-sequence mean D + (1 - alpha) per-sequence mean answer CE, float64."""
    zs, zt = hs.double() @ ws.double().T, ht.double() @ wt.double().T
    kl_seq, ce_seq = [], []
    for b in range(B):
        kl = [_ref_div(zs[b, s], zt[b, s], kind, t) * kl_mask[b, s]
              for s in range(S) if kl_mask[b, s] > 0]
        if kl:
            kl_seq.append(sum(kl) / kl_mask[b].sum())
        ce = [-torch.log_softmax(zs[b, s], -1)[targets[b, s]] for s in range(S)
              if answer_mask[b, s] > 0]
        if ce:
            ce_seq.append(sum(ce) / len(ce))
    kl = sum(kl_seq) / len(kl_seq) * t * t
    ce = sum(ce_seq) / len(ce_seq)
    return alpha * kl + (1 - alpha) * ce if alpha < 1 else alpha * kl


def _inputs(seed, tied=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    emb = torch.randn(V, HS, generator=g)
    mix = torch.randn(HS, HS, generator=g) * 0.7
    head = emb if tied else torch.randn(V, HS, generator=g)
    ht = torch.randn(B, S, HT, generator=g)
    wt = torch.randn(V, HT, generator=g)
    targets = torch.randint(0, V, (B, S), generator=g)
    return tokens, emb, mix, head, ht, wt, targets


def _grads(fn, tied, seed=0):
    """Loss and gradients (embedding, mixing, head) of a tiny student whose last hidden state
    is tanh(E[tokens] @ A); `tied` uses E as the head."""
    tokens, emb, mix, head, ht, wt, targets = _inputs(seed, tied)
    emb = emb.clone().requires_grad_(True)
    mix = mix.clone().requires_grad_(True)
    head = emb if tied else head.clone().requires_grad_(True)
    hs = torch.tanh(emb[tokens] @ mix)
    loss = fn(hs, head, ht, wt, targets)
    params = (emb, mix) if tied else (emb, mix, head)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_fused_blended_cot_matches_brute_force(kind, t, tied, alpha, kd_masks):
    kl_mask, answer = kd_masks
    ref, ref_g = _grads(lambda hs, w, ht, wt, y: _ref_loss(
        hs, w, ht, wt, y, kl_mask, answer, alpha, t, kind), tied)
    got, got_g = _grads(lambda hs, w, ht, wt, y: fused_blended_cot_loss(
        hs, w, ht, wt, y, kl_mask, answer, alpha=alpha, temperature=t, kind=kind,
        chunk_tokens=4)[0], tied)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for a, b in zip(ref_g, got_g):
        assert torch.allclose(b.double(), a.double(), rtol=1e-4, atol=1e-6 * float(a.abs().max()))


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_fused_equals_the_logits_loss_at_any_chunk(chunk, kd_masks):
    """Same value and gradients as `losses.blended_cot_loss` on the full logits (fp32)."""
    kl_mask, answer = kd_masks
    kw = {"alpha": 0.7, "temperature": 2.0, "kind": "jsd"}
    ref, ref_g = _grads(lambda hs, w, ht, wt, y: L.blended_cot_loss(
        hs @ w.T, ht @ wt.T, y, kl_mask, answer, **kw)[0], False)
    got, got_g = _grads(lambda hs, w, ht, wt, y: fused_blended_cot_loss(
        hs, w, ht, wt, y, kl_mask, answer, chunk_tokens=chunk, **kw)[0], False)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for a, b in zip(ref_g, got_g):
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-7)


def test_per_token_values_and_skipped_tokens(kd_masks):
    """The per-token output is each position's divergence; weight-0 tokens are not computed
    (0 there) and get no gradient."""
    _tokens, _emb, _mix, head, ht, wt, _ = _inputs(1)
    hs = torch.randn(B * S, HS, requires_grad=True)
    w = per_sequence_weights(kd_masks[0]).reshape(-1)
    loss, per = fused_head_divergence(hs, head, ht.reshape(B * S, -1), wt, w, "reverse_kl",
                                      1.5, 2)
    full = L.token_divergence(hs @ head.T, ht.reshape(B * S, -1) @ wt.T, "reverse_kl", 1.5)
    on = w > 0
    assert torch.allclose(per[on], full[on], rtol=1e-6)
    assert (per[~on] == 0).all()
    assert float(loss.detach()) == pytest.approx(float((full.detach() * w).sum()), rel=1e-6)
    loss.backward()
    assert (hs.grad[~on] == 0).all() and (hs.grad[on].abs().sum(-1) > 0).all()


def test_incoming_gradient_scales_and_no_grad_computes_no_gradient():
    _tokens, _emb, _mix, head, ht, wt, _ = _inputs(2)
    hs = torch.randn(B * S, HS, requires_grad=True)
    ws = head.clone().requires_grad_(True)
    w = torch.full((B * S,), 0.1)
    args = (ht.reshape(B * S, -1), wt, w, "forward_kl", 1.0, 3)
    loss, _ = fused_head_divergence(hs, ws, *args)
    g1 = torch.autograd.grad(loss, (hs, ws))
    loss, _ = fused_head_divergence(hs, ws, *args)
    g3 = torch.autograd.grad(3.0 * loss, (hs, ws))
    for a, b in zip(g1, g3):
        assert torch.allclose(3.0 * a, b, rtol=1e-6)
    with torch.no_grad():
        loss, _ = fused_head_divergence(hs, ws, *args)
    assert not loss.requires_grad


def test_bf16_inputs_keep_bf16_gradients_close_to_fp32(kd_masks):
    kl_mask, answer = kd_masks
    tokens, emb, mix, head, ht, wt, targets = _inputs(3)
    hs32 = torch.tanh(emb[tokens] @ mix)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hs = hs32.detach().to(dtype).clone().requires_grad_(True)
        ws = head.detach().to(dtype).clone().requires_grad_(True)
        loss, _ = fused_blended_cot_loss(hs, ws, ht.to(dtype), wt.to(dtype), targets, kl_mask,
                                         answer, alpha=0.5, temperature=2.0, chunk_tokens=4)
        loss.backward()
        assert hs.grad.dtype == ws.grad.dtype == dtype
        out[dtype] = (float(loss.detach()), ws.grad.float())
    assert out[torch.bfloat16][0] == pytest.approx(out[torch.float32][0], rel=5e-2)
    a, b = out[torch.float32][1], out[torch.bfloat16][1]
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_fused_rejects_unaligned_heads_and_unknown_kinds():
    hs, w = torch.zeros(4, HS), torch.ones(4)
    with pytest.raises(ValueError, match="real vocabulary"):
        fused_head_divergence(hs, torch.zeros(V, HS), torch.zeros(4, HT), torch.zeros(V + 3, HT), w)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_head_divergence(hs, torch.zeros(V, HS), torch.zeros(4, HT), torch.zeros(V, HT), w,
                              "tvd")


def test_bench_kd_loss_fused_last_line():
    """tools/bench_kd_loss.py --fused at a small size: the exact last-line format, equal
    values and gradients, the fused peak well below the naive one."""
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_kd_loss.py"
    res = subprocess.run([sys.executable, str(tool), "--fused", "--vocab", "32000", "--tokens",
                          "512", "--hidden", "64", "--teacher-hidden", "96", "--chunk", "16",
                          "--repeat", "1"], capture_output=True, text=True, check=True)
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"naive_peak_mib=(\S+) ours_peak_mib=(\S+) ratio=(\S+) max_rel_diff=(\S+) "
                     r"naive_wall_s=(\S+) ours_wall_s=(\S+) wall_ratio=(\S+)", last)
    assert m, last
    naive, ours, ratio, diff, nw, ow, wr = map(float, m.groups())
    assert ratio == pytest.approx(ours / naive, rel=1e-2)
    assert wr == pytest.approx(ow / nw, rel=1e-2)
    assert ratio < 0.5 and diff <= 1e-5


def _logits_and_fused_runs(arch, small, encoder, rows, tmp_path, kind):
    """The histories of `logit_kd.distill` with `implementation` logits and fused_head from the
    same teacher and student (a sharpened head, so the KL is not flat); each returns a plain
    student."""
    from test_cache_kd import _cfg

    from distillscale.distill.logit_kd import distill
    from distillscale.models.megatron_gpt import build_gpt

    torch.manual_seed(0)
    teacher = build_gpt(arch, 64)
    with torch.no_grad():
        teacher.embedding.word_embeddings.weight.mul_(4) if arch.tie_word_embeddings else \
            teacher.output_layer.weight.mul_(8)
    torch.manual_seed(1)
    state = build_gpt(small, 64).state_dict()
    runs = {}
    for impl in ("logits", "fused_head"):
        student = build_gpt(small, 64)
        student.load_state_dict(state)
        cfg = _cfg(temperature=2.0, alpha=0.7, kind=kind, implementation=impl)
        plain, runs[impl] = distill(student, teacher, encoder, rows, cfg, 0,
                                    tmp_path / f"{impl}.pt", impl)
        assert not any("teacher" in k for k in plain.state_dict())
    for a, b in zip(runs["logits"], runs["fused_head"], strict=True):
        for key in ("kl", "ce", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert runs["fused_head"][-1]["kl"] < runs["fused_head"][0]["kl"]
    return runs


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_head_run_follows_the_logits_run(megatron, tmp_path, tied, kind):
    """`distill.loss.implementation=fused_head` through `logit_kd.distill`: the whole run (KL on
    the trace, CE anchor, T^2, masks, optimizer steps) follows the ModelOpt logits run step by
    step, tied and untied heads, and returns a plain student."""
    from test_cache_kd import ARCH, ROWS, SMALL, Encoder

    arch = ARCH.model_copy(update={"tie_word_embeddings": tied})
    small = SMALL.model_copy(update={"tie_word_embeddings": tied})
    _logits_and_fused_runs(arch, small, Encoder(), ROWS, tmp_path, kind)


@pytest.mark.parametrize("cap", [1024, 63])
def test_fused_head_run_with_a_shared_prefix_follows_the_logits_run(megatron, tmp_path,
                                                                   monkeypatch, cap):
    """Rows sharing a 24-token prompt prefix: `fused_head` runs it once per batch as a packed
    sequence (`models/shared_prefix.py`; with a 63-token cap, once per group of 3 rows, the
    16th row alone) and
    still follows the ModelOpt logits run (which runs the batch as it is) step by step."""
    from test_cache_kd import ARCH, ROWS, SMALL, Encoder

    import distillscale.distill.fused_kd as fk
    import distillscale.models.shared_prefix as sp
    from distillscale.tokenizer import EncodedBatch

    seq, prefix, answer = 40, 24, 36
    own = answer + 1 - prefix  # each row's own tokens up to its answer position

    class PrefixEncoder(Encoder):
        def encode(self, rows, depth=None):
            ids = torch.tensor([int(r["id"].split("-")[1]) for r in rows])
            table = torch.randint(7, 64, (256, seq + 1), generator=torch.Generator().manual_seed(3))
            table[:, :prefix] = table[0, :prefix]
            s, n = table[ids], len(rows)
            loss_mask = torch.zeros(n, seq)
            loss_mask[:, : answer + 1] = 1.0
            answer_mask = torch.zeros(n, seq)
            answer_mask[:, answer] = 1.0
            return EncodedBatch(s[:, :seq], s[:, 1:], loss_mask, answer_mask,
                                torch.full((n,), answer, dtype=torch.long),
                                torch.zeros(n, dtype=torch.long),
                                trace_len=torch.full((n,), 8, dtype=torch.long))

    monkeypatch.setattr(sp, "MAX_PACKED_TOKENS", cap)
    calls = []
    real = fk.pack_groups
    monkeypatch.setattr(fk, "pack_groups", lambda *a, **k: calls.append(real(*a, **k))
                        or calls[-1])
    arch, small = (a.model_copy(update={"seq_length": seq}) for a in (ARCH, SMALL))
    runs = _logits_and_fused_runs(arch, small, PrefixEncoder(), ROWS, tmp_path, "forward_kl")
    per_group = 16 if cap == 1024 else (cap - prefix) // own  # 16 rows a batch
    groups = -(-16 // per_group)
    assert len(calls) == 4 and all(len(g) == groups for g in calls)
    assert [e - s for s, e, _p in calls[0]] == [per_group] * (16 // per_group) + (
        [16 % per_group] if 16 % per_group else [])
    # Groups of several rows share at least the 24 prefix tokens; a lone row runs as it is.
    assert all(p.prefix >= prefix if e - s > 1 else p.prefix == 0
               for g in calls for s, e, p in g)
    if cap == 1024:
        assert calls[0][0][2].tokens.shape[1] == prefix + 16 * own
    assert [h["forward_tokens"] for h in runs["fused_head"]] == [
        sum(p.tokens.shape[1] for _s, _e, p in g) for g in calls]
