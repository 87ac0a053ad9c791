"""Every distillation loss, in one place: per-token divergences, the blended-CoT loss, a
memory-safe (token-chunked) divergence, top-k KL from a cached teacher, vocabulary alignment.

Conventions: logits are [..., V]; masks are float [b, s] aligned with the logits (position t
predicts `targets[:, t]`); every loss is accumulated in fp32 whatever the logits' dtype.
Divergences at temperature T compare softmax(z / T) distributions and are scaled by T^2 where
they enter a training loss (Hinton et al. 2015: keeps gradient magnitudes comparable across T).

    forward_kl   KL(p_teacher || p_student)   mode-covering, the paper's default
    reverse_kl   KL(p_student || p_teacher)   mode-seeking
    jsd          0.5 KL(p_t || m) + 0.5 KL(p_s || m),  m = (p_t + p_s) / 2   bounded by log 2

The Megatron path computes the same per-token divergences inside ModelOpt's
`DistillationModel`: forward / reverse KL with ModelOpt's `LogitsKLLoss`; JSD and the
token-chunked variants with `DivergenceLogitsLoss` below (a ModelOpt `BaseLoss`, so it plugs into
`mtd.convert` the same way).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


# ---------------------------------------------------------------------------------------------
# Per-token divergences
# ---------------------------------------------------------------------------------------------


def divergence_from_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str):
    """Per-position divergence [...] from log-probabilities [..., V] (summed over V)."""
    if kind == "forward_kl":
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    if kind == "jsd":
        # log m in log space: no exp/log round trip, stays finite where p underflows.
        log_m = torch.logaddexp(student_logp, teacher_logp) - math.log(2.0)
        kl_t = F.kl_div(log_m, teacher_logp, reduction="none", log_target=True).sum(-1)
        kl_s = F.kl_div(log_m, student_logp, reduction="none", log_target=True).sum(-1)
        return 0.5 * (kl_t + kl_s)
    raise ValueError(f"unknown divergence kind {kind!r} (one of {KINDS})")


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence [...] between softmax(logits / T), computed in fp32 (no T^2)."""
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return divergence_from_logprobs(ls, lt, kind)


# ---------------------------------------------------------------------------------------------
# Reductions and the blended-CoT loss
# ---------------------------------------------------------------------------------------------


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of the whole batch (0 when the mask is empty)."""
    mask = mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp_min(1.0)


def per_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each sequence, then over the sequences that have any.

    Per sequence first so a long trace does not outweigh a short one: each example counts once,
    as in the paper's per-sequence loss.
    """
    mask = mask.float()
    counts = mask.sum(-1)
    seq = (per_token.float() * mask).sum(-1) / counts.clamp_min(1.0)
    has = (counts > 0).float()
    return (seq * has).sum() / has.sum().clamp_min(1.0)


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """alpha, linearly warmed up from alpha / warmup_steps over `warmup_steps` steps."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, (step + 1) / warmup_steps)


def answer_ce(student_logits: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor):
    """Per-sequence mean CE of the gold answer tokens, in fp32."""
    b, s, v = student_logits.shape
    ce = F.cross_entropy(
        student_logits.float().reshape(-1, v), targets.reshape(-1), reduction="none"
    ).view(b, s)
    return per_sequence_mean(ce, answer_mask)


def blend(kl: torch.Tensor, ce: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * KL + (1 - alpha) * CE; the CE term is skipped (not computed) when alpha == 1."""
    if alpha >= 1.0 or ce is None:
        return alpha * kl
    return alpha * kl + (1.0 - alpha) * ce


def blended_cot_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    kl_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, dict]:
    """L = alpha * T^2 * mean_{t in kl_mask} D_T(p_t, p_s) + (1 - alpha) * CE(gold answer tokens).

    Means are per sequence (see `per_sequence_mean`), in fp32. Why the blend stabilises KL over
    reasoning traces: a long trace is mostly tokens where teacher and student can legitimately
    disagree (phrasing), so pure KL spends its gradient on style and the answer token is a
    vanishing fraction of the loss; the CE anchor on the gold answer keeps a fixed share of the
    gradient on the one token that decides the label, and it never follows a teacher mistake.
    `chunk_tokens` > 0 computes the divergence with `chunked_divergence` (memory-safe).
    """
    if chunk_tokens > 0:
        per_token = chunked_divergence(student_logits, teacher_logits, kind, temperature,
                                       chunk_tokens)
    else:
        per_token = token_divergence(student_logits, teacher_logits, kind, temperature)
    kl = per_sequence_mean(per_token, kl_mask) * temperature**2
    ce = answer_ce(student_logits, targets, answer_mask) if alpha < 1.0 else None
    loss = blend(kl, ce, alpha)
    logs = {"kl": float(kl.detach())}
    if ce is not None:
        logs["ce"] = float(ce.detach())
    return loss, logs


# ---------------------------------------------------------------------------------------------
# Memory-safe divergence: chunk over tokens, recompute in backward
# ---------------------------------------------------------------------------------------------


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence computed `chunk` tokens at a time.

    The naive loss upcasts the whole [tokens, V] student and teacher logits to fp32 and keeps
    the log-softmax outputs alive for backward (several fp32 copies of the full-vocabulary
    logits). Here only one chunk's fp32 temporaries exist at any moment: forward keeps nothing
    but the inputs, and backward recomputes each chunk's log-softmax (the torchtune chunked-KD
    idea, applied over tokens of given logits; recompute-in-backward written here because
    autograd would otherwise save every chunk's fp32 activations).
    """

    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, chunk):
        ctx.save_for_backward(student, teacher)
        ctx.kind, ctx.temperature, ctx.chunk = kind, temperature, chunk
        flat_s, flat_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        out = torch.empty(flat_s.shape[0], dtype=torch.float32, device=student.device)
        for i in range(0, flat_s.shape[0], chunk):
            out[i : i + chunk] = token_divergence(flat_s[i : i + chunk], flat_t[i : i + chunk],
                                                  kind, temperature)
        return out.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher = ctx.saved_tensors
        v = student.shape[-1]
        flat_s, flat_t = student.reshape(-1, v), teacher.reshape(-1, v)
        flat_g = grad_out.reshape(-1)
        grad = torch.empty_like(flat_s)  # in the logits' own dtype (bf16 stays bf16)
        for i in range(0, flat_s.shape[0], ctx.chunk):
            with torch.enable_grad():
                s = flat_s[i : i + ctx.chunk].detach().requires_grad_(True)
                d = token_divergence(s, flat_t[i : i + ctx.chunk], ctx.kind, ctx.temperature)
                (g,) = torch.autograd.grad(d, s, grad_outputs=flat_g[i : i + ctx.chunk].float())
            grad[i : i + ctx.chunk] = g
        return grad.view_as(student), None, None, None, None


def chunked_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
    temperature: float = 1.0, chunk_tokens: int = 256,
) -> torch.Tensor:
    """`token_divergence`, never holding more than `chunk_tokens` x V fp32 values at once."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r} (one of {KINDS})")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: align the vocabularies first (align_vocab)"
        )
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), kind, temperature,
                                    max(1, int(chunk_tokens)))


# ---------------------------------------------------------------------------------------------
# Top-k KL from a cached teacher
# ---------------------------------------------------------------------------------------------


TAIL_EPS = 1e-6


def topk_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position KL(p_teacher || p_student) from the teacher's cached top-k, [...].

    The teacher distribution is known only on its top-k ids (`topk_logprobs`, log-probabilities
    over the full vocabulary, as cached) plus one bucket holding the remaining `tail_mass`
    (default: 1 - sum of the top-k probabilities). The student is collapsed onto the same k + 1
    outcomes, so this is the exact KL between the two (k+1)-outcome distributions: it equals the
    full KL when the tail is empty and is a lower bound on it otherwise (data processing).
    The cache is assumed to hold the teacher at the distillation temperature; `temperature`
    scales the student's logits.
    """
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = topk_logprobs.float()
    ids = topk_ids.long()
    ls_k = torch.gather(ls, -1, ids)
    pt_k = lt.exp()
    if tail_mass is None:
        tail_mass = 1.0 - pt_k.sum(-1)
    # fp32 rounding leaves |1 - sum p| ~ 1e-7 when the top-k covers everything: not a tail.
    tail_mass = torch.where(tail_mass.float() > TAIL_EPS, tail_mass.float(), 0.0)
    head = (pt_k * (lt - ls_k)).sum(-1)
    # The student's tail log-probability as a logsumexp over the ids outside the top-k (exact;
    # log(1 - sum_k p_s,k) cancels catastrophically when the top-k holds nearly all the mass).
    s_tail_log = torch.logsumexp(ls.scatter(-1, ids, float("-inf")), dim=-1).clamp_min(-1e4)
    tail = torch.where(tail_mass > 0, tail_mass * (tail_mass.clamp_min(1e-30).log() - s_tail_log),
                       torch.zeros_like(tail_mass))
    return head + tail


def cached_teacher_at_temperature(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
    temperature: float, vocab: int, tail_logprobs: torch.Tensor | None = None,
    tail_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached teacher (log-probabilities at T=1, as the teacher stage writes them) at the
    distillation temperature, restricted to ids < `vocab` (the real tokenizer range).

    Returns (top-k log-probabilities at T [..., k] (-inf for padding ids), log of the tail mass
    at T [...], log-normaliser at T [...]). softmax(z / T) gives each top-k id the weight
    p_i^(1/T) / Z_T; the tail's share sum_{j in tail} p_j^(1/T) is known exactly only at T=1:
    with tail draws j ~ p_j / p_tail (`tail_logprobs`) it is the importance estimate
    p_tail * mean_j p_j^(1/T - 1) (unbiased); with a merged tail it is p_tail^(1/T), the tail
    treated as one outcome (exact at T=1, an underestimate for T > 1).
    """
    a = 1.0 / temperature
    lp = topk_logprobs.float()
    log_u = torch.where(topk_ids < vocab, lp * a, float("-inf"))
    tail = tail_logprob.float()
    # A tail below TAIL_EPS is fp rounding of a top-k that holds everything (as in `topk_kl`);
    # at T > 1 raising it to 1/T would turn that noise into real mass.
    tail = torch.where(tail.exp() > TAIL_EPS, tail, float("-inf"))
    if tail_logprobs is None:
        log_u_tail = tail * a
    else:
        tl = tail_logprobs.float()
        valid = tail_ids < vocab if tail_ids is not None else torch.ones_like(tl, dtype=torch.bool)
        w = torch.where(valid, tl * (a - 1.0), float("-inf"))
        log_u_tail = tail + torch.logsumexp(w, -1) - math.log(tl.shape[-1])
    log_z = torch.logsumexp(torch.cat([log_u, log_u_tail.unsqueeze(-1)], -1), -1)
    return log_u - log_z.unsqueeze(-1), log_u_tail - log_z, log_z


def cached_topk_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor, temperature: float = 1.0,
    tail_ids: torch.Tensor | None = None, tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KL_T(p_teacher || p_student) [N] from a teacher logit cache entry ([N, k]
    top-k ids and T=1 log-probabilities, [N] tail log-mass, optional [N, m] tail draws), with
    `student_logits` [N, V] already cut to the real vocabulary (cached padding ids get no mass).

    With a merged tail this is `topk_kl` on the teacher rescaled to temperature T; with tail
    draws the tail term is the importance-weighted estimate of the full tail sum,
    mean_j w_j (log p^T_j - log q^T_j), w_j = p^T_j / (p_j / p_tail) (unbiased at T=1, the
    random-sampling KD estimate `logit_cache.kl_topk` computes).
    """
    vocab = student_logits.shape[-1]
    lt_k, lt_tail, log_z = cached_teacher_at_temperature(
        topk_ids, topk_logprobs, tail_logprob, temperature, vocab, tail_logprobs, tail_ids)
    valid = topk_ids < vocab
    ids = torch.where(valid, topk_ids, 0).long()
    if tail_ids is None:
        # Padding ids: log-prob -inf -> weight 0 in `topk_kl`; the -1e4 stand-in keeps
        # 0 * (lt - ls) finite, and id 0 (their placeholder) stays in the student's tail unless
        # it is a real top-k id.
        lt_safe = torch.where(valid, lt_k, -1e4)
        if bool((~valid).any()):
            return _topk_kl_masked(student_logits, ids, lt_safe, valid, lt_tail.exp(),
                                   temperature)
        return topk_kl(student_logits, ids, lt_safe, lt_tail.exp(), temperature)
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pt = lt_k.exp()
    head = torch.where(valid, pt * (lt_k - torch.gather(ls, -1, ids)), 0.0).sum(-1)
    t_valid = tail_ids < vocab
    t_ids = torch.where(t_valid, tail_ids, 0).long()
    tl = tail_logprobs.float()
    lt_j = tl / temperature - log_z.unsqueeze(-1)
    t_log = tail_logprob.float()
    t_log = torch.where(t_log.exp() > TAIL_EPS, t_log, float("-inf"))  # as the normaliser's
    w = (lt_j - tl + t_log.unsqueeze(-1)).exp()
    tail = torch.where(t_valid, w * (lt_j - torch.gather(ls, -1, t_ids)), 0.0).mean(-1)
    return head + tail


def _topk_kl_masked(student_logits, ids, lt_k, valid, tail_mass, temperature):
    """`topk_kl` where some top-k entries are padding ids (weight 0, not removed from the
    student's tail)."""
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pt = torch.where(valid, lt_k.exp(), 0.0)
    head = (pt * (lt_k - torch.gather(ls, -1, ids))).sum(-1)
    in_top = torch.zeros_like(ls).scatter_reduce(-1, ids, valid.float(), reduce="amax") > 0
    s_tail_log = torch.logsumexp(ls.masked_fill(in_top, float("-inf")), -1).clamp_min(-1e4)
    tail_mass = torch.where(tail_mass > TAIL_EPS, tail_mass, 0.0)
    tail = torch.where(tail_mass > 0, tail_mass * (tail_mass.clamp_min(1e-30).log() - s_tail_log),
                       torch.zeros_like(tail_mass))
    return head + tail


# ---------------------------------------------------------------------------------------------
# Vocabulary alignment
# ---------------------------------------------------------------------------------------------


class VocabMismatchError(ValueError):
    """Teacher and student do not share a tokenizer: logit distillation is meaningless."""


def real_vocab_size(teacher_tokenizer, student_tokenizer=None) -> int:
    """Number of real token ids shared by teacher and student (padding excluded).

    Padded vocab sizes (e.g. 152064 vs 151936 for two Qwen sizes) routinely differ because the
    embedding is rounded up for TP / kernel efficiency; the real tokenizer range must not. Two
    tokenizers that map any string differently are a real mismatch and raise.
    """
    n = len(teacher_tokenizer)
    if student_tokenizer is None or student_tokenizer is teacher_tokenizer:
        return n
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:3]
        only_s = sorted(set(sv) - set(tv))[:3]
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:3]
        raise VocabMismatchError(
            f"teacher and student tokenizers differ (teacher {len(tv)} tokens, student {len(sv)}; "
            f"only in teacher {only_t}, only in student {only_s}, different ids {moved}): "
            "logit distillation needs one tokenizer"
        )
    return n


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, real_vocab: int,
    targets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits cut to the real tokenizer range [0, real_vocab).

    Raises if either model has fewer outputs than the tokenizer, or if a supervised target
    (where `mask` > 0, or anywhere when no mask is given) is a padding id >= real_vocab.
    """
    for who, t in (("student", student_logits), ("teacher", teacher_logits)):
        if t.shape[-1] < real_vocab:
            raise VocabMismatchError(
                f"{who} has {t.shape[-1]} output logits, fewer than the tokenizer's {real_vocab}"
            )
    if targets is not None:
        sel = targets if mask is None else targets[mask > 0]
        if sel.numel() and int(sel.max()) >= real_vocab:
            raise VocabMismatchError(
                f"target id {int(sel.max())} is a padding id (real vocabulary {real_vocab})"
            )
    return student_logits[..., :real_vocab], teacher_logits[..., :real_vocab]


# ---------------------------------------------------------------------------------------------
# ModelOpt criterion: JSD and the chunked divergences on the Megatron path
# ---------------------------------------------------------------------------------------------


def divergence_logits_loss(model_config, kind: str = "jsd", temperature: float = 1.0,
                           chunk_tokens: int = 0, real_vocab: int | None = None):
    """A ModelOpt Megatron criterion (a `BaseLoss`) giving the per-token divergence [b, s]
    between the output-layer logits: JSD, or forward / reverse KL computed token-chunked.

    Built lazily so this module imports without ModelOpt (the losses above are plain torch).
    At TP=1 with `chunk_tokens` > 0 it uses `chunked_divergence`. Under tensor parallelism each
    rank holds a vocabulary shard: the log-softmax normaliser is all-reduced (max, then sum of
    exp) and each rank returns its shard's partial sum with `tp_reduce=True`, which the
    reduction function sums over the TP group (chunking is not applied there).
    `real_vocab`: teacher and student padded to different vocabulary sizes; both logits are cut
    to the real tokenizer range first (`align_vocab`; TP=1 only: the two models' vocabulary
    shards would cover different id ranges).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r} (one of {KINDS})")
    if real_vocab is not None and model_config.tensor_model_parallel_size > 1:
        raise NotImplementedError(
            "teacher and student with different padded vocabularies are aligned at "
            "tensor_parallel=1 only (each rank's vocabulary shard covers different ids)")
    return _criterion_class()(model_config, kind, temperature, chunk_tokens, real_vocab)


_CRITERION = None


def _criterion_class():
    global _CRITERION
    if _CRITERION is not None:
        return _CRITERION
    # heavy: ModelOpt, only where a model is pruned or distilled
    from modelopt.torch.distill.plugins.megatron import BaseLoss

    class DivergenceLogitsLoss(BaseLoss):
        def __init__(self, model_config, kind: str, temperature: float, chunk_tokens: int,
                     real_vocab: int | None = None):
            super().__init__(model_config)
            self._kind, self._temperature, self._chunk = kind, temperature, chunk_tokens
            self._real_vocab = real_vocab

        def _tp_log_softmax(self, x: torch.Tensor) -> torch.Tensor:
            # heavy: megatron-core, only where a Megatron model is built or run
            from megatron.core import parallel_state

            group = parallel_state.get_tensor_model_parallel_group()
            mx = x.max(dim=-1, keepdim=True).values.detach()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            x = x - mx
            denom = dist_nn.functional.all_reduce(x.exp().sum(-1, keepdim=True), group=group)
            return x - denom.log()

        def forward(self, predictions, targets):
            predictions, targets = self.pre_forward(predictions, targets)  # [s, b, v]
            if self._real_vocab is not None:
                predictions, targets = align_vocab(predictions, targets, self._real_vocab)
            if self._config.tensor_model_parallel_size > 1:
                ls = self._tp_log_softmax(predictions.float() / self._temperature)
                lt = self._tp_log_softmax(targets.float() / self._temperature)
                loss = divergence_from_logprobs(ls, lt, self._kind)  # this rank's vocab shard
                return self.post_forward(loss, tp_reduce=True)
            if self._chunk > 0:
                loss = chunked_divergence(predictions, targets, self._kind, self._temperature,
                                          self._chunk)
            else:
                loss = token_divergence(predictions, targets, self._kind, self._temperature)
            return self.post_forward(loss, tp_reduce=False)

    _CRITERION = DivergenceLogitsLoss
    return DivergenceLogitsLoss
