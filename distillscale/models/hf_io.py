"""HF checkpoints (safetensors + config.json + tokenizer) <-> Megatron-core GPT models.

Both directions go through Megatron-Bridge's `AutoBridge` (0.6.2), which owns the weight layout
conversion (fused `linear_qkv` per query group <-> q/k/v_proj, `linear_fc1` = [gate; up] <->
gate/up_proj, TP sharding and gathering):

- `save_hf` describes the model as an HF config of the right family and *shape* (a pruned
  student's shape, not the teacher's) and exports through a config-only bridge,
  `AutoBridge.from_hf_config(cfg).save_hf_pretrained(...)`, which Bridge 0.6.2 supports
  directly (it writes config.json and the safetensors shards itself). The other route, an HF
  template checkpoint of the same shape saved to disk first and `AutoBridge.from_hf_pretrained`
  on it, also converts, but `save_hf_pretrained` then re-saves the template's artifacts and
  fails unless the template holds a tokenizer; it writes a throwaway random model for nothing.
- `load_hf` is Bridge's own import path: `from_hf_pretrained` -> `to_megatron_provider` ->
  `provide_distributed_model`, with the layer spec and precision flags that `build_gpt` uses on
  this device, so Llama, Qwen3 (QK layernorm) and Qwen2 (QKV bias) checkpoints all load.

Measured on a 2-core CPU, fp32 (tests/models/test_hf_io.py): logits of the exported checkpoint
under `transformers` and of the loaded model under megatron-core match within ~1e-5 at
max |logit| ~7 (load -> identical to the saved Megatron model); Llama 3.1 RoPE scaling, Qwen3
and Qwen2 round-trip too; TP=2 on gloo exports and loads the same logits. After the ~8 s
import, a 33M-parameter model saves in ~0.4 s and loads in ~0.9 s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from distillscale.compat.cpu import activate, cuda_available, real_transformer_engine
from distillscale.config import ModelArch
from distillscale.manifest import replace_dir
from distillscale.models.megatron_gpt import init_distributed
from distillscale.models.shape import MODEL_TYPES

# HF families `save_hf` can write: (architecture, megatron qk_layernorm, megatron add_qkv_bias).
_FAMILIES = {
    "llama": ("LlamaForCausalLM", False, False),
    "qwen3": ("Qwen3ForCausalLM", True, False),
    "qwen2": ("Qwen2ForCausalLM", False, True),
}


# ----------------------------------------------------------------------------------- process


def _auto_bridge():
    """AutoBridge, after the process groups, CPU shims and (CPU only) the TE import stub."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    # Already set up by the caller: calling init_distributed again would re-seed the RNGs.
    if not parallel_state.model_parallel_is_initialized():
        init_distributed()
    activate()  # `import megatron.bridge` needs the TE import stub on CPU
    # heavy: Megatron-Bridge, only on the Bridge (GPU) training and export path
    from megatron.bridge import AutoBridge

    return AutoBridge


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


# -------------------------------------------------------------------------------------- save


def _family(mcfg) -> str:
    """HF family for the attention variant the Megatron model was built with."""
    qk_norm = bool(getattr(mcfg, "qk_layernorm", False))
    qkv_bias = bool(getattr(mcfg, "add_qkv_bias", False))
    for name, (_, fam_qk, fam_bias) in _FAMILIES.items():
        if (qk_norm, qkv_bias) == (fam_qk, fam_bias):
            return name
    raise NotImplementedError(
        "save_hf: QK layernorm together with QKV bias has no HF family here "
        "(Llama: neither, Qwen3: QK layernorm, Qwen2: QKV bias)"
    )


def _unsupported(mcfg) -> list[str]:
    """Model features outside the Llama/Qwen dense decoder that ModelArch describes."""
    norm = getattr(mcfg, "normalization", "RMSNorm")
    position = getattr(mcfg, "position_embedding_type", "rope")
    rotary_percent = getattr(mcfg, "rotary_percent", 1.0)
    activation = getattr(mcfg, "activation_func", None)
    checks = {
        "MoE": bool(getattr(mcfg, "num_moe_experts", None)),
        "multi-latent attention": bool(getattr(mcfg, "multi_latent_attention", False)),
        f"normalization={norm}": norm != "RMSNorm",
        "non-gated MLP": not getattr(mcfg, "gated_linear_unit", True),
        "activation other than SiLU": activation not in (None, torch.nn.functional.silu),
        "linear biases": bool(getattr(mcfg, "add_bias_linear", False)),
        f"position_embedding_type={position}": position != "rope",
        f"rotary_percent={rotary_percent}": rotary_percent != 1.0,
    }
    return [name for name, bad in checks.items() if bad]


def _rope_scaling(mcfg, family: str, arch: ModelArch | None = None) -> dict | None:
    if arch is not None and arch.rope_scaling:
        if family != "llama":
            raise NotImplementedError("save_hf: RoPE scaling on a non-Llama model")
        return dict(arch.rope_scaling)
    # Same HF encoding as Megatron-Bridge 0.6.2 LlamaBridge.megatron_to_hf_config (Llama 3.1/3.2
    # checkpoints loaded through load_hf carry these on their provider config).
    if getattr(mcfg, "rope_scaling", False):
        if family != "llama":
            raise NotImplementedError("save_hf: llama3 RoPE scaling on a non-Llama model")
        return {
            "rope_type": "llama3",
            "factor": mcfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    if getattr(mcfg, "seq_len_interpolation_factor", None) is not None:
        if family != "llama":
            raise NotImplementedError("save_hf: linear RoPE scaling on a non-Llama model")
        return {"rope_type": "linear", "factor": mcfg.seq_len_interpolation_factor}
    return None


def hf_config(
    arch: ModelArch,
    vocab_size: int,
    family: str = "llama",
    *,
    dtype=torch.float32,
    tokenizer=None,
    rope_scaling: dict | None = None,
):
    """The transformers config of an `arch`-shaped model of this HF family."""
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoConfig

    architecture = _FAMILIES[family][0]
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        # Explicit even when it equals hidden/heads: pruning changes hidden or heads, not this.
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "max_position_embeddings": arch.seq_length,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_dropout": 0.0,
        "architectures": [architecture],
        "dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
    }
    if family == "llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    if family == "qwen3":
        kwargs.update(attention_bias=False)
    if family in ("qwen2", "qwen3"):
        # Qwen configs default to sliding-window settings that only matter when enabled.
        kwargs.update(use_sliding_window=False)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    return AutoConfig.for_model(family, **kwargs)


def _check_shape(model, arch: ModelArch, vocab_size: int) -> None:
    """Bridge splits the fused QKV by `model.config`; it must agree with `arch` and the weights."""
    mcfg = model.config
    expected = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "qk_layernorm": arch.qk_layernorm,
        "add_qkv_bias": arch.add_qkv_bias,
    }
    wrong = {
        k: (getattr(mcfg, k, None), v) for k, v in expected.items()
        if getattr(mcfg, k, None) != v and not (isinstance(v, bool)
                                                and bool(getattr(mcfg, k, None)) == v)
    }
    if wrong:
        detail = ", ".join(f"{k}: model.config {m} vs arch {a}" for k, (m, a) in wrong.items())
        raise ValueError(f"save_hf: model does not match arch ({detail})")
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if emb is not None:
        # heavy: megatron-core, only where a Megatron model is built or run
        from megatron.core import parallel_state

        rows = emb.weight.shape[0] * parallel_state.get_tensor_model_parallel_world_size()
        if rows != vocab_size or emb.weight.shape[1] != arch.hidden_size:
            raise ValueError(
                f"save_hf: embedding is {tuple(emb.weight.shape)} (x TP), expected "
                f"[{vocab_size}, {arch.hidden_size}]"
            )


def save_hf(model, arch: ModelArch, vocab_size: int, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` (a Megatron-core GPTModel, possibly wrapped, or a list of PP chunks) as an
    HF checkpoint in `out_dir`: config.json, model*.safetensors (in the model's dtype) and, if
    given, the tokenizer (a transformers tokenizer). `transformers.AutoModelForCausalLM` loads it.

    The family follows the model: Llama; Qwen3 if built with QK layernorm; Qwen2 with QKV bias.
    Written into a sibling temporary folder and renamed, replacing any previous `out_dir`.
    Collective under torch.distributed (every TP/PP rank calls it; rank 0 writes).
    """
    auto_bridge = _auto_bridge()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    inner = _unwrap(chunks[0])
    mcfg = inner.config
    bad = _unsupported(mcfg)
    if bad:
        raise NotImplementedError(f"save_hf: unsupported model features: {', '.join(bad)}")
    _check_shape(inner, arch, vocab_size)
    family = _family(mcfg)
    dtype = next(inner.parameters()).dtype
    cfg = hf_config(
        arch,
        vocab_size,
        family,
        dtype=dtype,
        tokenizer=tokenizer,
        rope_scaling=_rope_scaling(mcfg, family, arch),
    )

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.partial"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        bridge = auto_bridge.from_hf_config(cfg)
        bridge.save_hf_pretrained(chunks, tmp, show_progress=False)
        if _rank0():
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out)
    finally:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return out


# -------------------------------------------------------------------------------------- load

def _hf_rope(cfg) -> tuple[float, dict | None]:
    """(rope theta, scaling in HF's encoding or None) from a transformers config: transformers 5
    keeps both in `rope_parameters`, configs written before it in `rope_theta` / `rope_scaling`."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0))
    scaling = params or dict(getattr(cfg, "rope_scaling", None) or {})
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (None if kind == "default" else scaling)


def arch_from_hf_config(path: str | Path) -> tuple[ModelArch, int]:
    """(ModelArch, vocabulary size) of an HF causal-LM checkpoint, from its config.json alone
    (no weights are read, so it works for a 70B checkpoint on a laptop too).

    `path`: the checkpoint folder or its config.json. Llama, Mistral (no sliding window), Qwen2
    (QKV bias) and Qwen3 (QK layernorm) are read; anything outside the dense RMSNorm / SwiGLU /
    RoPE decoder ModelArch describes is refused with the file and the feature named.
    """
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoConfig

    p = Path(path)
    folder = p.parent if p.name == "config.json" else p
    where = folder / "config.json"
    if not where.is_file():
        raise FileNotFoundError(f"{where}: missing (not an HF checkpoint folder)")
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{where}: not a transformers config ({e})") from None
    kind = getattr(cfg, "model_type", None)
    if kind not in MODEL_TYPES:
        raise NotImplementedError(
            f"{where}: model_type {kind!r} is not supported (one of {sorted(MODEL_TYPES)})")
    bad = []
    if getattr(cfg, "hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={cfg.hidden_act}")
    if getattr(cfg, "mlp_bias", False):
        bad.append("mlp_bias")
    if kind != "qwen2" and getattr(cfg, "attention_bias", False):
        bad.append("attention_bias (biases on q/k/v and o)")
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        bad.append("MoE")
    window = getattr(cfg, "sliding_window", None)
    if window and (kind == "mistral" or getattr(cfg, "use_sliding_window", False)):
        bad.append(f"sliding-window attention ({window})")
    if bad:
        raise NotImplementedError(f"{where}: unsupported model features: {', '.join(bad)}")
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    groups = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    theta, scaling = _hf_rope(cfg)
    try:
        arch = ModelArch(
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg.intermediate_size),
            num_attention_heads=heads,
            num_query_groups=groups,
            # None when it is the default, so an arch read back equals the one written.
            kv_channels=None if hidden % heads == 0 and head_dim == hidden // heads else head_dim,
            seq_length=int(cfg.max_position_embeddings),
            rotary_base=theta,
            norm_epsilon=float(cfg.rms_norm_eps),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qk_layernorm=kind == "qwen3",
            add_qkv_bias=kind == "qwen2",
            rope_scaling=scaling,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return arch, int(cfg.vocab_size)


def _check_provider(p, arch: ModelArch, where: Path) -> None:
    """Megatron-Bridge's provider must describe the model `arch_from_hf_config` read."""
    want = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
            "ffn_hidden_size": arch.ffn_hidden_size,
            "num_attention_heads": arch.num_attention_heads,
            "num_query_groups": arch.num_query_groups, "kv_channels": arch.head_dim,
            "qk_layernorm": arch.qk_layernorm, "add_qkv_bias": arch.add_qkv_bias,
            "share_embeddings_and_output_weights": arch.tie_word_embeddings}
    got = {k: getattr(p, k, None) for k in want}
    if got["num_query_groups"] is None:
        got["num_query_groups"] = p.num_attention_heads
    if got["kv_channels"] is None:
        got["kv_channels"] = p.hidden_size // p.num_attention_heads
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v and bool(got[k]) != v}
    if wrong:
        raise RuntimeError(f"load_hf: {where}: Megatron-Bridge reads {wrong} (bridge, config) "
                           "differently from config.json")


def load_hf(path: str | Path):
    """Load an HF checkpoint directory (Llama / Qwen2 / Qwen3 family, dense) as a Megatron-core
    GPTModel on the current device: fp32 with the local layer spec on CPU, bf16 with the
    transformer-engine spec on GPU (as `build_gpt`), sharded over the current TP/PP groups.

    Returns `(model, arch, vocab_size)`; `model` is the bare GPTModel (this rank's pipeline
    stage), in eval mode; `arch` is `arch_from_hf_config(path)` (QK layernorm, QKV bias and RoPE
    scaling included), so `build_gpt(arch, vocab_size)` builds the same module tree and its state
    dict loads into it.
    """
    auto_bridge = _auto_bridge()
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not an HF checkpoint directory (no config.json)")
    arch, _ = arch_from_hf_config(path)
    bridge = auto_bridge.from_hf_pretrained(str(path))
    provider = bridge.to_megatron_provider(load_weights=True)

    bad = _unsupported(provider)
    if bad:
        raise NotImplementedError(f"load_hf: {path}: unsupported model features: {', '.join(bad)}")
    _check_provider(provider, arch, path)

    on_gpu = cuda_available()
    provider.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    provider.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    provider.sequence_parallel = False
    provider.hidden_dropout = 0.0
    provider.attention_dropout = 0.0
    # No DDP wrapper, so no main_grad buffers for the fused weight-gradient accumulation.
    provider.gradient_accumulation_fusion = False
    if not real_transformer_engine():
        # megatron-core 0.19 without transformer-engine (CPU, or a GPU image without it): local
        # spec (honours qk_layernorm) and every fusion off.
        from megatron.bridge.models.gpt_provider import local_layer_spec

        provider.transformer_layer_spec = local_layer_spec
        for flag in (
            "bias_activation_fusion",
            "masked_softmax_fusion",
            "bias_dropout_fusion",
            "apply_rope_fusion",
            "persist_layer_norm",
        ):
            setattr(provider, flag, False)
    provider.finalize()
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=not on_gpu,
        bf16=on_gpu,
        fp16=False,
        mixed_precision_wrapper=None,  # bf16 params directly, as build_gpt; no Float16Module
    )
    model = chunks[0]
    model.eval()
    return model, arch, int(provider.vocab_size)
