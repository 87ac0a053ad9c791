"""Megatron-core GPT models: process groups, construction from a `ModelArch`, forward helpers.

The same builder serves CPU (local layer spec, fp32, gloo) and GPU (transformer-engine spec,
bf16, NCCL); only `distillscale.compat.cpu` knows the difference.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from distillscale.compat.cpu import activate, cuda_available, real_transformer_engine
from distillscale.config import ModelArch
from distillscale.models.shape import arch_params  # noqa: F401  (re-exported)
from distillscale.models.shared_prefix import hidden_at_shared_prefix


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 0) -> None:
    """Initialise torch.distributed and Megatron's parallel state once per process.

    Under srun/torchrun the usual RANK / WORLD_SIZE / MASTER_ADDR variables are used; a plain
    single process gets a world of one over a file store (no port to collide with).
    """
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp_random

    activate()
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            store = Path(tempfile.mkdtemp(prefix="distillscale-pg-")) / "store"
            dist.init_process_group(
                backend=backend, init_method=f"file://{store}", rank=0, world_size=1
            )
        if cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
        )
    mtp_random.model_parallel_cuda_manual_seed(seed)


def use_model_parallel_layout(tensor_parallel: int, pipeline_parallel: int) -> bool:
    """Make Megatron's model-parallel groups TP x PP, rebuilding them when another stage of
    this process set up other sizes (the prune stage runs at TP 1, distillation at launch.*);
    the torch.distributed process group stays. True when the groups were rebuilt."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return False
    now = (parallel_state.get_tensor_model_parallel_world_size(),
           parallel_state.get_pipeline_model_parallel_world_size())
    if now == (tensor_parallel, pipeline_parallel):
        return False
    parallel_state.destroy_model_parallel()
    return True


def transformer_config(arch: ModelArch, tensor_parallel: int = 1, pipeline_parallel: int = 1):
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = cuda_available()
    # The softmax, RoPE and persistent layer-norm fusions are transformer-engine / apex kernels:
    # on a GPU without TE the local spec runs unfused (the jit-scripted bias fusions stay on).
    te = real_transformer_engine()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=False,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        use_cpu_initialization=not on_gpu,
        # Every fusion off on CPU: each needs a CUDA kernel (megatron-core 0.19).
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=te,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=te,
        persist_layer_norm=te,
    )


def layer_spec(qk_layernorm: bool = False):
    """The transformer-engine spec with the real TE (GPU), else megatron-core's local spec."""
    if real_transformer_engine():
        # heavy: megatron-core, only where a Megatron model is built or run
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


# Megatron-core's llama3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling);
# only `factor` is a parameter.
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def rope_kwargs(arch: ModelArch) -> dict:
    """GPTModel's RoPE-scaling arguments for `arch.rope_scaling` (HF encoding)."""
    rs = arch.rope_scaling
    if not rs:
        return {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        off = {k: rs.get(k) for k, v in _MCORE_LLAMA3.items() if float(rs.get(k, v)) != v}
        if off:
            raise NotImplementedError(
                f"llama3 RoPE scaling with {off}: megatron-core fixes these to {_MCORE_LLAMA3}")
        return {"rope_scaling": True, "rope_scaling_factor": float(rs.get("factor", 8.0))}
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(rs["factor"])}
    raise NotImplementedError(f"RoPE scaling {kind!r}: only llama3 and linear are supported")


def spec_name() -> str:
    """Which layer spec `build_gpt` uses here: "te" or "local"."""
    return "te" if real_transformer_engine() else "local"


def build_gpt(arch: ModelArch, vocab_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1):
    """A fresh Megatron-core GPTModel of this shape (Llama-style, with Qwen3's QK layernorm or
    Qwen2's QKV bias when `arch` has them), whole on every pipeline rank.

    The local path (CPU, and the stages that build models themselves) splits models over
    tensor-parallel ranks only; pipeline stages come from Megatron-Bridge's providers on the
    GPU path. Building here under PP > 1 would give every rank half the layers with both the
    embedding and the output layer, a silently wrong model, so it is refused."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    pp = max(pipeline_parallel, parallel_state.get_pipeline_model_parallel_world_size()
             if parallel_state.model_parallel_is_initialized() else 1)
    if pp > 1:
        raise NotImplementedError(
            f"launch.pipeline_parallel={pp}: the local Megatron path splits models over tensor "
            "parallel ranks only; use launch.pipeline_parallel=1 here (pipeline parallelism is "
            "for the GPU path through Megatron-Bridge)")
    cfg = transformer_config(arch, tensor_parallel, pipeline_parallel)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=layer_spec(arch.qk_layernorm),
        vocab_size=vocab_size,
        max_sequence_length=arch.seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        **rope_kwargs(arch),
    )
    if cuda_available():
        model = model.cuda()
    return model


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean mask convention: True = masked. Always passed explicitly, since with
    `attention_mask=None` megatron-core 0.19 builds one on "cuda"."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), 1)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq] token ids -> [batch, seq, vocab] logits (gathered over TP)."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    logits = model(tokens, pos, causal_mask(s, tokens.device))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def hidden_and_head(hidden_states, output_layer, output_weight, **_):
    """megatron-core's `output_processor` hook: called with the decoder's final (normed) hidden
    states [s, b, h] in place of the output layer; returns them with the head weight [V, h]
    (`output_weight` is the embedding when tied)."""
    return hidden_states, output_layer.weight if output_weight is None else output_weight


def logits_at(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[batch, seq] token ids -> [batch, vocab] logits at one position per row.

    At TP 1 the output layer runs on those rows' hidden states only: on a 49k-id vocabulary
    the head over every position is most of a forward's time on CPU, and an answer-position
    score needs one position. Equal to `forward_logits(model, tokens)[rows, positions]` (the
    same product on fewer rows); under TP, or with a head bias or MuP scaling that the hook
    would skip, that is what it computes. Rows that share a prompt prefix run it once per group
    of rows where the layout applies (`models/shared_prefix.py`)."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    rows = torch.arange(tokens.shape[0], device=tokens.device)
    positions = positions.to(tokens.device)
    head = getattr(model, "output_layer", None)
    if (parallel_state.get_tensor_model_parallel_world_size() > 1 or head is None
            or head.bias is not None or getattr(model.config, "use_mup", False)):
        return forward_logits(model, tokens)[rows, positions]
    hidden, weight = hidden_at_shared_prefix(model, tokens, positions, hidden_and_head)
    if hidden is not None:  # rows sharing a prompt prefix: it ran once per group of rows
        return hidden @ weight.T
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    hidden, weight = model(tokens, pos, causal_mask(s, tokens.device),
                           output_processor=hidden_and_head)
    return hidden[positions, rows] @ weight.T


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
