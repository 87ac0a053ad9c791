"""Tokenizer for tiny from-scratch teachers, and the prompt format of the classification task.

A tiny teacher gets a word-level tokenizer (HF `tokenizers`, saved as a
`PreTrainedTokenizerFast`, so `transformers.AutoTokenizer` loads it) in which every class name
is one token: label-constrained scoring then reads one logit per class. A hub teacher brings
its own tokenizer; class names then span several tokens and are scored by summed log-likelihood.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# Prompt: "<bos> headline : {text} event : {label} <eos>"
PROMPT_HEAD = "headline :"
PROMPT_TAIL = "event :"


def build_word_tokenizer(texts: list[str], labels: list[str], min_count: int = 1):
    """A lowercase word-level tokenizer over `texts`; every label is a single token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Isolate punctuation except "_" (HF's Punctuation pre-tokenizer would split snake_case
    # class names, which must stay one token each).
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), "isolated")]
    )
    norm = normalizers.Lowercase()
    counts: Counter[str] = Counter()
    for t in texts + [PROMPT_HEAD, PROMPT_TAIL]:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    words = sorted(w for w, c in counts.items() if c >= min_count)
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS])}
    for w in list(labels) + words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class EncodedBatch:
    tokens: torch.Tensor  # [b, s] input ids
    targets: torch.Tensor  # [b, s] next-token ids (pad where no target)
    loss_mask: torch.Tensor  # [b, s] 1 where the next token is a trained target
    answer_mask: torch.Tensor  # [b, s] 1 at the position that predicts the label token
    answer_pos: torch.Tensor  # [b] index of that position
    label_ids: torch.Tensor  # [b] class index (into the taxonomy)


class PromptEncoder:
    """Turns (headline, label) rows into fixed-length token tensors for a decoder-only LM."""

    def __init__(self, tokenizer, labels: list[str], seq_length: int):
        self.tok = tokenizer
        self.labels = labels
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.head_ids = tokenizer.encode(PROMPT_HEAD, add_special_tokens=False)
        self.tail_ids = tokenizer.encode(PROMPT_TAIL, add_special_tokens=False)
        self.label_token_ids = []
        for name in labels:
            ids = tokenizer.encode(name, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"class {name!r} is {len(ids)} tokens in this tokenizer; label-constrained "
                    "scoring of multi-token labels needs the evaluation issue's scorer"
                )
            self.label_token_ids.append(ids[0])
        overhead = 1 + len(self.head_ids) + len(self.tail_ids) + 2
        if seq_length <= overhead + 4:
            raise ValueError(f"seq_length={seq_length} leaves no room for the headline")
        self.max_text = seq_length - overhead

    def prompt_ids(self, text: str) -> list[int]:
        body = self.tok.encode(text, add_special_tokens=False)[: self.max_text]
        return [self.bos_id] + self.head_ids + body + self.tail_ids

    def encode(self, rows: list[dict]) -> EncodedBatch:
        b, s = len(rows), self.seq_length
        tokens = torch.full((b, s), self.pad_id, dtype=torch.long)
        targets = torch.full((b, s), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((b, s), dtype=torch.float32)
        answer_mask = torch.zeros((b, s), dtype=torch.float32)
        answer_pos = torch.zeros(b, dtype=torch.long)
        label_ids = torch.zeros(b, dtype=torch.long)
        index = {n: i for i, n in enumerate(self.labels)}
        for i, row in enumerate(rows):
            prompt = self.prompt_ids(row["text"])
            li = index[row["label"]]
            seq = prompt + [self.label_token_ids[li], self.eos_id]
            n = len(seq)
            tokens[i, : n - 1] = torch.tensor(seq[:-1])
            targets[i, : n - 1] = torch.tensor(seq[1:])
            loss_mask[i, : n - 1] = 1.0
            answer_pos[i] = len(prompt) - 1
            answer_mask[i, len(prompt) - 1] = 1.0
            label_ids[i] = li
        return EncodedBatch(tokens, targets, loss_mask, answer_mask, answer_pos, label_ids)
