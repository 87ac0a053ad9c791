"""The LM head fused into the KD divergence: the loss never holds [tokens, vocab] logits.

Inputs are the student's and teacher's last hidden states (after the final norm) and their
LM-head weights; the divergence (`losses.KINDS`), its temperature and the blended-CoT masks are
the same as `losses.blended_cot_loss`, which this reproduces (values and gradients; golden
tests in tests/distill/test_fused_kd.py). Tokens are taken `chunk_tokens` at a time: each
chunk's student and teacher logits are computed, turned into the per-token divergence and its
gradient with respect to the student's logits, and folded straight into the gradients of the
student's hidden states and head weight; the chunk's logits are then dropped. So the largest
live tensors are the gradients themselves ([tokens, hidden] and [vocab, hidden]) and a few
[chunk, vocab] fp32 temporaries.

Why the gradients are computed in forward rather than by recomputing each chunk in backward:
the loss is a scalar (the masks' per-sequence mean is known before the forward), so the
gradient needs only the backward's incoming scale, and a recompute would run the two head
matmuls (student and teacher) a second time: 6 [tokens x hidden x vocab] matmuls instead of the
naive loss's 4. Liger-Kernel's `LigerFusedLinearDistillationBase` does the same (gradients in
forward, the backward scales them). Liger itself is not used: its chunked distillation losses
take one `ignore_index` mask for both the soft and the hard loss and normalise by the batch's
token count, where blended CoT needs the divergence on the trace and the CE anchor on the answer
token, each a per-sequence mean; docs/benchmarks-kd.md has what was tried. The divergence's
gradient with respect to the student's logits is written out in closed form
(`_divergence_and_grad`): autograd through each chunk would keep its log-softmax outputs and
add a backward pass per chunk.

Tied embeddings need nothing special: the head weight passed in is the embedding parameter, and
autograd adds this gradient to the embedding's own. The teacher gets no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillscale.distill.losses import KINDS, blend, per_sequence_mean
from distillscale.models.megatron_gpt import causal_mask, hidden_and_head
from distillscale.models.shared_prefix import (
    layout_supported,
    pack_groups,
    packed_forward,
    pair_cost,
    unpack,
)

_LOG2 = math.log(2.0)


def _divergence_and_grad(ls: torch.Tensor, lt: torch.Tensor, kind: str):
    """Per-token divergence [c] between the log-probabilities [c, V] and its gradient with
    respect to the student's (temperature-scaled) logits [c, V]. Consumes `ls` and `lt`
    (overwritten in place: at most two more [c, V] tensors are ever alive).

    forward KL:  D = sum p_t (log p_t - log p_s),   dD/ds = p_s - p_t
    reverse KL:  D = sum p_s (log p_s - log p_t),   dD/ds = p_s (log p_s - log p_t - D)
    JSD:         D = (KL(p_t || m) + KL(p_s || m)) / 2,  m = (p_s + p_t) / 2,
                 dD/ds = p_s (h - sum p_s h),  h = (log p_s - log m) / 2
    (softmax's Jacobian applied to dD/dp_s; checked against autograd through
    `losses.token_divergence` in the tests).
    """
    # Row sums are torch's (a BLAS dot over 128k fp32 terms measured 1e-4 off); products are
    # formed in place so the sums need no temporary.
    if kind == "forward_kl":
        g = ls.exp()
        pt = lt.exp()
        d = lt.sub_(ls).mul_(pt).sum(-1)  # sum p_t (log p_t - log p_s)
        return d, g.sub_(pt)
    if kind == "reverse_kl":
        ps = ls.exp()
        prod = ls.sub_(lt).mul_(ps)  # p_s (log p_s - log p_t)
        del lt
        d = prod.sum(-1)
        return d, prod.sub_(ps.mul_(d.unsqueeze(-1)))
    log_m = torch.logaddexp(ls, lt).sub_(_LOG2)
    pt = lt.exp()
    kl_t = lt.sub_(log_m).mul_(pt).sum(-1)
    del pt, lt
    ps = ls.exp()
    h = ls.sub_(log_m).mul_(0.5)  # (log p_s - log m) / 2
    del log_m
    half_kl_s = (ps * h).sum(-1)
    return 0.5 * kl_t + half_kl_s, h.sub_(half_kl_s.unsqueeze(-1)).mul_(ps)


class _FusedHeadDivergence(torch.autograd.Function):
    """sum_t w_t D_T(softmax(h_t W_t^T / T), softmax(h_s W_s^T / T)) over the tokens with
    w_t != 0 (the others are never computed), plus the per-token D [N] (no gradient)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, weights, kind, temperature, chunk, want_h, want_w):
        n = hs.shape[0]
        rows_all = torch.nonzero(weights).flatten()
        per_token = torch.zeros(n, dtype=torch.float32, device=hs.device)
        loss = torch.zeros((), dtype=torch.float32, device=hs.device)
        grad_h = torch.zeros_like(hs) if want_h else None
        # fp32 whatever the weight's dtype: summing many chunks' bf16 products would lose bits.
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if want_w else None
        for i in range(0, rows_all.numel(), chunk):
            rows = rows_all[i : i + chunk]
            h_s, h_t = hs.index_select(0, rows), ht.index_select(0, rows)
            # Logits in the inputs' dtype (as the naive head computes them), softmax in fp32.
            ls = F.log_softmax((h_s @ ws.T).float().div_(temperature), dim=-1)
            lt = F.log_softmax((h_t @ wt.T).float().div_(temperature), dim=-1)
            d, g = _divergence_and_grad(ls, lt, kind)
            del ls, lt  # consumed: g lives in one of them
            w = weights.index_select(0, rows).float()
            per_token.index_copy_(0, rows, d)
            loss += (w * d).sum()
            g.mul_((w / temperature).unsqueeze(-1))  # d/dlogits = (d/ds) / T
            if want_h:
                grad_h.index_copy_(0, rows, (g.to(ws.dtype) @ ws).to(hs.dtype))
            if want_w:
                grad_w.addmm_(g.T, h_s.float())
            del g
        if want_w and grad_w.dtype != ws.dtype:
            grad_w = grad_w.to(ws.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        one = bool(grad_loss == 1)  # the usual case: no scaled copy of [vocab, hidden]
        if grad_h is not None and not one:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None and not one:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_head_divergence(
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, token_weights: torch.Tensor,
    kind: str = "forward_kl", temperature: float = 1.0, chunk_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t D_T(p_teacher, p_student)_t, per-token D [N]) from hidden states [N, H_s],
    [N, H_t] and head weights [V, H_s], [V, H_t] (no T^2; weights cut to the real vocabulary
    by the caller). Gradients flow to `student_hidden` and `student_weight` only."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r} (one of {KINDS})")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student head has {student_weight.shape[0]} outputs, teacher head "
            f"{teacher_weight.shape[0]}: cut both to the real vocabulary first")
    if student_hidden.shape[0] != teacher_hidden.shape[0] or token_weights.shape != (
            student_hidden.shape[0],):
        raise ValueError(
            f"tokens differ: student hidden {tuple(student_hidden.shape)}, teacher hidden "
            f"{tuple(teacher_hidden.shape)}, token weights {tuple(token_weights.shape)}")
    grad = torch.is_grad_enabled()
    want_h = grad and student_hidden.requires_grad
    want_w = grad and student_weight.requires_grad
    return _FusedHeadDivergence.apply(
        student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
        token_weights.detach(), kind, float(temperature), max(1, int(chunk_tokens)),
        want_h, want_w)


def per_sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """Token weights [b, s] with sum(w * x) == `losses.per_sequence_mean(x, mask)`."""
    mask = mask.float()
    counts = mask.sum(-1, keepdim=True)
    has = (counts > 0).float()
    return mask / counts.clamp_min(1.0) * has / has.sum().clamp_min(1.0)


def fused_answer_ce(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    targets: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """`losses.answer_ce` with logits computed at the answer positions only."""
    b, s = answer_mask.shape
    bi, si = torch.nonzero(answer_mask > 0, as_tuple=True)
    logits = (student_hidden[bi, si] @ student_weight.T).float()
    ce = torch.zeros(b, s, dtype=torch.float32, device=student_hidden.device)
    ce = ce.index_put((bi, si), F.cross_entropy(logits, targets[bi, si], reduction="none"))
    return per_sequence_mean(ce, answer_mask)


def fused_blended_cot_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    targets: torch.Tensor, kl_mask: torch.Tensor, answer_mask: torch.Tensor, *,
    alpha: float, temperature: float = 1.0, kind: str = "forward_kl", chunk_tokens: int = 256,
) -> tuple[torch.Tensor, dict]:
    """`losses.blended_cot_loss` from hidden states [b, s, H] and head weights [V, H]."""
    b, s = kl_mask.shape
    weights = per_sequence_weights(kl_mask).reshape(-1)
    kl, _ = fused_head_divergence(
        student_hidden.reshape(b * s, -1), student_weight,
        teacher_hidden.reshape(b * s, -1), teacher_weight, weights, kind, temperature,
        chunk_tokens)
    kl = kl * temperature**2
    ce = fused_answer_ce(student_hidden, student_weight, targets, answer_mask) \
        if alpha < 1.0 else None
    loss = blend(kl, ce, alpha)
    logs = {"kl": float(kl.detach())}
    if ce is not None:
        logs["ce"] = float(ce.detach())
    return loss, logs


# ---------------------------------------------------------------------------------------------
# The local online path (`distill.loss.implementation: fused_head`)
# ---------------------------------------------------------------------------------------------


class FusedHeadKD:
    """The online KD terms of `logit_kd.distill` with the head fused into the loss.

    Both Megatron GPTModels run up to their output layer (megatron-core's `output_processor`
    hook hands over the last hidden states [s, b, h] and the head weight, tied or not); the
    teacher without gradient. The divergence over `kl_mask` and the CE anchor over
    `answer_mask` are `fused_blended_cot_loss`'s, so the values are `blended_cot_loss`'s on
    the full logits."""

    def __init__(self, student, teacher, loss_cfg, real_vocab: int | None = None):
        # heavy: megatron-core, only where a Megatron model is built or run
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "distill.loss.implementation=fused_head: tensor_parallel=1 only (each rank holds "
                "a vocabulary shard of the head); use implementation=logits under TP")
        for who, m in (("student", student), ("teacher", teacher)):
            if getattr(m.config, "use_mup", False) or m.output_layer.bias is not None:
                raise NotImplementedError(
                    f"distill.loss.implementation=fused_head: the {who}'s output layer has a "
                    "bias or MuP logit scaling; use implementation=logits")
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.student, self.teacher, self.cfg, self.real_vocab = student, teacher, loss_cfg, real_vocab
        self.chunk = loss_cfg.chunk_tokens or 64
        # Rows sharing a prompt prefix run it once (`models/shared_prefix.py`) where the
        # layout applies; `forward_tokens`: the tokens each model's last forward ran (the
        # packed sequence's length, else batch x sequence).
        self.share_prefix = layout_supported(student) and layout_supported(teacher)
        self.forward_tokens = 0

    def _forward(self, model, tokens, groups=None):
        if groups is not None:
            parts = []
            for _start, _end, pack in groups:
                hidden, weight = packed_forward(model, pack, output_processor=hidden_and_head)
                parts.append(unpack(hidden[:, 0], pack))
            hidden = torch.cat(parts)
        else:
            b, s = tokens.shape
            pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
            hidden, weight = model(tokens, pos, causal_mask(s, tokens.device),
                                   output_processor=hidden_and_head)
            hidden = hidden.transpose(0, 1)
        if self.real_vocab is not None:
            weight = weight[: self.real_vocab]
        return hidden, weight

    def _pack(self, tokens, kl_mask, answer_mask):
        """The packed groups of the batch (`pack_groups`) up to each row's last supervised
        position (later tokens cannot change the losses under a causal mask), or None."""
        groups = None
        if self.share_prefix:
            used = (kl_mask > 0) | (answer_mask > 0)
            cols = torch.arange(used.shape[1], device=used.device)
            lengths = torch.where(used, cols, -1).amax(-1) + 1
            if bool((lengths > 0).all()):
                groups = pack_groups(tokens, lengths, pair=pair_cost(self.student))
        self.forward_tokens = tokens.numel() if groups is None else sum(
            pack.tokens.shape[1] for _s, _e, pack in groups)
        return groups

    def __call__(self, tokens, kl_mask, targets, answer_mask, with_ce: bool):
        """(T^2 * per-sequence mean divergence over `kl_mask`, answer CE or None)."""
        groups = self._pack(tokens, kl_mask, answer_mask)
        hs, ws = self._forward(self.student, tokens, groups)
        with torch.no_grad():
            ht, wt = self._forward(self.teacher, tokens, groups)
        b, s = kl_mask.shape
        t = self.cfg.temperature
        kl, _ = fused_head_divergence(
            hs.reshape(b * s, -1), ws, ht.reshape(b * s, -1), wt,
            per_sequence_weights(kl_mask).reshape(-1), self.cfg.kind, t, self.chunk)
        ce = fused_answer_ce(hs, ws, targets, answer_mask) if with_ce else None
        return kl * t**2, ce
