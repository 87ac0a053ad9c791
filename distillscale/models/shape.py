"""Parameter counts from a model's shape alone (no torch), for the pruning search and the
launch planner, which runs on hosts without the training stack."""

from __future__ import annotations

from distillscale.config import ModelArch


def arch_params(arch: ModelArch, vocab_size: int) -> int:
    """Parameter count of a model of this shape (matches `count_params`)."""
    h, f, L = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers
    d = arch.head_dim
    qkv_out = d * (arch.num_attention_heads + 2 * arch.num_query_groups)
    attn = h * qkv_out + arch.num_attention_heads * d * h
    if arch.add_qkv_bias:
        attn += qkv_out
    mlp = 2 * h * f + f * h
    norms = 2 * h + (2 * d if arch.qk_layernorm else 0)
    emb = vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return L * (attn + mlp + norms) + emb + h


# HF model types read as a ModelArch, and the family their checkpoints (and every pruned
# student's) are written back as. Mistral without sliding-window attention is Llama's math and
# weight layout, so its students are written as Llama.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def hf_family(arch: ModelArch) -> str:
    """The HF family `save_hf` writes a model of this arch as."""
    if arch.qk_layernorm and arch.add_qkv_bias:
        raise NotImplementedError("QK layernorm together with QKV bias has no HF family here")
    return "qwen3" if arch.qk_layernorm else "qwen2" if arch.add_qkv_bias else "llama"
