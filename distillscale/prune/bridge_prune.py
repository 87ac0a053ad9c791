"""Minitron pruning of an HF teacher built through a Megatron-Bridge provider, at TP 1 and PP >= 1.

ModelOpt's Minitron scores and slices at tensor-parallel size 1 but lets the layers be split over
pipeline stages (its importance reductions are over the pipeline group). This is the route for a
teacher too large for one device: HF checkpoint in, Bridge provider with the pipeline size,
`mtp.prune` with the `mcore_minitron` mode and a pipeline-aware calibration forward, HF checkpoint
out, as ModelOpt's `examples/megatron_bridge/prune_minitron.py` does. The target shape is checked
by the same code as the single-stage path (`prune/shapes.py`); ModelOpt does the scoring, ranking
and slicing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distillscale.compat.cpu import (
    activate,
    cuda_available,
    real_transformer_engine,
    tensor_cuda_as_identity,
)
from distillscale.config import ModelArch
from distillscale.prune.shapes import check_target, pruned_arch

# The layer spec, set explicitly: TE where it is installed (what ModelOpt's Minitron plugin is
# written for), else megatron-core's local spec with the fusions off (`compat/cpu.py` adapts
# ModelOpt to it), as the Bridge KD path builds on CPU.
_UNFUSED = ("bias_activation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
            "apply_rope_fusion", "persist_layer_norm", "gradient_accumulation_fusion")


def load_bridge_model(hf_dir: str | Path, pipeline_parallel: int, *, seq_length: int,
                      dtype: torch.dtype = torch.bfloat16):
    """(bridge, provider, model chunks, GPTModel) of the HF checkpoint at TP 1 and
    `pipeline_parallel` stages, weights loaded by the provider's own hook.

    The steps of ModelOpt 0.47's `load_mbridge_model_from_hf` (`modelopt/torch/utils/plugins/
    mbridge.py`) for a dense model, with Megatron's parallel state initialised by the caller
    (gloo on CPU). Not the function itself: it builds with `provide_distributed_model(
    wrap_with_ddp=False)`, whose `get_model` resets `use_cpu_initialization` to False and moves
    the model with `.cuda()` (megatron-bridge 0.6.2 `models/model_provider.py`, `get_model`), so
    it cannot build on CPU.
    """
    activate()
    # heavy: Megatron-Bridge, only where a teacher is pruned through its provider
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if parallel_state.get_pipeline_model_parallel_world_size() != pipeline_parallel:
        raise RuntimeError(
            f"Megatron's parallel state has PP {parallel_state.get_pipeline_model_parallel_world_size()}"
            f", the prune asks for {pipeline_parallel}")
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = 1  # Minitron prunes unsharded layers
    provider.expert_tensor_parallel_size = 1
    provider.pipeline_model_parallel_size = pipeline_parallel
    provider.context_parallel_size = 1
    provider.sequence_parallel = False
    provider.seq_length = seq_length
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    provider.params_dtype = provider.pipeline_dtype = dtype
    provider.hidden_dropout = provider.attention_dropout = 0.0
    if not real_transformer_engine():
        provider.transformer_layer_spec = local_layer_spec
        for flag in _UNFUSED:
            setattr(provider, flag, False)
    provider.finalize()
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=not cuda_available())
    if len(chunks) != 1:
        raise RuntimeError(f"expected one model chunk per stage, got {len(chunks)}")
    return bridge, provider, chunks, unwrap_model(chunks[0])


def arch_of(model, seq_length: int) -> ModelArch:
    """Our ModelArch for a megatron-core GPTModel (the shape `check_target` reads)."""
    config = model.config
    return ModelArch(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        kv_channels=config.kv_channels, seq_length=seq_length,
        qk_layernorm=bool(config.qk_layernorm), add_qkv_bias=bool(config.add_qkv_bias),
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights))


def pipeline_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, v] (fp32) of one stage-split GPTModel, on every pipeline rank.

    Stage by stage as ModelOpt's `megatron_prefill` does (activations sent explicitly between
    stages, no training schedule), in plain torch.distributed so it runs on gloo: megatron-core
    0.19's `broadcast_from_last_pipeline_stage` that `megatron_prefill` ends with asserts CUDA
    tensors (`inference/communication_utils.py`, `_is_cuda`).
    """
    # heavy: megatron-core, only where a Megatron model is run
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    # Explicit causal mask: with None, megatron-core 0.19's local attention builds it on "cuda".
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)
    dtype = model.config.pipeline_dtype or model.config.params_dtype
    if not first:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=dtype, device=device)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, causal)
    if not last:
        dist.send(out.to(dtype).contiguous(), ps.get_pipeline_model_parallel_next_rank())
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return out.float()
    logits = out.float().contiguous() if last else torch.empty(
        b, s, model.vocab_size, dtype=torch.float32, device=device)
    dist.broadcast(logits, ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return logits


def calibration_loop(batches: list[torch.Tensor]):
    """ModelOpt's `forward_loop(model)`: one pipelined forward per token batch [b, s]."""

    def forward_loop(model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in batches:
                pipeline_logits(model, batch)
        model.train(was_training)

    return forward_loop


def prune_hf_through_bridge(
    hf_dir: str | Path,
    target: dict[str, int],
    calibration: list[torch.Tensor],
    out_dir: str | Path,
    *,
    pipeline_parallel: int = 1,
    seq_length: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    hidden_size_divisor: int = 16,
    ffn_hidden_size_divisor: int = 32,
    scores_path: str | Path | None = None,
    info: dict | None = None,
):
    """Prune the HF checkpoint `hf_dir` to `target` with ModelOpt Minitron at TP 1 and
    `pipeline_parallel` stages; write the student as an HF checkpoint to `out_dir` (every rank
    calls it; rank 0 writes). Returns (model chunks, pruned GPTModel of this stage, student arch).

    `target`: a ModelOpt export_config subset of `shapes.PRUNABLE_KEYS` ({"hidden_size": 48,
    "num_layers": 2, ...}), checked by `shapes.check_target` first. `calibration`: token batches
    [b, s] for the importance forwards, the same on every rank. `scores_path`: ModelOpt's per-rank
    score checkpoint (`<stem><rank>.pth`), reused when present. `info` receives `layer_scores`
    (1-indexed), `kept_layers` and `prune_seconds`. Megatron's parallel state must be set up at
    TP 1 and PP `pipeline_parallel` before the call.
    """
    activate()  # before ModelOpt is imported: its Megatron plugins need the TE stub on CPU
    # heavy: ModelOpt, only where a model is pruned
    import modelopt.torch.opt as mto
    import modelopt.torch.prune as mtp

    target = dict(target)
    if not target:
        raise ValueError("empty pruning target")
    # On CPU at world size > 1, ModelOpt's object collectives and megatron-core's tied-embedding
    # sync call `.cuda()` before gloo collectives (`compat/cpu.py`).
    with tensor_cuda_as_identity():
        bridge, _, chunks, model = load_bridge_model(
            hf_dir, pipeline_parallel, seq_length=seq_length, dtype=dtype)
        arch = arch_of(model, seq_length)
        check_target(arch, target, hidden_size_divisor=hidden_size_divisor,
                     ffn_hidden_size_divisor=ffn_hidden_size_divisor)
        new_arch = pruned_arch(arch, target)

        config = mtp.mcore_minitron.get_mcore_minitron_config(
            hidden_size_divisor=hidden_size_divisor,
            ffn_hidden_size_divisor=ffn_hidden_size_divisor, num_layers_divisor=1)
        search: dict[str, Any] = {"forward_loop": calibration_loop(calibration)}
        if scores_path is not None:
            search["checkpoint"] = str(scores_path)
        start = time.perf_counter()
        model, state = mtp.prune(model, mode=[("mcore_minitron", config)],
                                 constraints={"export_config": target}, dummy_input=None,
                                 config=search)
        seconds = time.perf_counter() - start
        # The pruned weights are plain tensors now; the HF export and later builds need no
        # ModelOpt state (as ModelOpt's example drops it).
        if mto.ModeloptStateManager.has_state_for_mode_type("prune", model=model):
            mto.ModeloptStateManager.remove_state(model)
        for key, value in target.items():
            if getattr(model.config, key) != value:
                raise RuntimeError(f"ModelOpt did not prune {key}: the model has "
                                   f"{getattr(model.config, key)}, requested {value}")
        ranked = state.get("sorted_layers")
        kept = (sorted(ranked[: new_arch.num_layers]) if ranked
                else list(range(1, arch.num_layers + 1)))
        export_hf_pruned(bridge, chunks, model.config, kept, out_dir, source=hf_dir)
    if info is not None:
        info.update(layer_scores={int(k): float(v)
                                  for k, v in (state.get("layer_scores") or {}).items()},
                    kept_layers=kept, prune_seconds=seconds)
    return chunks, model, new_arch


def export_hf_pruned(bridge, chunks, config, kept_layers: list[int], out_dir: str | Path, *,
                     source: str | Path) -> None:
    """Write the pruned model as an HF checkpoint of the teacher's family: the teacher's config
    with the pruned sizes (and per-layer fields of the kept layers), weights streamed by Bridge
    from every stage. Collective: every rank calls it."""
    # heavy: Megatron-Bridge and transformers, only where a pruned model is exported
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        bridge.hf_pretrained.save_artifacts(out)  # config, tokenizer, generation config
    if dist.is_initialized():
        dist.barrier()
    hf_cfg = AutoConfig.from_pretrained(out)
    hf_cfg.hidden_size = config.hidden_size
    hf_cfg.intermediate_size = config.ffn_hidden_size
    hf_cfg.num_attention_heads = config.num_attention_heads
    hf_cfg.num_key_value_heads = config.num_query_groups
    hf_cfg.head_dim = config.kv_channels
    hf_cfg.num_hidden_layers = config.num_layers
    if getattr(hf_cfg, "layer_types", None):
        hf_cfg.layer_types = [t for i, t in enumerate(hf_cfg.layer_types) if i + 1 in kept_layers]
    if rank0:
        # A checkpoint of the pruned shape for Bridge to map onto, as ModelOpt's example writes
        # for a non-hybrid model; its random weights are overwritten by `save_hf_weights`.
        with torch.random.fork_rng(devices=[]):
            AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()
    AutoBridge.from_hf_pretrained(str(out)).save_hf_weights(chunks, out, show_progress=False)
    if dist.is_initialized():
        dist.barrier()
