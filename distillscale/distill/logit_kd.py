"""`logit_kd`: full-parameter logit distillation through ModelOpt's Megatron distillation.

The student is wrapped by `mtd.convert(..., mode="kd_loss")` with the teacher co-located in the
`DistillationModel`; the criterion on the output layers gives the per-token divergence [b, s]
(ModelOpt's `LogitsKLLoss` for forward / reverse KL; `losses.divergence_logits_loss`, a
ModelOpt `BaseLoss`, for JSD and for the token-chunked memory-safe variants), which is
masked to the supervised tokens and blended with a CE anchor on the gold answer
(`losses.blended_cot_loss` has the formula and why the anchor matters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillscale.config import DistillConfig
from distillscale.distill.losses import (  # noqa: F401  (alpha_at, masked_mean re-exported)
    alpha_at,
    answer_ce,
    blend,
    divergence_logits_loss,
    masked_mean,
    per_sequence_mean,
)
from distillscale.models.megatron_gpt import causal_mask, forward_logits
from distillscale.teacher.supervision import supervision_batch
from distillscale.tokenizer import PromptEncoder
from distillscale.train.loop import train


def make_kd_model(student, teacher, cfg: DistillConfig):
    """Wrap `student` with ModelOpt's Megatron distillation (teacher inside, frozen)."""
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import (
        DistillationConfig,
        LogitsKLLoss,
        adjust_distillation_model_for_mcore,
        setup_distillation_config,
    )

    if cfg.loss.kind == "jsd" or cfg.loss.chunk_tokens > 0:
        loss = divergence_logits_loss(student.config, cfg.loss.kind, cfg.loss.temperature,
                                      cfg.loss.chunk_tokens)
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
    import modelopt.torch.distill as mtd

    student = mtd.export(kd_model)
    # `adjust_distillation_model_for_mcore` (ModelOpt 0.47) binds forward / loss / PP helpers on
    # the instance; `mtd.export` restores the class but leaves those bindings, whose forward
    # then looks for the removed teacher. Drop them so the class methods apply again.
    for name in ("forward", "sharded_state_dict", "compute_language_model_loss",
                 "set_student_input_tensor_shape", "set_input_tensor"):
        student.__dict__.pop(name, None)
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
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return per_sequence_mean(vocab_parallel_cross_entropy(logits.float(), targets), mask)


def _tp_size() -> int:
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
) -> tuple[object, list[dict]]:
    """Distill `teacher` into `student` in place; returns (plain student, history)."""
    kd = make_kd_model(student, teacher, cfg)
    t2 = cfg.loss.temperature**2
    sup = supervision_batch(encoder, train_rows, cfg.supervision)
    kl_masks = kl_mask_for(sup, cfg.supervision)

    def loss_fn(idx: np.ndarray, step: int):
        tokens = sup.tokens[idx]
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        logits = kd(tokens, pos, causal_mask(s))  # student logits [b, s, v]; teacher runs inside
        kl_mask = kl_masks[idx]

        def reduce(loss_tuple):
            per_token, tp_reduce, _sp = loss_tuple  # ModelOpt returns (loss[b, s], tp, sp)
            if tp_reduce and _tp_size() > 1:
                # Each TP rank holds a vocabulary shard's partial sum: the value is the sum over
                # ranks, the gradient only this rank's term (the cross-shard terms already flow
                # through the criterion's all-reduced softmax normaliser). A differentiable
                # all-reduce here would multiply every gradient by the TP size.
                import torch.distributed as dist
                from megatron.core import parallel_state

                total = per_token.detach().clone()
                dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
                per_token = per_token + (total - per_token.detach())
            return per_sequence_mean(per_token, kl_mask)

        losses = kd.compute_kd_loss(loss_reduction_fn=reduce, skip_balancer=True)
        kl = sum(losses.values()) * t2
        alpha = alpha_at(step, cfg.loss.alpha, cfg.loss.alpha_warmup_steps)
        ce = _answer_ce(logits, sup.targets[idx], sup.answer_mask[idx]) if alpha < 1.0 else None
        logs = {"kl": float(kl.detach()), "alpha": alpha}
        if ce is not None:
            logs["ce"] = float(ce.detach())
        return blend(kl, ce, alpha), logs

    params = [p for p in kd.parameters() if p.requires_grad]
    result = train(kd, params, loss_fn, len(train_rows), cfg.train, seed, checkpoint, desc, eval_fn,
                   tensorboard_dir=tensorboard_dir)
    return unwrap_student(kd), result.history


@torch.no_grad()
def answer_kl(student, teacher, encoder: PromptEncoder, rows: list[dict], batch_size: int = 256) -> float:
    """Mean KL(p_teacher || p_student) at the answer position over `rows` (T=1, full vocab)."""
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = encoder.encode(rows[i : i + batch_size])
        ar = torch.arange(len(b.answer_pos))
        lt = forward_logits(teacher, b.tokens)[ar, b.answer_pos].float().log_softmax(-1)
        ls = forward_logits(student, b.tokens)[ar, b.answer_pos].float().log_softmax(-1)
        total += F.kl_div(ls, lt, reduction="sum", log_target=True).item()
        n += len(ar)
    return total / max(n, 1)
