"""`logit_kd`: full-parameter logit distillation through ModelOpt's Megatron distillation.

The student is wrapped by `mtd.convert(..., mode="kd_loss")` with the teacher co-located in the
`DistillationModel`; ModelOpt's `LogitsKLLoss` gives the per-token KL([b, s]) between the
output layers, which we mask to the supervised tokens and blend with a CE anchor on the gold
answer:

    L = alpha_t * T^2 * mean_{t in supervised} KL_T(p_teacher || p_student)
        + (1 - alpha_t) * CE(gold answer tokens)

The CE anchor keeps the answer token pinned to the gold label while the KL term transfers the
teacher's full distribution; alpha may warm up linearly from 0 so an untrained-looking pruned
student first re-learns the answer before chasing the teacher's soft targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillscale.config import DistillConfig
from distillscale.models.megatron_gpt import causal_mask, forward_logits
from distillscale.teacher.supervision import supervision_batch
from distillscale.tokenizer import PromptEncoder
from distillscale.train.loop import train


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, (step + 1) / warmup_steps)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def make_kd_model(student, teacher, cfg: DistillConfig):
    """Wrap `student` with ModelOpt's Megatron distillation (teacher inside, frozen)."""
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import (
        DistillationConfig,
        LogitsKLLoss,
        adjust_distillation_model_for_mcore,
        setup_distillation_config,
    )

    reverse = cfg.loss.kind == "reverse_kl"
    criterion = {
        ("output_layer", "output_layer"): LogitsKLLoss(
            student.config, temperature=cfg.loss.temperature, reverse=reverse
        )
    }
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
) -> tuple[object, list[dict]]:
    """Distill `teacher` into `student` in place; returns (plain student, history)."""
    kd = make_kd_model(student, teacher, cfg)
    t2 = cfg.loss.temperature**2
    sup = supervision_batch(encoder, train_rows, cfg.supervision)

    def loss_fn(idx: np.ndarray, step: int):
        tokens = sup.tokens[idx]
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        logits = kd(tokens, pos, causal_mask(s))  # student logits [b, s, v]; teacher runs inside
        kl_mask = sup.kd_mask[idx]

        def reduce(loss_tuple):
            per_token, _tp_reduce, _sp = loss_tuple  # ModelOpt returns (loss[b, s], tp, sp)
            return masked_mean(per_token, kl_mask)

        losses = kd.compute_kd_loss(loss_reduction_fn=reduce, skip_balancer=True)
        kl = sum(losses.values()) * t2
        alpha = alpha_at(step, cfg.loss.alpha, cfg.loss.alpha_warmup_steps)
        loss = alpha * kl
        if alpha < 1.0:
            ce = F.cross_entropy(
                logits.float().flatten(0, 1), sup.targets[idx].flatten(), reduction="none"
            ).view(b, s)
            loss = loss + (1 - alpha) * masked_mean(ce, sup.answer_mask[idx])
        return loss, {"kl": float(kl.detach()), "alpha": alpha}

    params = [p for p in kd.parameters() if p.requires_grad]
    result = train(kd, params, loss_fn, len(train_rows), cfg.train, seed, checkpoint, desc, eval_fn)
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
