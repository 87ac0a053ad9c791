"""A batch whose rows share a prompt prefix, run as one packed sequence: the prefix once, then
every row's own tokens, under a tree attention mask.

Rows rendered from one chat template share a long prefix (system prompt, task, class list:
about 180 of SmolLM2's ~224 prompt tokens). A [b, s] batch runs that prefix b times; packed,
a row's own tokens attend to the one copy of the prefix and to their own earlier tokens, at
the positions they have in the unpacked row (RoPE and learned position embeddings both get
those positions). Under a causal mask the prefix's hidden states are the same in every row,
so the packed forward gives every (row, position) the hidden state of the batched forward,
and in backward the prefix's gradient is the sum of the rows' gradients, which is what the
batch computes too (tested: values and gradients, `tests/models/test_shared_prefix.py`).

Written here because megatron-core has no such layout: its packed sequences (THD,
`PackedSeqParams`) keep sequences apart, and its prefix caching is an inference-engine feature
with no backward. The HF counterpart for scoring is `eval/indomain.py` `class_scores_cached`,
for generation `teacher/backends/hf.py`.

Only for megatron-core's local layer spec (CPU), TP 1 and PP 1: its unfused softmax takes an
arbitrary mask, where transformer-engine's attention applies its own causal mask; `pack_batch`
returns None where the layout does not apply, and callers run the plain batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distillscale.compat.cpu import real_transformer_engine

# A shared prefix shorter than this saves too little to be worth a packed forward.
MIN_SHARED_PREFIX = 16
# Rows are packed in groups of at most this many tokens: the mask and the attention scores
# grow with the square of a packed sequence's length.
MAX_PACKED_TOKENS = 1024


@dataclass
class PrefixPack:
    tokens: torch.Tensor  # [1, N] the prefix once, then each row's own tokens
    positions: torch.Tensor  # [N] each token's position in its unpacked row
    mask: torch.Tensor  # [1, 1, N, N] Megatron's boolean convention: True = masked
    index: torch.Tensor  # [b, s] packed index of (row, column); 0 where the column is padding
    prefix: int  # shared prefix length


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of token-id lists, leaving every sequence at least
    one token of its own (what a prefix KV cache leaves to run); 0 for none."""
    if not sequences:
        return 0
    # os.path.commonprefix compares element by element: it works on token-id lists too.
    return max(0, min(len(os.path.commonprefix(sequences)), min(len(s) for s in sequences) - 1))


def shared_prefix(tokens: torch.Tensor, lengths: torch.Tensor) -> int:
    """Longest common prefix of the rows' first `lengths[i]` tokens, leaving each row at least
    one token of its own."""
    if tokens.shape[0] < 2:
        return 0
    return common_prefix_length([row[:n].tolist() for row, n in zip(tokens, lengths.tolist())])


def layout_supported(model) -> bool:
    """The local layer spec at TP 1 and PP 1 (see the module doc), and plain RoPE or learned
    positions (YaRN's and multimodal RoPE's tables are read differently: not packed)."""
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core import parallel_state

    # `megatron_gpt.build_gpt` builds the local spec wherever the real transformer-engine is not.
    return (not real_transformer_engine()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and parallel_state.get_context_parallel_world_size() == 1
            and hasattr(model, "embedding")
            and getattr(model, "position_embedding_type", None) in ("rope", "learned_absolute"))


def pack_batch(tokens: torch.Tensor, lengths: torch.Tensor,
               min_prefix: int = MIN_SHARED_PREFIX) -> PrefixPack | None:
    """The packed layout of right-padded `tokens` [b, s] with real lengths `lengths` [b], or
    None when the rows share fewer than `min_prefix` tokens (or there is one row)."""
    p = shared_prefix(tokens, lengths)
    if p < min_prefix:
        return None
    b, s = tokens.shape
    lengths = [int(n) for n in lengths]
    total = p + sum(n - p for n in lengths)
    packed = torch.empty(total, dtype=tokens.dtype)
    positions = torch.empty(total, dtype=torch.long)
    index = torch.zeros(b, s, dtype=torch.long)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    packed[:p] = tokens[0, :p]
    positions[:p] = torch.arange(p)
    allowed[:p, :p] = torch.tril(torch.ones(p, p, dtype=torch.bool))
    start = p
    for i, n in enumerate(lengths):
        own = n - p
        end = start + own
        packed[start:end] = tokens[i, p:n]
        positions[start:end] = torch.arange(p, n)
        index[i, :p] = torch.arange(p)
        index[i, p:n] = torch.arange(start, end)
        allowed[start:end, :p] = True  # the shared prefix
        allowed[start:end, start:end] = torch.tril(torch.ones(own, own, dtype=torch.bool))
        start = end
    return PrefixPack(packed.unsqueeze(0), positions, (~allowed)[None, None], index, p)


@contextlib.contextmanager
def _rotary_at(model, positions: torch.Tensor) -> Iterator[None]:
    """megatron-core's RoPE takes a sequence length and gives positions 0..len-1 (it ignores
    `position_ids`): for the packed forward, its table is read at `positions` instead."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        yield
        return
    table = rope(int(positions.max()) + 1)  # [max_pos, 1, 1, dim]
    rope.forward = lambda *_a, **_k: table[positions.to(table.device)]
    try:
        yield
    finally:
        del rope.forward  # back to the class's (cached) forward


def packed_forward(model, pack: PrefixPack, **kwargs):
    """`model(tokens, positions, mask, **kwargs)` on the packed sequence: logits [1, N, V], or
    what an `output_processor` returns (hidden states [N, 1, h] and the head weight)."""
    device = next(model.parameters()).device
    with _rotary_at(model, pack.positions):
        return model(pack.tokens.to(device), pack.positions.unsqueeze(0).to(device),
                     pack.mask.to(device), **kwargs)


def unpack(packed: torch.Tensor, pack: PrefixPack) -> torch.Tensor:
    """Per-row values [b, s, ...] from packed ones [N, ...] (padding columns get the first
    token's values: mask them as the batch's padding is masked)."""
    return packed[pack.index.to(packed.device)]


def _unpacked(tokens: torch.Tensor, n: int) -> PrefixPack:
    """One row's first `n` tokens as they are (prefix 0, a causal mask): a group of one."""
    index = torch.zeros(1, tokens.shape[-1], dtype=torch.long)
    index[0, :n] = torch.arange(n)
    return PrefixPack(tokens[None, :n], torch.arange(n),
                      torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1), index, 0)


def pair_cost(model) -> float:
    """The cost of one attended query-key pair relative to one token through a layer's linear
    layers: about 4h FLOPs against 2(4h^2 + 3h f), i.e. 1 / (2h + 1.5f) (h hidden, f FFN)."""
    cfg = model.config
    return 1.0 / (2 * cfg.hidden_size + 1.5 * cfg.ffn_hidden_size)


def pack_groups(tokens: torch.Tensor, lengths: torch.Tensor, max_tokens: int | None = None,
                min_prefix: int = MIN_SHARED_PREFIX,
                pair: float = 0.0) -> list[tuple[int, int, PrefixPack]] | None:
    """Consecutive groups of rows `[start, end)`, each packed (`pack_batch`) into at most
    `max_tokens` tokens (default MAX_PACKED_TOKENS; a row longer than that is a group of its
    own, run as it is), or None when the rows share fewer than `min_prefix` tokens or the groups
    would cost at least what the batch does. Cost: tokens + `pair` x attended pairs
    (`pair_cost`), the batch's over its padded width. The cap bounds the packed sequences'
    attention scores, which grow with the square of their length: a batch of long CoT rows
    packed whole would hold far more of them than the batch does."""
    tokens, lengths = tokens.cpu(), lengths.cpu()
    p = shared_prefix(tokens, lengths)
    if p < min_prefix:
        return None
    cap = MAX_PACKED_TOKENS if max_tokens is None else max_tokens
    groups, start, b = [], 0, len(lengths)
    while start < b:
        end, size = start, p
        while end < b and (end == start or size + int(lengths[end]) - p <= cap):
            size += int(lengths[end]) - p
            end += 1
        pack = pack_batch(tokens[start:end], lengths[start:end], min_prefix=p)
        groups.append((start, end, pack or _unpacked(tokens[start], int(lengths[start]))))
        start = end
    width = tokens.shape[1]
    packed = sum(n + pair * n * n for n in (g.tokens.shape[1] for _s, _e, g in groups))
    return groups if packed < b * (width + pair * width * width) else None


def hidden_at_shared_prefix(model, tokens: torch.Tensor, positions: torch.Tensor,
                            output_processor):
    """(final hidden states [b, h] at one position per row, head weight [V, h]) with the rows'
    shared prefix run once per group of rows (`pack_groups`), or (None, None) where the layout
    does not apply. Tokens after a row's position are not run. `output_processor`: the hook
    that hands over the hidden states [s, b, h] and head weight (`megatron_gpt.hidden_and_head`)."""
    if tokens.shape[0] < 2 or not layout_supported(model):
        return None, None
    lengths = positions.cpu() + 1
    groups = pack_groups(tokens, lengths, pair=pair_cost(model))
    if groups is None:
        return None, None
    out, weight = [], None
    for start, end, pack in groups:
        hidden, weight = packed_forward(model, pack, output_processor=output_processor)
        at = pack.index[torch.arange(end - start), lengths[start:end] - 1]
        out.append(hidden[:, 0][at.to(hidden.device)])
    return torch.cat(out), weight
