"""`logit_kd`: full-parameter logit distillation through ModelOpt's Megatron distillation.

The student is wrapped by `mtd.convert(..., mode="kd_loss")` with the teacher co-located in the
`DistillationModel`; the criterion on the output layers gives the per-token divergence [b, s]
(ModelOpt's `LogitsKLLoss` for forward / reverse KL; `losses.divergence_logits_loss`, a
ModelOpt `BaseLoss`, for JSD and for the token-chunked memory-safe variants), which is
masked to the supervised tokens and blended with a CE anchor on the gold answer
(`losses.blended_cot_loss` has the formula and why the anchor matters).

`distill.teacher_logits=cache`: the student trains against the teacher stage's top-k logit
cache instead (`find_logit_cache`, `CachedTeacher`, `losses.cached_topk_kl`), a plain student
forward with no teacher in memory. Teacher and student padded to different vocabulary sizes
are compared on the real tokenizer range (`aligned_vocab`, `losses.align_vocab`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distillscale.compat.cpu import restore_student_methods
from distillscale.config import DistillConfig
from distillscale.distill.fused_kd import FusedHeadKD
from distillscale.distill.losses import (  # noqa: F401  (alpha_at, masked_mean re-exported)
    VocabMismatchError,
    alpha_at,
    answer_ce,
    blend,
    cached_topk_kl,
    divergence_logits_loss,
    masked_mean,
    per_sequence_mean,
    real_vocab_size,
)
from distillscale.manifest import read_manifest
from distillscale.models.megatron_gpt import causal_mask, forward_logits, logits_at
from distillscale.teacher.logit_cache import LogitCache, fingerprint_path
from distillscale.teacher.stage import cache_root, teacher_model_dir
from distillscale.teacher.supervision import supervision_batch
from distillscale.tokenizer import PromptEncoder, load_tokenizer
from distillscale.train.loop import train


def make_kd_model(student, teacher, cfg: DistillConfig, real_vocab: int | None = None):
    """Wrap `student` with ModelOpt's Megatron distillation (teacher inside, frozen).

    `real_vocab`: the two models are padded to different vocabulary sizes; the criterion then
    compares them on the real tokenizer range (`losses.align_vocab`)."""
    # heavy: ModelOpt, only where a model is pruned or distilled
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import (
        DistillationConfig,
        LogitsKLLoss,
        adjust_distillation_model_for_mcore,
        setup_distillation_config,
    )

    if cfg.loss.kind == "jsd" or cfg.loss.chunk_tokens > 0 or real_vocab is not None:
        loss = divergence_logits_loss(student.config, cfg.loss.kind, cfg.loss.temperature,
                                      cfg.loss.chunk_tokens, real_vocab)
    else:  # ModelOpt's own KL (full-vocabulary fp32 per micro-batch)
        loss = LogitsKLLoss(student.config, temperature=cfg.loss.temperature,
                            reverse=cfg.loss.kind == "reverse_kl")
    criterion = {("output_layer", "output_layer"): loss}
    dcfg = DistillationConfig(
        skip_lm_loss=True, logit_kl_temperature=cfg.loss.temperature, criterion=criterion
    )
    dcfg = setup_distillation_config(dcfg, student.config, teacher.config)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    kd = mtd.convert(
        student,
        mode=[("kd_loss", {"teacher_model": teacher, "criterion": dcfg.criterion,
                           "loss_balancer": dcfg.loss_balancer})],
    )
    adjust_distillation_model_for_mcore(kd, dcfg)
    return kd


def unwrap_student(kd_model):
    """Back to a plain student GPTModel (teacher and hooks removed)."""
    # heavy: ModelOpt, only where a model is pruned or distilled
    import modelopt.torch.distill as mtd

    student = mtd.export(kd_model)
    restore_student_methods(student)
    return student


def kl_mask_for(sup, supervision: str) -> torch.Tensor:
    """Tokens the divergence covers: the trace for `blended_cot` (the answer is anchored by CE
    there), trace + answer for every other format (for `label`: the answer token alone)."""
    return sup.trace_mask if supervision == "blended_cot" else sup.kd_mask


def _answer_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`losses.answer_ce`; under TP the logits are vocabulary shards, so Megatron's
    vocab-parallel cross entropy computes the same value without gathering them."""
    if _tp_size() == 1:
        return answer_ce(logits, targets, mask)
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return per_sequence_mean(vocab_parallel_cross_entropy(logits.float(), targets), mask)


def _tp_size() -> int:
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def distill(
    student,
    teacher,
    encoder: PromptEncoder,
    train_rows: list[dict],
    cfg: DistillConfig,
    seed: int,
    checkpoint: Path,
    desc: str,
    eval_fn=None,
    tensorboard_dir: Path | None = None,
    cached: CachedTeacher | None = None,
    real_vocab: int | None = None,
) -> tuple[object, list[dict]]:
    """Distill `teacher` into `student` in place; returns (plain student, history).

    With `cached` (a `CachedTeacher` over `train_rows`) the student trains against the teacher's
    cached top-k and `teacher` may be None. `real_vocab`: teacher and student are padded to
    different vocabulary sizes; both are compared on the first `real_vocab` ids.
    """
    t2 = cfg.loss.temperature**2
    sup = supervision_batch(encoder, train_rows, cfg.supervision)
    kl_masks = kl_mask_for(sup, cfg.supervision)
    fused = None
    if cached is not None:
        cached.check_spans(sup)
        # ModelOpt's DistillationModel runs a live teacher module inside the student's forward
        # and its criteria compare two logit tensors; a cached top-k is neither. So the cached
        # path is a plain student forward and `losses.cached_topk_kl` over the same KL mask,
        # temperature and CE anchor as the online path. The teacher is never in memory.
        model = student
    elif cfg.loss.implementation == "fused_head":
        fused = FusedHeadKD(student, teacher, cfg.loss, real_vocab)  # no DistillationModel
        model = student
    else:
        model = make_kd_model(student, teacher, cfg, real_vocab)

    def loss_fn(idx: np.ndarray, step: int):
        tokens = sup.tokens[idx]
        b, s = tokens.shape
        kl_mask = kl_masks[idx]
        alpha = alpha_at(step, cfg.loss.alpha, cfg.loss.alpha_warmup_steps)
        ce = None
        if fused is not None:
            kl, ce = fused(tokens, kl_mask, sup.targets[idx], sup.answer_mask[idx], alpha < 1.0)
        elif cached is not None:
            logits = forward_logits(model, tokens)  # [b, s, v], gathered over TP
            if real_vocab is not None:
                logits = logits[..., :real_vocab]
            kl = cached.kl(logits, idx, cfg.loss.temperature, kl_mask) * t2
        else:
            pos = torch.arange(s).unsqueeze(0).expand(b, s)
            logits = model(tokens, pos, causal_mask(s))  # student logits; teacher runs inside
            if real_vocab is not None:
                logits = logits[..., :real_vocab]

            def reduce(loss_tuple):
                per_token, tp_reduce, _sp = loss_tuple  # ModelOpt returns (loss[b, s], tp, sp)
                if tp_reduce and _tp_size() > 1:
                    # Each TP rank holds a vocabulary shard's partial sum: the value is the sum
                    # over ranks, the gradient only this rank's term (the cross-shard terms
                    # already flow through the criterion's all-reduced softmax normaliser). A
                    # differentiable all-reduce here would multiply every gradient by the TP size.
                    from megatron.core import parallel_state

                    total = per_token.detach().clone()
                    dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
                    per_token = per_token + (total - per_token.detach())
                return per_sequence_mean(per_token, kl_mask)

            losses = model.compute_kd_loss(loss_reduction_fn=reduce, skip_balancer=True)
            kl = sum(losses.values()) * t2
        if alpha < 1.0 and fused is None:  # the cached path's logits are gathered over TP
            ce = (answer_ce if cached is not None else _answer_ce)(
                logits, sup.targets[idx], sup.answer_mask[idx])
        logs = {"kl": float(kl.detach()), "alpha": alpha}
        if fused is not None:  # an int: kept in the history, not averaged over micro-batches
            logs["forward_tokens"], logs["batch_tokens"] = fused.forward_tokens, tokens.numel()
        if ce is not None:
            logs["ce"] = float(ce.detach())
        return blend(kl, ce, alpha), logs

    params = [p for p in model.parameters() if p.requires_grad]
    result = train(model, params, loss_fn, len(train_rows), cfg.train, seed, checkpoint, desc,
                   eval_fn, tensorboard_dir=tensorboard_dir)
    plain = cached is not None or fused is not None
    return (model if plain else unwrap_student(model)), result.history


# ---------------------------------------------------------------------------------------------
# Cached teacher logits
# ---------------------------------------------------------------------------------------------


class LogitCacheMissingError(FileNotFoundError):
    """The configured logit cache does not exist or does not cover the training rows."""


def _missing(fmt: str, what: str) -> LogitCacheMissingError:
    return LogitCacheMissingError(
        f"distill.teacher_logits=cache: {what}; run the teacher stage with "
        f"teacher.supervision.cache.formats including {fmt}")


def find_logit_cache(supervision_manifest: dict | None, cache_root: Path, fmt: str,
                     teacher_fingerprint: str | None = None):
    """The complete `LogitCache` the supervision stage built for format `fmt`.

    The supervision manifest names each format's cache key; the cache itself must be complete
    and made by this teacher (its index records the teacher fingerprint)."""
    caches = ((supervision_manifest or {}).get("metrics") or {}).get("caches") or {}
    entry = caches.get(fmt)
    if not entry or "key" not in entry:
        have = sorted(k for k, v in caches.items() if isinstance(v, dict) and "key" in v)
        why = entry.get("error") if isinstance(entry, dict) and entry.get("error") else None
        raise _missing(fmt, f"the supervision stage has no logit cache for format {fmt!r} "
                       f"(cached formats: {have or 'none'}" + (f"; {why}" if why else "") + ")")
    cache = LogitCache(cache_root, entry["key"])
    if not cache.complete:
        raise _missing(fmt, f"logit cache {cache.path} (format {fmt!r}, key {entry['key']}) is "
                       "missing or incomplete (no index.json)")
    made_by = cache.index().get("teacher")
    if teacher_fingerprint is not None and made_by not in (None, teacher_fingerprint):
        raise _missing(fmt, f"logit cache {cache.path} was made by teacher {made_by}, not "
                       f"this teacher ({teacher_fingerprint})")
    return cache


def load_cached_teacher(cfg, supervision_dir: Path, teacher_dir: Path,
                        train_rows: list[dict]) -> CachedTeacher:
    """The teacher stage's logit cache of `cfg.distill.supervision` over `train_rows`."""
    fmt = cfg.distill.supervision
    cache = find_logit_cache(read_manifest(Path(supervision_dir)), cache_root(cfg), fmt,
                             fingerprint_path(teacher_model_dir(cfg, Path(teacher_dir))))
    return CachedTeacher(cache, train_rows, fmt)


class CachedTeacher:
    """A logit cache's entries for the training rows, flattened per supervised token.

    Row i of `train_rows` covers the cache's positions [start, start + n) of that row, which
    are the row's KD positions in `supervision_batch` (checked by `check_spans`)."""

    def __init__(self, cache, train_rows: list[dict], fmt: str):
        loaded = cache.load()
        ids = [r.get("id") for r in train_rows]
        missing = [i for i in ids if i not in loaded]
        if missing:
            raise _missing(fmt, f"logit cache {cache.path} (format {fmt!r}) has no entry for "
                           f"{len(missing)} of {len(ids)} training rows (first: {missing[:3]})")
        entries = [loaded[i] for i in ids]
        self.fmt, self.path, self.row_ids = fmt, cache.path, ids
        self.starts = np.array([e.start for e in entries], dtype=np.int64)
        self.counts = np.array([len(e.ids) for e in entries], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.ids = torch.from_numpy(np.concatenate([e.ids for e in entries])).long()
        self.logprobs = torch.from_numpy(np.concatenate([e.logprobs for e in entries]))
        self.tail = torch.from_numpy(np.concatenate([e.tail_logprob for e in entries]))
        sampled = entries[0].tail_ids is not None
        self.tail_ids = torch.from_numpy(np.concatenate(
            [e.tail_ids for e in entries])).long() if sampled else None
        self.tail_logprobs = torch.from_numpy(np.concatenate(
            [e.tail_sample_logprobs for e in entries])) if sampled else None

    def check_spans(self, sup) -> None:
        """Every row's cached positions must be exactly its KD positions in this batch."""
        kd = sup.kd_mask > 0
        for i, rid in enumerate(self.row_ids):
            cols = torch.nonzero(kd[i]).flatten()
            lo = int(cols.min()) if len(cols) else -1
            if lo != self.starts[i] or len(cols) != self.counts[i]:
                raise _missing(self.fmt, (
                    f"logit cache {self.path} (format {self.fmt!r}) row {rid!r} covers positions "
                    f"{self.starts[i]}..{self.starts[i] + self.counts[i] - 1}, training "
                    f"supervises {lo}..{lo + len(cols) - 1} (rows changed since the cache was built)"))

    def kl(self, logits: torch.Tensor, idx: np.ndarray, temperature: float,
           kl_mask: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean KL_T(cached teacher || student) over `kl_mask` (no T^2)."""
        b, s = logits.shape[:2]
        rows = np.repeat(np.arange(len(idx)), self.counts[idx])
        cols = np.concatenate([np.arange(st, st + n) for st, n in
                               zip(self.starts[idx], self.counts[idx])])
        flat = torch.from_numpy(np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1])
                                                for i in idx]))
        r, c = torch.from_numpy(rows), torch.from_numpy(cols)
        per = cached_topk_kl(
            logits[r, c], self.ids[flat], self.logprobs[flat], self.tail[flat], temperature,
            None if self.tail_ids is None else self.tail_ids[flat],
            None if self.tail_logprobs is None else self.tail_logprobs[flat])
        per_token = torch.zeros(b, s, dtype=per.dtype).index_put((r, c), per)
        return per_sequence_mean(per_token, kl_mask)


# ---------------------------------------------------------------------------------------------
# Vocabulary alignment
# ---------------------------------------------------------------------------------------------


def aligned_vocab(teacher_tokenizer, student_dir: Path | None, teacher_vocab: int,
                  student_vocab: int) -> int | None:
    """None when teacher and student have the same padded vocabulary; otherwise the real
    tokenizer range both are compared on. Either way the student's own tokenizer (its HF
    export's, when it has one) must be the teacher's: a real mismatch raises."""
    student_tokenizer = None
    hf = Path(student_dir) / "hf" if student_dir is not None else None
    if hf is not None and (hf / "tokenizer_config.json").is_file():
        student_tokenizer = load_tokenizer(hf)
    try:
        real = real_vocab_size(teacher_tokenizer, student_tokenizer)
    except VocabMismatchError as e:
        raise VocabMismatchError(f"{hf}: {e}") from None
    if student_vocab == teacher_vocab:
        return None
    for who, v in (("teacher", teacher_vocab), ("student", student_vocab)):
        if v < real:
            raise VocabMismatchError(
                f"{who} has {v} output logits, fewer than the tokenizer's {real} tokens")
    return real


# Mask kind of `masked_logprobs` / `masked_kl`: the one position per row predicting the class
# name's (first) token. Any other kind is a supervision format: the tokens its divergence covers.
ANSWER = "answer"


@torch.no_grad()
def masked_logprobs(model, encoder: PromptEncoder, rows: list[dict], mask: str = ANSWER,
                    batch_size: int | None = None, real_vocab: int | None = None):
    """Log-probabilities (T=1; the first `real_vocab` ids) at the tokens `mask` selects.

    `answer`: one [rows, V] tensor at the answer position (batches of 256). A supervision
    format: per row, [n, V] at the tokens the format's divergence covers (`kl_mask_for`: trace
    + answer, the trace alone for blended CoT; batches of 64)."""
    if mask == ANSWER:
        out = []
        step = batch_size or 256
        for i in range(0, len(rows), step):
            b = encoder.encode(rows[i : i + step])
            logits = logits_at(model, b.tokens, b.answer_pos)
            if real_vocab is not None:
                logits = logits[..., :real_vocab]
            out.append(logits.float().log_softmax(-1))
        return torch.cat(out)
    per_row = []
    step = batch_size or 64
    for i in range(0, len(rows), step):
        sup = supervision_batch(encoder, rows[i : i + step], mask)
        logits = forward_logits(model, sup.tokens)
        if real_vocab is not None:
            logits = logits[..., :real_vocab]
        lp = logits.float().log_softmax(-1)
        keep = kl_mask_for(sup, mask) > 0
        per_row += [lp[j][keep[j]] for j in range(len(lp))]
    return per_row


@torch.no_grad()
def masked_kl(student, teacher, encoder: PromptEncoder, rows: list[dict], mask: str = ANSWER,
              batch_size: int | None = None, real_vocab: int | None = None) -> float:
    """Mean KL(p_teacher || p_student) per token `mask` selects over `rows` (T=1): at the
    answer position, or (a supervision format) over the tokens that format's distillation
    minimises, on held-out rows. `teacher` is a model or its `masked_logprobs` (computed once,
    so the teacher need not stay in memory while a student trains from the logit cache)."""
    given = isinstance(teacher, list if mask != ANSWER else torch.Tensor)
    lt = teacher if given else masked_logprobs(teacher, encoder, rows, mask, batch_size,
                                               real_vocab)
    ls = masked_logprobs(student, encoder, rows, mask, batch_size, real_vocab)
    if mask == ANSWER:
        if ls.shape != lt.shape:
            raise VocabMismatchError(f"teacher answer log-probs {tuple(lt.shape)} and student "
                                     f"{tuple(ls.shape)} differ: pass real_vocab")
        return F.kl_div(ls, lt, reduction="sum", log_target=True).item() / max(len(rows), 1)
    total = sum(F.kl_div(s, t, reduction="sum", log_target=True).item() for s, t in zip(ls, lt))
    return total / max(sum(len(t) for t in lt), 1)


# The names the stages call today, as the `answer` and per-format cases of the pair above.
def answer_logprobs(model, encoder: PromptEncoder, rows: list[dict], batch_size: int = 256,
                    real_vocab: int | None = None) -> torch.Tensor:
    return masked_logprobs(model, encoder, rows, ANSWER, batch_size, real_vocab)


def answer_kl(student, teacher, encoder: PromptEncoder, rows: list[dict], batch_size: int = 256,
              real_vocab: int | None = None) -> float:
    return masked_kl(student, teacher, encoder, rows, ANSWER, batch_size, real_vocab)


def supervised_logprobs(model, encoder: PromptEncoder, rows: list[dict], fmt: str,
                        batch_size: int = 64, real_vocab: int | None = None) -> list[torch.Tensor]:
    return masked_logprobs(model, encoder, rows, fmt, batch_size, real_vocab)


def supervised_kl(student, teacher, encoder: PromptEncoder, rows: list[dict], fmt: str,
                  real_vocab: int | None = None) -> float:
    return masked_kl(student, teacher, encoder, rows, fmt, real_vocab=real_vocab)


def mask_token_counts(encoder: PromptEncoder, rows: list[dict], fmt: str) -> dict[str, int]:
    """Tokens under each mask of format `fmt` over `rows`, and which of them the KL and CE terms
    cover (the manifest's record of what the blended loss was computed on)."""
    sup = supervision_batch(encoder, rows, fmt)
    kl = kl_mask_for(sup, fmt)
    return {"prompt": int(sup.prompt_mask.sum()), "trace": int(sup.trace_mask.sum()),
            "answer": int(sup.answer_mask.sum()), "kl_term": int(kl.sum()),
            "kl_term_trace": int((kl * sup.trace_mask).sum()),
            "kl_term_answer": int((kl * sup.answer_mask).sum()),
            "ce_term": int(sup.answer_mask.sum())}
