"""`lora_kd`: the same distillation losses, training LoRA adapters only (peft), merged for export.

CPU / HF path: the pruned student is exported to an HF checkpoint (Megatron-Bridge), loaded with
`transformers`, wrapped with peft LoRA on every attention and MLP projection, and trained against
the HF teacher with `losses.blended_cot_loss` (token-chunked, fp32). The base weights are frozen;
at the end the adapters are merged (`merge_and_unload`) and the merged model is loaded back into
Megatron through Megatron-Bridge, so the rest of the pipeline (checkpoint, HF export, eval) is the
same as for `logit_kd`.

GPU path (not run here): Megatron-Bridge's own LoRA (`megatron.bridge.peft.lora.LoRA`) on the
Megatron model; on CPU it needs `megatron.bridge.peft.utils.HAVE_TE = False`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from distillscale.compat.cpu import activate
from distillscale.config import DistillConfig
from distillscale.distill.logit_kd import kl_mask_for
from distillscale.distill.losses import align_vocab, alpha_at, answer_ce, blend, blended_cot_loss
from distillscale.models.hf_io import load_hf, save_hf
from distillscale.teacher.supervision import supervision_batch
from distillscale.tokenizer import PromptEncoder
from distillscale.train.loop import train

# Llama-family projection names (what Megatron-Bridge exports).
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(hf_model, rank: int, alpha: float, dropout: float = 0.0):
    """`hf_model` wrapped with peft LoRA adapters; only adapter weights are trainable."""
    activate()  # on CPU, peft must not dispatch to the transformer-engine import stub
    # heavy: peft, only for LoRA distillation
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=HF_LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(hf_model, cfg)


def distill_lora_hf(
    student_hf,
    teacher_hf,
    encoder: PromptEncoder,
    train_rows: list[dict],
    cfg: DistillConfig,
    seed: int,
    checkpoint: Path,
    desc: str,
    tensorboard_dir: Path | None = None,
    cached=None,
    real_vocab: int | None = None,
):
    """Train LoRA adapters on `student_hf` (a transformers causal LM) against `teacher_hf`.

    Returns (peft model with trained adapters, history). The KL covers the same tokens as in
    `logit_kd` (`kl_mask_for`), with the same alpha / temperature / warm-up. With `cached` (a
    `logit_kd.CachedTeacher`) the teacher's cached top-k replaces `teacher_hf` (None then);
    `real_vocab` aligns differently padded vocabularies as in `logit_kd`.
    """
    if cached is None:
        for p in teacher_hf.parameters():
            p.requires_grad_(False)
        teacher_hf.eval()
    peft_model = add_lora(student_hf, cfg.lora_rank, cfg.lora_alpha)
    sup = supervision_batch(encoder, train_rows, cfg.supervision)
    kl_masks = kl_mask_for(sup, cfg.supervision)
    chunk = cfg.loss.chunk_tokens or 256
    if cached is not None:
        cached.check_spans(sup)

    def loss_fn(idx: np.ndarray, step: int):
        tokens = sup.tokens[idx]
        s_logits = peft_model(input_ids=tokens).logits
        alpha = alpha_at(step, cfg.loss.alpha, cfg.loss.alpha_warmup_steps)
        if cached is not None:
            if real_vocab is not None:
                s_logits = s_logits[..., :real_vocab]
            kl = cached.kl(s_logits, idx, cfg.loss.temperature, kl_masks[idx])
            kl = kl * cfg.loss.temperature**2
            ce = answer_ce(s_logits, sup.targets[idx], sup.answer_mask[idx]) if alpha < 1 else None
            logs = {"kl": float(kl.detach()), "alpha": alpha}
            if ce is not None:
                logs["ce"] = float(ce.detach())
            return blend(kl, ce, alpha), logs
        with torch.no_grad():
            t_logits = teacher_hf(input_ids=tokens).logits
        if real_vocab is not None:
            s_logits, t_logits = align_vocab(s_logits, t_logits, real_vocab)
        loss, logs = blended_cot_loss(
            s_logits, t_logits, sup.targets[idx], kl_masks[idx], sup.answer_mask[idx],
            alpha=alpha, temperature=cfg.loss.temperature, kind=cfg.loss.kind,
            chunk_tokens=chunk,
        )
        return loss, {**logs, "alpha": alpha}

    params = [p for p in peft_model.parameters() if p.requires_grad]
    result = train(peft_model, params, loss_fn, len(train_rows), cfg.train, seed, checkpoint,
                   desc, tensorboard_dir=tensorboard_dir)
    return peft_model, result.history


def lora_distill_megatron(student, arch, vocab: int, teacher_hf_dir: Path, tokenizer,
                          encoder: PromptEncoder, train_rows: list[dict], cfg: DistillConfig,
                          seed: int, checkpoint: Path, desc: str,
                          tensorboard_dir: Path | None = None, cached=None,
                          real_vocab: int | None = None):
    """`lora_kd` for a Megatron student: export -> LoRA KD in transformers -> merge -> back.

    Returns (merged Megatron GPTModel, history, adapter parameter count).
    """
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="lora-kd-") as tmp:
        save_hf(student, arch, vocab, Path(tmp) / "student")
        student_hf = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "student"),
                                                          dtype=torch.float32)
        # From the logit cache the teacher is never loaded.
        teacher_hf = None if cached is not None else AutoModelForCausalLM.from_pretrained(
            str(teacher_hf_dir), dtype=torch.float32)
        peft_model, history = distill_lora_hf(student_hf, teacher_hf, encoder, train_rows, cfg,
                                              seed, checkpoint, desc, tensorboard_dir,
                                              cached=cached, real_vocab=real_vocab)
        adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(Path(tmp) / "merged")
        if tokenizer is not None:
            tokenizer.save_pretrained(Path(tmp) / "merged")
        model, new_arch, new_vocab = load_hf(Path(tmp) / "merged")
    if (new_arch.num_layers, new_arch.hidden_size, new_arch.ffn_hidden_size, new_vocab) != (
            arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, vocab):
        raise RuntimeError(f"{desc}: merged LoRA student came back as {new_arch}, not {arch}")
    return model, history, adapters
