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
