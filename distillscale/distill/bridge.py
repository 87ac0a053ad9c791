"""The GPU distillation path: Megatron-Bridge 0.6.2 + ModelOpt 0.47 Megatron distillation.

`distill.backend` picks the path (`select_backend`): `local` is our own loop on megatron-core
(distillscale/distill/logit_kd.py, lora_kd.py; the CPU default), `bridge` hands the student and
teacher to Megatron-Bridge, which builds them with the transformer-engine layer spec in bf16
with the TP / PP / sequence-parallel sizes of the config's `launch` section, co-locates the
teacher inside ModelOpt's `DistillationModel` (`convert_to_distillation_provider`) and trains
with its own `distill()` entry point (Megatron's `pretrain` loop: distributed optimizer,
`torch_dist` checkpoints, resume from the checkpoint folder). The result is exported to HF
through `AutoBridge`.

How our config maps (each mapping is a function below, and tests/distill/test_bridge_gpu_path.py
builds the real Bridge objects from it and checks the fields):

- models: the pruned student's and the teacher's HF exports (`<stage>/hf`, written by every
  stage) through `AutoBridge.from_hf_pretrained(...).to_megatron_provider(load_weights=True)`;
  `launch.tensor_parallel` / `pipeline_parallel` / `sequence_parallel` (SP only when TP > 1),
  bf16 params and `pipeline_dtype`. Teacher and student must share TP, PP, CP, seq length
  (`DistillationProvider.__post_init__` checks it).
- loss: `forward_kl` -> ModelOpt's own `LogitsKLLoss` at `loss.temperature` (built by
  `setup_distillation_config` from `logit_kl_temperature`); `reverse_kl` / `jsd`, token
  chunking, and padded vocabularies that differ -> our `DivergenceLogitsLoss`
  (distillscale/distill/losses.py, a ModelOpt `BaseLoss`), created on the last pipeline stage
  only, by a pre-wrap hook that runs after parallel state exists and before Bridge's KD
  conversion hook. `loss.alpha` < 1 -> the LM loss is kept (`skip_lm_loss=False`) and
  `kd_loss_scale = alpha / (1 - alpha)`: ModelOpt's balancer rescales the KD term to the LM
  loss's magnitude, then adds it with that weight, so the ratio of the two terms is the
  blend's. `loss.alpha` = 0 (CE only) is refused: the balancer always adds the KD term.
  Bridge's LM loss is CE over every completion token (trace and answer), not only the
  gold answer as in the local blended-CoT loss, and `alpha_warmup_steps` is not applied here.
- training: AdamW (Megatron's `adam` with decoupled weight decay, distributed optimizer), cosine
  decay from `lr` to `min_lr` after `warmup_steps` linear warm-up, `grad_clip`; `batch_size` is
  the global batch, `micro_batch = batch_size / (data_parallel x grad_accum_steps)` (Megatron
  derives the accumulation steps from global / (micro x DP)); `checkpoint_every` ->
  `save_interval`; checkpoints go to `<stage tmp>/checkpoints/bridge`, which is both `save`
  and `load`, so a requeued job resumes there. Bridge's exit-signal handler listens for the
  launchers' USR1 warning, checkpoints and returns; a run that returns before `steps` (read from
  Megatron's tracker file) exits with 75 like the local loop, so the job is requeued.
- data: the training rows (label or the teacher's traces) are written as prompt / completion
  JSONL in the experiment's prompt format (an HF teacher's chat template through the family
  adapter, with the task and the class list, as the supervision, the local path and the
  evaluation render it; the tiny family's for a scratch teacher) and read by Bridge's
  `GPTSFTDatasetConfig`, the loss on completion tokens only. The teacher always runs online (`teacher_logits: cache` is the
  local backend's).
- `lora_kd`: Bridge's LoRA (`megatron.bridge.peft.lora.LoRA`) with `lora_rank` / `lora_alpha`
  on the attention and MLP linears; the adapters are exported with `export_adapter_ckpt` and
  merged into the student's HF weights with peft.

What has and has NOT been verified (no GPU, no transformer-engine on the machines this was
written on):
- Verified on CPU: backend selection and its errors; the providers built by AutoBridge from
  real HF checkpoints with our parallel / precision fields; `convert_to_distillation_provider`
  (its TP / PP / seq-length consistency check included); the `ModelOptDistillConfig`,
  `TrainingConfig`, `OptimizerConfig`, `SchedulerConfig`, `CheckpointConfig`, `LoRA` and
  `ConfigContainer` objects and their fields; the SFT JSONL. Built through Bridge's own
  pre-wrap hooks at TP = PP = 1 on one gloo rank, bf16, with the local layer spec instead of TE
  (tests/distill/test_bridge_provider_cpu.py): both models' HF weights, one forward, Bridge's
  `loss_func_kd` and backward for forward KL, JSD, alpha < 1 and padded vocabularies (KD term,
  LM term and output-layer gradient match a computation from the two models' logits; no
  teacher gradient); LoRA + KD through Bridge's PEFT hook (adapters on the student's linears
  only, the teacher frozen and without adapters).
- Exported on CPU (tests/distill/test_bridge_export_cpu.py): a `torch_dist` checkpoint that
  Bridge's own `save_checkpoint` wrote from that model, through `export_in_fresh_process`
  (`export_ckpt`, and `export_adapter_ckpt` from the `iter_*` folder with the run's LoRA rank
  and alpha, merged with peft): HF logits equal the Megatron student's within 1e-4. The save
  needs `torch.cuda.get_rng_state` and the adapter export rebuilds with the TE spec, so the test
  stubs the first and switches the second to the local spec.
- NOT run: `distill()` itself (Megatron's `pretrain` needs NCCL and CUDA), the TE layer spec,
  bf16 training steps, TP / PP / SP, the checkpoint resume and the USR1 stop, an export of a
  TE-spec or TP / PP-sharded checkpoint. No step time, memory or accuracy figure exists for
  this path.
- Read in Bridge 0.6.2 (`models/distillation_provider.py`, `training/distill.py`,
  `training/post_training/distillation.py`): the teacher is co-located and built with the
  student's TP / PP (PP works: ModelOpt's criterion exists on the last stage only and the
  teacher's stages line up with the student's); virtual pipeline parallelism is rejected
  (`provide(vp_stage=...)` raises); the TE fused cross-entropy is switched to `native`
  (it overwrites logits in place). Vocabulary sizes are not checked by Bridge: teacher and
  student with different padded vocabularies are handled here by our criterion at TP = 1 and
  are an error at TP > 1 (each rank's vocabulary shard would cover different ids).
- LoRA + KD in Bridge 0.6.2: its PEFT pre-wrap hook is registered after the KD-conversion hook,
  so the adapters are applied to the `DistillationModel`, co-located teacher included; Bridge's
  default bare target names do wrap the teacher's linears, `MEGATRON_LORA_TARGETS` does not
  (checked on CPU with the local spec, whose module names are the TE spec's). Confirm the
  trainable parameter count in the log of the first GPU run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillscale.compat.cpu import activate, cuda_available
from distillscale.config import ConfigError, DistillConfig, ExperimentConfig, LossConfig
from distillscale.distill.losses import divergence_logits_loss
from distillscale.manifest import write_text_atomic, writer_path
from distillscale.tokenizer import BOS, PROMPT_HEAD, PROMPT_TAIL, THINK_CLOSE, THINK_OPEN
from distillscale.train import preemption

BACKENDS = ("auto", "local", "bridge")

# Megatron names of the linears LoRA wraps: fused QKV, attention output, SwiGLU up/gate, down.
# Anchored at the student's own decoder: Bridge's matcher (peft/module_matcher.py) accepts a
# bare leaf name anywhere in the tree, which also wraps the linears of ModelOpt's co-located
# `_teacher_model`; `wildcard_match` anchors the pattern at the start of the full name.
MEGATRON_LORA_TARGETS = ["decoder.layers.*.self_attention.linear_qkv",
                         "decoder.layers.*.self_attention.linear_proj",
                         "decoder.layers.*.mlp.linear_fc1", "decoder.layers.*.mlp.linear_fc2"]


def bridge_seed(seed: int) -> int:
    """Bridge's RNG seed for our `seed`: Bridge asserts a positive seed
    (training/initialize.py, `seed_ > 0`), our configs start at 0; +1 keeps seeds distinct."""
    return seed + 1


class BridgeUnavailableError(ConfigError):
    """`distill.backend=bridge` on a machine without CUDA or transformer-engine."""


# ----------------------------------------------------------------------------------- backend


def transformer_engine_available() -> bool:
    """True only for the real transformer-engine: the CPU compatibility layer installs an
    import-only stub under the same name (distillscale/compat/cpu.py), which must not count."""
    try:
        te = importlib.import_module("transformer_engine")
        importlib.import_module("transformer_engine.pytorch")
    # A wheel without its built torch extension raises FileNotFoundError (an OSError), not
    # ImportError (CPU-STACK notes).
    except (ImportError, OSError, RuntimeError):
        return False
    return not str(getattr(te, "__version__", "")).endswith("cpu-stub")


def select_backend(choice: str, *, cuda: bool | None = None, te: bool | None = None) -> str:
    """`local` or `bridge` for `distill.backend=choice`. Raises BridgeUnavailableError when
    `bridge` is forced without CUDA or transformer-engine."""
    if choice not in BACKENDS:
        raise ConfigError(f"distill.backend: unknown backend {choice!r} (one of {BACKENDS})")
    if choice == "local":
        return "local"
    cuda = cuda_available() if cuda is None else cuda
    te = transformer_engine_available() if te is None else te
    if choice == "auto":
        return "bridge" if cuda and te else "local"
    missing = [n for n, ok in (("a CUDA device", cuda), ("transformer_engine", te)) if not ok]
    if missing:
        raise BridgeUnavailableError(
            f"distill.backend=bridge needs {' and '.join(missing)}, not found here; run it in "
            "the NGC NeMo container on GPUs, or set distill.backend=local (or auto)")
    return "bridge"


# ---------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int
    pipeline_parallel: int
    sequence_parallel: bool
    data_parallel: int


def parallel_layout(cfg: ExperimentConfig, world_size: int) -> ParallelLayout:
    tp, pp = cfg.launch.tensor_parallel, cfg.launch.pipeline_parallel
    if world_size % (tp * pp):
        raise ConfigError(
            f"launch.tensor_parallel={tp} x launch.pipeline_parallel={pp} = {tp * pp} does not "
            f"divide WORLD_SIZE={world_size}")
    # Sequence parallelism splits along the TP group; with TP=1 there is nothing to split.
    return ParallelLayout(tp, pp, cfg.launch.sequence_parallel and tp > 1, world_size // (tp * pp))


def batch_sizes(train, data_parallel: int) -> tuple[int, int]:
    """(micro_batch_size, global_batch_size): `batch_size` examples per optimizer step over all
    data-parallel ranks, each rank running `grad_accum_steps` micro-batches."""
    per_step = data_parallel * train.grad_accum_steps
    if train.batch_size % per_step:
        raise ConfigError(
            f"distill.train.batch_size={train.batch_size} is not divisible by data_parallel "
            f"({data_parallel}) x distill.train.grad_accum_steps ({train.grad_accum_steps})")
    return train.batch_size // per_step, train.batch_size


def seq_length(cfg: ExperimentConfig) -> int:
    if cfg.distill.seq_length is not None:
        return cfg.distill.seq_length
    return cfg.teacher.arch.seq_length if cfg.teacher.arch is not None else 4096


def _bridge_imports():
    # On CPU, `import megatron.bridge` needs the import-only TE stub; on GPU this is a no-op.
    activate()


def model_provider(hf_dir: str | Path, layout: ParallelLayout, seq_len: int):
    """A Bridge GPT provider for an HF checkpoint, with our parallel sizes and bf16. Weights are
    loaded by the provider's own pre-wrap hook when the model is built (after parallel init)."""
    _bridge_imports()
    # heavy: torch / Megatron-Bridge, only when the Bridge builds the model
    import torch
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import transformer_engine_layer_spec

    provider = AutoBridge.from_hf_pretrained(str(hf_dir)).to_megatron_provider(load_weights=True)
    # Explicit, not the provider's default: the GPU path is the TE spec (fused layer-norm linears,
    # TE attention) that ModelOpt's distillation and Minitron plugins are written for.
    provider.transformer_layer_spec = transformer_engine_layer_spec
    provider.tensor_model_parallel_size = layout.tensor_parallel
    provider.pipeline_model_parallel_size = layout.pipeline_parallel
    provider.sequence_parallel = layout.sequence_parallel
    provider.context_parallel_size = 1
    provider.seq_length = seq_len
    provider.bf16, provider.fp16 = True, False
    provider.params_dtype = torch.bfloat16
    provider.pipeline_dtype = torch.bfloat16
    return provider


def needs_own_criterion(loss: LossConfig, vocab_differs: bool) -> bool:
    """ModelOpt's LogitsKLLoss covers plain forward KL on equal vocabularies; everything else is
    our `DivergenceLogitsLoss`."""
    return loss.kind != "forward_kl" or loss.chunk_tokens > 0 or vocab_differs


def kd_config(loss: LossConfig):
    """ModelOpt's distillation config for our loss section (the criterion itself is created on
    the right pipeline stage by `criterion_hook` when our loss is needed)."""
    _bridge_imports()
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.training.post_training.distillation import ModelOptDistillConfig

    if loss.alpha == 0:
        # ModelOpt 0.47 asserts kd_loss_scale > 0 (DistillationConfig.__post_init__) and its
        # balancer always adds the KD term (`original_loss + kd_loss * kd_loss_scale`): CE alone
        # has no mapping here (a scale of 1 would be an equal KD : CE blend).
        raise ConfigError("distill.loss.alpha=0 (CE only, no distillation term) cannot be "
                          "expressed by ModelOpt's loss balancer on distill.backend=bridge; use "
                          "distill.backend=local or loss.alpha > 0")
    keep_lm = loss.alpha < 1.0
    return ModelOptDistillConfig(
        logit_layers=("output_layer", "output_layer"),
        skip_lm_loss=not keep_lm,
        kd_loss_scale=loss.alpha / (1.0 - loss.alpha) if keep_lm else 1.0,
        logit_kl_temperature=loss.temperature,
    )


def criterion_hook(kd_cfg, student_provider, loss: LossConfig, real_vocab: int | None):
    """A pre-wrap hook that puts our criterion into `kd_cfg` once parallel state exists: only the
    last pipeline stage has the output layer (ModelOpt's own setup does the same)."""

    def hook(model_chunks):
        # heavy: megatron-core, only where a Megatron model is built or run
        from megatron.core import parallel_state

        if parallel_state.is_pipeline_last_stage():
            kd_cfg.criterion = {("output_layer", "output_layer"): divergence_logits_loss(
                student_provider, loss.kind, loss.temperature, loss.chunk_tokens, real_vocab)}
        else:
            kd_cfg.criterion = {}
        return model_chunks

    hook.distillscale_criterion = True  # so the hook list can be inspected
    return hook


def distillation_provider(student_hf: str | Path, teacher_hf: str | Path, cfg: ExperimentConfig,
                          layout: ParallelLayout):
    """Bridge's DistillationProvider: the student provider converted in place, the teacher
    co-located. Raises ConfigError on a vocabulary difference it cannot align."""
    _bridge_imports()
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.models.distillation_provider import convert_to_distillation_provider

    n = seq_length(cfg)
    student = model_provider(student_hf, layout, n)
    teacher = model_provider(teacher_hf, layout, n)
    real_vocab = None
    if student.vocab_size != teacher.vocab_size:
        if layout.tensor_parallel > 1:
            raise ConfigError(
                f"{student_hf}: student vocabulary {student.vocab_size} != teacher's "
                f"{teacher.vocab_size}: aligning padded vocabularies needs launch.tensor_parallel=1")
        real_vocab = _tokenizer_size(teacher_hf)
        if real_vocab > min(student.vocab_size, teacher.vocab_size):
            raise ConfigError(
                f"{student_hf}: tokenizer has {real_vocab} ids, more than the smaller "
                f"vocabulary ({min(student.vocab_size, teacher.vocab_size)})")
    kd = kd_config(cfg.distill.loss)
    provider = convert_to_distillation_provider(student, teacher, kd)
    if needs_own_criterion(cfg.distill.loss, real_vocab is not None):
        # Prepended: it must run before the KD-conversion hook reads kd_config.criterion.
        provider.register_pre_wrap_hook(
            criterion_hook(kd, provider, cfg.distill.loss, real_vocab), prepend=True)
    return provider


def _tokenizer_size(hf_dir: str | Path) -> int:
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(hf_dir)))


def lora_peft(distill: DistillConfig):
    _bridge_imports()
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.peft.lora import LoRA

    return LoRA(target_modules=list(MEGATRON_LORA_TARGETS), dim=distill.lora_rank,
                alpha=round(distill.lora_alpha))


def optimizer_and_scheduler(train):
    _bridge_imports()
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.training.config import OptimizerConfig, SchedulerConfig

    optimizer = OptimizerConfig(
        optimizer="adam",  # Megatron's Adam applies decoupled weight decay: AdamW
        lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=train.grad_clip,
        bf16=True, fp16=False, use_distributed_optimizer=True,
    )
    scheduler = SchedulerConfig(
        lr_decay_style="cosine", lr_warmup_iters=train.warmup_steps, lr_warmup_init=0.0,
        lr_decay_iters=train.steps, start_weight_decay=train.weight_decay,
        end_weight_decay=train.weight_decay, weight_decay_incr_style="constant",
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def sft_completion(row: dict, supervision: str) -> str:
    """The completion the student learns for one row, in the tiny family's format."""
    if supervision == "label":
        return row["label"]
    depth = "cot_long" if supervision == "blended_cot" else supervision
    trace = (row.get("traces") or {}).get(depth)
    if trace is None:
        raise ValueError(f"row {row.get('id', '?')}: no {depth!r} trace "
                         "(rows need traces from the teacher stage)")
    return f"{trace} {THINK_CLOSE} {PROMPT_TAIL} {row['label']}"


def sft_prompt(row: dict, supervision: str) -> str:
    """The tiny family's prompt as `PromptEncoder` encodes it, <bos> included (Bridge's SFT
    dataset adds no BOS of its own)."""
    if supervision == "label":
        return f"{BOS} {PROMPT_HEAD} {row['text']} {PROMPT_TAIL}"
    depth = "cot_long" if supervision == "blended_cot" else supervision
    return f"{BOS} {PROMPT_HEAD} {row['text']} {THINK_OPEN[depth]}"


def sft_pair(row: dict, supervision: str, chat=None) -> tuple[str, str]:
    """(prompt, completion) of one row in the format the student is trained and scored in:
    with `chat` (the experiment's `ChatPromptEncoder`, for an HF teacher) the teacher's chat
    template through the family adapter, with the task and the class list, exactly as the
    teacher was asked for its supervision and as the local path and the evaluation encode it;
    else the tiny family's."""
    if chat is None:
        return sft_prompt(row, supervision), sft_completion(row, supervision)
    if supervision == "label":
        return chat.sft_texts(row["text"], row["label"])
    depth = "cot_long" if supervision == "blended_cot" else supervision
    trace = (row.get("traces") or {}).get(depth)
    if trace is None:
        raise ValueError(f"row {row.get('id', '?')}: no {depth!r} trace "
                         "(rows need traces from the teacher stage)")
    return chat.sft_texts(row["text"], row["label"], trace, depth)


def write_sft_jsonl(rows: list[dict], val_rows: list[dict], folder: Path,
                    supervision: str, chat=None, val_format: str | None = None) -> Path:
    """`training.jsonl` / `validation.jsonl` with `input` / `output` (Bridge's prompt-completion
    schema; the loss is on the output only), each row as `sft_pair` writes it (`chat`: the
    experiment's `ChatPromptEncoder` for an HF teacher). Validation rows are written in
    `val_format` (default: the training format); `label` for validation rows without teacher
    traces."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, part, fmt in (("training.jsonl", rows, supervision),
                            ("validation.jsonl", val_rows, val_format or supervision)):
        lines = []
        for r in part:
            prompt, completion = sft_pair(r, fmt, chat)
            lines.append(json.dumps({"input": prompt, "output": completion}))
        write_text_atomic(folder / name, "\n".join(lines) + "\n")
    return folder


def config_container(cfg: ExperimentConfig, student_hf: str | Path, teacher_hf: str | Path,
                     work_dir: Path, world_size: int, dataset_root: Path | None = None):
    """The whole Bridge run as one `ConfigContainer` (nothing is built or started)."""
    _bridge_imports()
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.data.builders import GPTSFTDatasetConfig
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        RNGConfig,
        TokenizerConfig,
        TrainingConfig,
    )
    from megatron.core.distributed import DistributedDataParallelConfig

    if cfg.distill.teacher_logits == "cache":
        # Bridge's DistillationModel always runs the co-located teacher; the top-k cache is read
        # only by the local loop.
        raise ConfigError("distill.teacher_logits=cache needs distill.backend=local; the bridge "
                          "backend runs the teacher online")
    layout = parallel_layout(cfg, world_size)
    train = cfg.distill.train
    micro, global_ = batch_sizes(train, layout.data_parallel)
    provider = distillation_provider(student_hf, teacher_hf, cfg, layout)
    optimizer, scheduler = optimizer_and_scheduler(train)
    ckpt = work_dir / "checkpoints" / "bridge"
    lora = cfg.distill.method == "lora_kd"
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=train.steps, global_batch_size=global_,
                             micro_batch_size=micro, eval_interval=train.eval_every,
                             eval_iters=8,
                             # The launchers' early warning (`--signal=B:USR1@120`, forwarded to
                             # every task): Bridge checkpoints and returns from training.
                             exit_signal_handler=True, exit_signal=signal.SIGUSR1),
        optimizer=optimizer,
        scheduler=scheduler,
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                          check_for_nan_in_grad=True),
        dataset=GPTSFTDatasetConfig(seq_length=seq_length(cfg),
                                    dataset_root=str(dataset_root or work_dir / "sft"),
                                    seed=cfg.seed, do_test=False),
        logger=LoggerConfig(log_interval=train.log_every,
                            tensorboard_dir=str(work_dir / "tensorboard")),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer",
                                  tokenizer_model=str(teacher_hf)),
        # `load` = `save`: a requeued job continues from the last checkpoint of this stage.
        checkpoint=CheckpointConfig(save=str(ckpt), load=str(ckpt),
                                    save_interval=train.checkpoint_every, ckpt_format="torch_dist",
                                    most_recent_k=2,
                                    # Bridge's PEFT hook insists on a base checkpoint to load
                                    # before adding adapters; an HF folder is accepted.
                                    pretrained_checkpoint=str(student_hf) if lora else None),
        rng=RNGConfig(seed=bridge_seed(cfg.seed)),
        mixed_precision="bf16_mixed",
        peft=lora_peft(cfg.distill) if lora else None,
    )


# -------------------------------------------------------------------------------------- run


def distill_bridge(cfg: ExperimentConfig, student_hf: Path, teacher_hf: Path, out_dir: Path,
                   train_rows: list[dict], val_rows: list[dict],
                   val_format: str | None = None, chat=None) -> dict[str, Any]:
    """Distill on GPUs through Megatron-Bridge and export `out_dir/hf`; returns manifest metrics.
    Every rank calls it (Bridge initialises torch.distributed from RANK / WORLD_SIZE). `chat`:
    the experiment's `ChatPromptEncoder` for an HF teacher (the SFT rows' prompt format)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    shared = writer_path(out_dir)
    # One dataset for every rank: Bridge builds the memmap index of the files it is given on
    # global rank 0 (and each node's local rank 0) only, so every rank must name the same path.
    sft = shared_sft_dataset(train_rows, val_rows, shared / "sft", cfg.distill.supervision,
                             rank, chat, val_format=val_format)
    container = config_container(cfg, student_hf, teacher_hf, shared, world, dataset_root=sft)
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge.training.distill import distill

    ckpt = Path(container.checkpoint.save)
    run_or_requeue(lambda: distill(container), ckpt, container.train.train_iters)
    if rank == 0:
        # Its own process: Bridge's export opens a world-1 process group of its own, which
        # clashes with the one this process holds (and with the other ranks' next rendezvous).
        export_in_fresh_process(cfg.distill.method, student_hf, ckpt, shared / "hf")
    return {"backend": "bridge", "world_size": world,
            "tensor_parallel": container.model.tensor_model_parallel_size,
            "pipeline_parallel": container.model.pipeline_model_parallel_size,
            "micro_batch_size": container.train.micro_batch_size,
            "global_batch_size": container.train.global_batch_size,
            "train_iters": container.train.train_iters,
            "steps_per_epoch": math.ceil(len(train_rows) / container.train.global_batch_size)}


def run_or_requeue(train, ckpt: Path, train_iters: int) -> None:
    """Run Bridge's training; a stop before `train_iters` is a preemption (exit 75, requeue).

    On its exit signal Bridge checkpoints and calls `sys.exit(0)` (training/train.py, after
    `checkpoint_and_decide_exit`), which `pretrain` re-raises: caught here, the checkpoint is
    confirmed from Megatron's tracker file, and the stage exits with the requeue code."""
    try:
        train()
    except preemption.Preempted:
        raise
    except SystemExit as e:
        done = checkpointed_iteration(ckpt)
        if done >= train_iters:
            return
        if e.code not in (0, None) or done == 0:
            raise RuntimeError(f"distill (bridge): training exited with {e.code!r} before "
                               f"step {train_iters} and no checkpoint under {ckpt}") from e
        preemption.stop("distill (bridge)", ckpt, done)
    done = checkpointed_iteration(ckpt)
    if done < train_iters:
        preemption.stop("distill (bridge)", ckpt, done)


def shared_sft_dataset(rows: list[dict], val_rows: list[dict], folder: Path, supervision: str,
                       rank: int, chat=None, timeout_s: float = 600.0,
                       val_format: str | None = None) -> Path:
    """Rank 0 writes the SFT JSONL into `folder` (rank 0's stage folder); the other ranks wait
    for its `ready` marker (torch.distributed is not up yet) and read the same files."""
    marker = folder / "ready"
    if rank == 0:
        marker.unlink(missing_ok=True)
        write_sft_jsonl(rows, val_rows, folder, supervision, chat, val_format)
        write_text_atomic(marker, f"{len(rows)} {len(val_rows)}\n")
        return folder
    deadline = time.monotonic() + timeout_s
    want = f"{len(rows)} {len(val_rows)}"
    while not (marker.is_file() and marker.read_text().strip() == want):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker}: rank 0 did not write the SFT dataset in {timeout_s:.0f} s")
        time.sleep(0.5)
    return folder


def checkpointed_iteration(ckpt: Path) -> int:
    """The last iteration Megatron saved under `ckpt` (0: none), from its tracker file."""
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return 0
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else 0


def export_hf(method: str, student_hf: Path, ckpt: Path, hf_out: Path) -> None:
    """HF export of the trained checkpoint (run in a process of its own: see
    `export_in_fresh_process`)."""
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(student_hf))
    if method != "lora_kd":
        bridge.export_ckpt(str(ckpt), str(hf_out), source_path=str(student_hf))
        return
    # LoRA: Bridge writes the adapters in HF-PEFT format; peft merges them into the student.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = hf_out.parent / "hf_adapter"
    # The `iter_*` folder: `export_adapter_ckpt` reads `run_config.yaml` there or in its parent
    # (auto_bridge.py) and otherwise falls back to default LoRA settings.
    it = checkpointed_iteration(ckpt)
    bridge.export_adapter_ckpt(str(ckpt / f"iter_{it:07d}" if it else ckpt), str(adapters))
    base = AutoModelForCausalLM.from_pretrained(str(student_hf))
    merged = PeftModel.from_pretrained(base, str(adapters)).merge_and_unload()
    merged.save_pretrained(str(hf_out))
    AutoTokenizer.from_pretrained(str(student_hf)).save_pretrained(str(hf_out))


def export_in_fresh_process(method: str, student_hf: Path, ckpt: Path, hf_out: Path) -> None:
    """`export_hf` as its own single-process step: no inherited rank variables, its own
    rendezvous port, so it neither re-initialises this process's group nor meets the job's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = ("import sys; from pathlib import Path; from distillscale.distill.bridge import "
            "_bridge_imports, export_hf; _bridge_imports(); "
            "export_hf(sys.argv[1], *map(Path, sys.argv[2:]))")
    res = subprocess.run([sys.executable, "-c", code, method, str(student_hf), str(ckpt),
                          str(hf_out)], env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{ckpt}: HF export to {hf_out} failed (exit {res.returncode})")
