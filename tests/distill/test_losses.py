"""Golden tests: every loss in distillscale/distill/losses.py against a brute-force reference
(float64, explicit probabilities, Python loops over positions), with masks and temperatures."""

import math

import pytest
import torch

from distillscale.distill import losses as L

B, S, V = 3, 7, 11


def _logits(seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, V, generator=g) * scale).to(dtype)


def _softmax64(z, t):
    z = z.double() / t
    e = torch.exp(z - z.max())
    return e / e.sum()


def _ref_div(zs, zt, kind, t):
    ps, pt = _softmax64(zs, t), _softmax64(zt, t)
    if kind == "forward_kl":
        return float(sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(len(pt))))
    if kind == "reverse_kl":
        return float(sum(ps[i] * math.log(ps[i] / pt[i]) for i in range(len(pt))))
    m = 0.5 * (ps + pt)
    kl_t = sum(pt[i] * math.log(pt[i] / m[i]) for i in range(len(pt)))
    kl_s = sum(ps[i] * math.log(ps[i] / m[i]) for i in range(len(pt)))
    return float(0.5 * kl_t + 0.5 * kl_s)


def _ref_grid(zs, zt, kind, t):
    return torch.tensor([[_ref_div(zs[b, s], zt[b, s], kind, t) for s in range(S)]
                         for b in range(B)], dtype=torch.float64)


@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_token_divergence_matches_brute_force(kind, t):
    zs, zt = _logits(0), _logits(1)
    got = L.token_divergence(zs, zt, kind, t)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), _ref_grid(zs, zt, kind, t), rtol=1e-5, atol=1e-6)


def test_divergences_are_zero_on_equal_inputs_and_jsd_is_bounded():
    z = _logits(0)
    for kind in L.KINDS:
        assert L.token_divergence(z, z, kind).abs().max() < 1e-6
    far = L.token_divergence(_logits(0, 50.0), _logits(1, 50.0), "jsd")
    assert far.max() <= math.log(2) + 1e-6 and far.min() >= 0


def test_bf16_logits_accumulate_in_fp32():
    zs, zt = _logits(0, dtype=torch.bfloat16), _logits(1, dtype=torch.bfloat16)
    got = L.token_divergence(zs, zt, "forward_kl", 1.0)
    assert got.dtype == torch.float32
    ref = _ref_grid(zs.float(), zt.float(), "forward_kl", 1.0)  # same bf16 values, exact math
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_per_sequence_mean_skips_empty_sequences():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0], [5.0, 6.0, 7.0]])
    m = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # (2.5 + 5) / 2: the empty sequence counts for nothing; token-level mean would be 10/3.
    assert L.per_sequence_mean(x, m).item() == pytest.approx(3.75)
    assert L.masked_mean(x, m).item() == pytest.approx(10 / 3)
    assert L.per_sequence_mean(x, torch.zeros_like(m)).item() == 0.0


def test_alpha_warmup():
    assert L.alpha_at(0, 0.5, 10) == pytest.approx(0.05)
    assert L.alpha_at(4, 0.5, 10) == pytest.approx(0.25)
    assert L.alpha_at(20, 0.5, 10) == 0.5
    assert L.alpha_at(0, 0.7, 0) == 0.7


@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("t,alpha", [(1.0, 1.0), (2.0, 0.6), (0.5, 0.0)])
@pytest.mark.parametrize("chunk", [0, 4])
def test_blended_cot_loss_matches_brute_force(kind, t, alpha, chunk, kd_masks):
    zs, zt = _logits(2), _logits(3)
    targets = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
    trace, answer = kd_masks
    loss, logs = L.blended_cot_loss(zs, zt, targets, trace, answer, alpha=alpha, temperature=t,
                                    kind=kind, chunk_tokens=chunk)
    div = _ref_grid(zs, zt, kind, t)
    kl_seqs, ce_seqs = [], []
    for b in range(B):
        pos = [s for s in range(S) if trace[b, s] > 0]
        if pos:
            kl_seqs.append(sum(float(div[b, s]) for s in pos) / len(pos))
        apos = [s for s in range(S) if answer[b, s] > 0]
        ce_seqs.append(sum(-math.log(float(_softmax64(zs[b, s], 1.0)[targets[b, s]]))
                           for s in apos) / len(apos))
    kl = t * t * sum(kl_seqs) / len(kl_seqs)
    ce = sum(ce_seqs) / len(ce_seqs)
    ref = alpha * kl + (1 - alpha) * ce
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-6)


def test_blend_masks_select_tokens(kd_masks):
    """Changing logits on prompt positions must not change the loss; on trace positions it must."""
    zs, zt = _logits(2), _logits(3)
    targets = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
    trace, answer = kd_masks
    base, _ = L.blended_cot_loss(zs, zt, targets, trace, answer, alpha=0.5)
    prompt = (trace + answer) == 0
    z2 = zs.clone()
    z2[prompt] += torch.randn(int(prompt.sum()), V)
    same, _ = L.blended_cot_loss(z2, zt, targets, trace, answer, alpha=0.5)
    assert same.item() == pytest.approx(base.item(), rel=1e-6)
    z3 = zs.clone()
    z3[trace > 0] += 1.0 + torch.randn(int(trace.sum()), V)
    assert L.blended_cot_loss(z3, zt, targets, trace, answer, alpha=0.5)[0].item() != \
        pytest.approx(base.item(), rel=1e-4)


@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_divergence_equals_naive_in_value_and_gradient(kind, chunk):
    zt = _logits(1)
    a = _logits(0).requires_grad_(True)
    b = _logits(0).requires_grad_(True)
    w = torch.rand(B, S, generator=torch.Generator().manual_seed(3))
    naive = L.token_divergence(a, zt, kind, 2.0)
    ours = L.chunked_divergence(b, zt, kind, 2.0, chunk)
    assert torch.allclose(naive, ours, rtol=1e-6, atol=1e-7)
    (naive * w).sum().backward()
    (ours * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_chunked_divergence_keeps_bf16_gradients():
    zs = _logits(0, dtype=torch.bfloat16).requires_grad_(True)
    L.chunked_divergence(zs, _logits(1, dtype=torch.bfloat16), "forward_kl", 1.0, 4).sum().backward()
    assert zs.grad.dtype == torch.bfloat16 and torch.isfinite(zs.grad.float()).all()


def test_chunked_divergence_rejects_unaligned_vocab():
    with pytest.raises(ValueError, match="align_vocab"):
        L.chunked_divergence(torch.zeros(2, 5), torch.zeros(2, 6))


@pytest.mark.parametrize("k", [1, 4, V])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_topk_kl_matches_brute_force(k, t):
    zs, zt = _logits(4), _logits(5)
    lt = torch.log_softmax(zt.double() / t, -1)
    ids = lt.topk(k, dim=-1).indices
    topk_lp = torch.gather(lt, -1, ids).float()
    got = L.topk_kl(zs, ids, topk_lp, temperature=t)
    ref = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            ps, pt = _softmax64(zs[b, s], t), _softmax64(zt[b, s], t)
            head = [int(i) for i in ids[b, s]]
            kl = sum(pt[i] * math.log(pt[i] / ps[i]) for i in head)
            rest_t = 1.0 - sum(float(pt[i]) for i in head)
            rest_s = 1.0 - sum(float(ps[i]) for i in head)
            if rest_t > 1e-12:
                kl += rest_t * math.log(rest_t / rest_s)
            ref[b, s] = float(kl)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5)
    full = _ref_grid(zs, zt, "forward_kl", t)
    assert (got.double() <= full + 1e-5).all()  # a lower bound on the full KL
    if k == V:
        assert torch.allclose(got.double(), full, rtol=1e-4, atol=1e-5)


def test_topk_kl_uses_the_given_tail_mass():
    zs, zt = _logits(4), _logits(5)
    lt = torch.log_softmax(zt, -1)
    ids = lt.topk(3, dim=-1).indices
    topk_lp = torch.gather(lt, -1, ids)
    implied = 1 - topk_lp.exp().sum(-1)
    a = L.topk_kl(zs, ids, topk_lp)
    b = L.topk_kl(zs, ids, topk_lp, tail_mass=implied)
    c = L.topk_kl(zs, ids, topk_lp, tail_mass=torch.zeros_like(implied))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def test_align_vocab_cuts_padding_and_rejects_padded_targets():
    real = 9
    zs, zt = torch.randn(2, 3, 12), torch.randn(2, 3, 16)  # padded differently
    s, t = L.align_vocab(zs, zt, real, targets=torch.tensor([[1, 2, 8], [0, 0, 0]]))
    assert s.shape[-1] == t.shape[-1] == real
    assert torch.equal(s, zs[..., :real]) and torch.equal(t, zt[..., :real])
    with pytest.raises(L.VocabMismatchError, match="target id 10 is a padding id"):
        L.align_vocab(zs, zt, real, targets=torch.tensor([[1, 10, 0]]))
    # A padded id is fine where nothing is supervised.
    L.align_vocab(zs, zt, real, targets=torch.tensor([[1, 10, 0]]),
                  mask=torch.tensor([[1.0, 0.0, 1.0]]))
    with pytest.raises(L.VocabMismatchError, match="fewer than the tokenizer"):
        L.align_vocab(zs, zt, 13)


def test_real_vocab_size_detects_a_real_tokenizer_mismatch():
    from distillscale.tokenizer import build_word_tokenizer

    a = build_word_tokenizer(["stock rises on earnings"], ["x", "y"])
    b = build_word_tokenizer(["stock rises on earnings"], ["x", "y"])
    c = build_word_tokenizer(["stock falls on earnings"], ["x", "y"])
    assert L.real_vocab_size(a, b) == len(a)
    with pytest.raises(L.VocabMismatchError, match="tokenizers differ"):
        L.real_vocab_size(a, c)


def test_bench_kd_loss_reports_less_memory_and_the_same_value():
    """tools/bench_kd_loss.py at a small size: the exact last-line format, equal values, and
    the chunked loss's peak clearly below the naive one's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_kd_loss.py"
    res = subprocess.run([sys.executable, str(tool), "--vocab", "32000", "--tokens", "256",
                          "--chunk", "16"], capture_output=True, text=True, check=True)
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"naive_peak_mib=(\S+) ours_peak_mib=(\S+) ratio=(\S+) max_rel_diff=(\S+)",
                     last)
    assert m, last
    naive, ours, ratio, diff = map(float, m.groups())
    assert ratio == pytest.approx(ours / naive, rel=1e-2)
    assert ratio < 0.5 and diff <= 1e-5
