"""Tokenizer for tiny from-scratch teachers, and the prompt formats of the classification task.

A tiny teacher gets a word-level tokenizer (HF `tokenizers`, saved as a
`PreTrainedTokenizerFast`, so `transformers.AutoTokenizer` loads it) in which every class name
is one token: label-constrained scoring then reads one logit per class. A hub teacher brings
its own tokenizer; class names then span several tokens and are scored by summed log-likelihood.

The tiny family's format, with its thinking depths (the answer is always the class token right
after `event :`, so `PromptEncoder.answer_pos` / `label_token_ids` identify it in every format):

    label      <bos> headline : {text} event : {label} <eos>
    cot_short  <bos> headline : {text} <think_short> {trace} </think> event : {label} <eos>
    cot_long   <bos> headline : {text} <think_long> {trace} </think> event : {label} <eos>

The thinking-depth token is chosen by the tokenizer's chat template (`thinking=none|short|long`,
the tiny family's analogue of Qwen3's `enable_thinking`), so the teacher-supervision stage
drives the tiny teacher exactly as it drives a hub teacher: through `apply_chat_template`.
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
THINK_OPEN = {"cot_short": "<think_short>", "cot_long": "<think_long>"}
THINK_CLOSE = "</think>"
THINKING_TOKENS = (*THINK_OPEN.values(), THINK_CLOSE)
# The tiny family's chat template: the user message is the headline; `thinking` picks the depth.
CHAT_TEMPLATE = (
    "{{ bos_token }} headline : {{ messages[-1]['content'] }}"
    "{% if thinking is defined and thinking == 'short' %} <think_short>"
    "{% elif thinking is defined and thinking == 'long' %} <think_long>"
    "{% else %} event :{% endif %}"
)


def build_word_tokenizer(texts: list[str], labels: list[str], min_count: int = 1):
    """A lowercase word-level tokenizer over `texts`; every label is a single token."""
    # heavy: tokenizers / transformers, only when a tiny teacher's tokenizer is built
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
    for w in THINKING_TOKENS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    # Special tokens are matched before normalization and pre-tokenization, so "<think_long>"
    # stays one token instead of "<", "think_long", ">".
    tok.add_special_tokens([PAD, UNK, BOS, EOS, *THINKING_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=list(THINKING_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path):
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
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
    # [b] number of positions whose target is a trace token (thinking tokens, the trace,
    # `</think> event :`); they end right before `answer_pos`. 0 in the `label` format.
    trace_len: torch.Tensor | None = None


def pack_batch(seqs: list[tuple[list[int], int, int]], answer_lens: list[int],
               label_ids: list[int], pad_id: int) -> EncodedBatch:
    """One batch from rows encoded as `(ids, answer_pos, trace_len)`: inputs and next-token
    targets padded to the longest row, the answer mask over `answer_lens[i]` positions from
    `answer_pos` (the class name's tokens)."""
    b = len(seqs)
    s = max((len(ids) for ids, _, _ in seqs), default=2) - 1
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    targets = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    answer_mask = torch.zeros((b, s), dtype=torch.float32)
    answer_pos = torch.zeros(b, dtype=torch.long)
    trace_len = torch.zeros(b, dtype=torch.long)
    labels = torch.zeros(b, dtype=torch.long)
    for i, ((seq, pos, tl), n_ans, label) in enumerate(zip(seqs, answer_lens, label_ids)):
        n = len(seq)
        tokens[i, : n - 1] = torch.tensor(seq[:-1])
        targets[i, : n - 1] = torch.tensor(seq[1:])
        loss_mask[i, : n - 1] = 1.0
        answer_pos[i] = pos
        answer_mask[i, pos : pos + n_ans] = 1.0
        trace_len[i] = tl
        labels[i] = label
    return EncodedBatch(tokens, targets, loss_mask, answer_mask, answer_pos, labels, trace_len)


class PromptEncoder:
    """Turns (headline, label[, trace]) rows into token tensors for a decoder-only LM.

    Batches are padded to their longest row (at most `seq_length`), so short formats cost
    short sequences.
    """

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
                    f"class {name!r} is {len(ids)} tokens in this tokenizer; the tiny family's "
                    "format needs one token per class (multi-token names: ChatPromptEncoder)"
                )
            self.label_token_ids.append(ids[0])
        # Tokenizers built before thinking depths existed have no thinking tokens: they can
        # still encode the `label` format.
        vocab = tokenizer.get_vocab()
        self.think_open_ids = {d: vocab.get(t) for d, t in THINK_OPEN.items()}
        self.think_close_id = vocab.get(THINK_CLOSE)
        overhead = 1 + len(self.head_ids) + len(self.tail_ids) + 2
        if seq_length <= overhead + 4:
            raise ValueError(f"seq_length={seq_length} leaves no room for the headline")
        self.max_text = seq_length - overhead

    def prompt_ids(self, text: str) -> list[int]:
        body = self.tok.encode(text, add_special_tokens=False)[: self.max_text]
        return [self.bos_id] + self.head_ids + body + self.tail_ids

    def sequence(self, text: str, label_index: int, trace: str | None = None,
                 depth: str | None = None) -> tuple[list[int], int, int]:
        """(ids, answer_pos, trace_len) of one row; a trace needs its depth (`cot_short` or
        `cot_long`). The trace is cut so the whole sequence fits `seq_length`."""
        label = self.label_token_ids[label_index]
        if trace is None:
            prompt = self.prompt_ids(text)
            return prompt + [label, self.eos_id], len(prompt) - 1, 0
        open_id = self.think_open_ids.get(depth)
        if open_id is None or self.think_close_id is None:
            raise ValueError(f"depth {depth!r}: this tokenizer has no thinking token for it")
        head = [self.bos_id] + self.head_ids + self.tok.encode(
            text, add_special_tokens=False)[: self.max_text] + [open_id]
        tail = [self.think_close_id] + self.tail_ids
        room = self.seq_length - len(head) - len(tail) - 2
        body = self.tok.encode(trace, add_special_tokens=False)[: max(room, 0)]
        ids = head + body + tail + [label, self.eos_id]
        answer_pos = len(ids) - 3
        # Targets from the first trace token through "event :" are the trace.
        return ids, answer_pos, len(body) + len(tail)

    def encode(self, rows: list[dict], depth: str | None = None) -> EncodedBatch:
        """Rows `{"text", "label"}`; with `depth`, each row's `traces[depth]` goes between the
        headline and the answer."""
        index = {n: i for i, n in enumerate(self.labels)}
        seqs = []
        for row in rows:
            trace = None
            if depth is not None:
                traces = row.get("traces") or {}
                if depth not in traces or traces[depth] is None:
                    raise KeyError(f"row {row.get('id', '?')}: no {depth!r} trace "
                                   "(rows need traces from the teacher stage)")
                trace = traces[depth]
            seqs.append(self.sequence(row["text"], index[row["label"]], trace, depth))
        return pack_batch(seqs, [1] * len(rows), [index[row["label"]] for row in rows],
                          self.pad_id)


class ChatPromptEncoder:
    """The prompt format of a pretrained chat teacher (`teacher.source: hf`): every request is
    rendered by the checkpoint's own chat template through the supervision family adapter (the
    same rendering the teacher answered, so student training and teacher supervision agree), and
    the answer is the class name as the tokenizer splits it — usually several tokens.

        label   {chat prompt at the label depth}{class name}<eos>
        cot_*   {chat prompt at that depth}{trace_start}{trace}\n{trace_end}{ class name}<eos>

    The same surface as `PromptEncoder` (`encode`, `sequence`, `prompt_ids`, `labels`, ids of
    pad / eos): `answer_pos` is the position predicting the class name's first token and
    `answer_mask` covers every position predicting one of its tokens; `label_seqs[c]` are the
    token ids of class c right after the label prompt (what label-constrained scoring sums).
    """

    def __init__(self, tokenizer, labels: list[str], seq_length: int, adapter, task: str):
        self.tok = tokenizer
        self.labels = labels
        self.seq_length = seq_length
        self.adapter = adapter
        self.task = task
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the teacher's tokenizer has no eos token: answers cannot end")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id
        self.label_seqs = [tokenizer.encode(n, add_special_tokens=False) for n in labels]
        # After a trace the class name follows `trace_end` and a space ("Answer: <class>").
        closer = adapter.trace_end or ""
        lead = " " if closer and not closer[-1].isspace() else ""
        self.trace_label_seqs = [tokenizer.encode(lead + n, add_special_tokens=False)
                                 for n in labels]
        if len({tuple(s) for s in self.label_seqs}) != len(labels):
            raise ValueError("two class names tokenize to the same ids in the teacher's tokenizer")
        self.label_token_ids = [s[0] for s in self.label_seqs]
        self.single_token = all(len(s) == 1 for s in self.label_seqs)
        self.think_open_ids: dict[str, int | None] = {}
        self.think_close_id = None
        self._prompts: dict[tuple[str, str], list[int]] = {}

    def prompt_ids(self, text: str, depth: str | None = None) -> list[int]:
        """Token ids of the rendered request (the chat template writes every special token)."""
        d = depth or "label"
        key = (text, d)
        if key not in self._prompts:
            rendered = self.adapter.render(self.tok, text, d, self.task, self.labels)
            ids = self.tok.encode(rendered, add_special_tokens=False)
            if len(ids) + max(len(s) for s in self.label_seqs) + 1 > self.seq_length:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room for the answer in "
                                 f"seq_length={self.seq_length}: {text[:60]!r}")
            self._prompts[key] = ids
        return self._prompts[key]

    def sft_texts(self, text: str, label: str, trace: str | None = None,
                  depth: str | None = None) -> tuple[str, str]:
        """(prompt, completion) as text: the strings `sequence` encodes (before its eos and
        its trace truncation), for trainers that tokenize prompt-completion pairs themselves
        (Megatron-Bridge's SFT dataset)."""
        if trace is None:
            return self.adapter.render(self.tok, text, "label", self.task, self.labels), label
        if depth is None:
            raise ValueError("a trace needs its depth (cot_short or cot_long)")
        closer = self.adapter.trace_end or ""
        lead = " " if closer and not closer[-1].isspace() else ""
        completion = (self.adapter.trace_start or "") + trace.strip() + "\n" + closer + lead + label
        return self.adapter.render(self.tok, text, depth, self.task, self.labels), completion

    def sequence(self, text: str, label_index: int, trace: str | None = None,
                 depth: str | None = None) -> tuple[list[int], int, int]:
        if trace is None:
            prompt = self.prompt_ids(text)
            return prompt + self.label_seqs[label_index] + [self.eos_id], len(prompt) - 1, 0
        if depth is None:
            raise ValueError("a trace needs its depth (cot_short or cot_long)")
        prompt = self.prompt_ids(text, depth)
        answer = self.trace_label_seqs[label_index]
        body = (self.adapter.trace_start or "") + trace.strip() + "\n"
        closer = self.tok.encode(self.adapter.trace_end or "", add_special_tokens=False)
        room = self.seq_length - len(prompt) - len(closer) - len(answer) - 1
        trace_ids = self.tok.encode(body, add_special_tokens=False)[: max(room, 0)] + closer
        ids = prompt + trace_ids + answer + [self.eos_id]
        return ids, len(prompt) + len(trace_ids) - 1, len(trace_ids)

    def encode(self, rows: list[dict], depth: str | None = None) -> EncodedBatch:
        index = {n: i for i, n in enumerate(self.labels)}
        seqs, spans = [], []
        for row in rows:
            trace = None
            if depth is not None:
                trace = (row.get("traces") or {}).get(depth)
                if trace is None:
                    raise KeyError(f"row {row.get('id', '?')}: no {depth!r} trace "
                                   "(rows need traces from the teacher stage)")
            c = index[row["label"]]
            seqs.append(self.sequence(row["text"], c, trace, depth))
            spans.append(len((self.label_seqs if trace is None else self.trace_label_seqs)[c]))
        return pack_batch(seqs, spans, [index[row["label"]] for row in rows], self.pad_id)


def make_encoder(tokenizer, labels: list[str], seq_length: int, adapter=None, task: str = ""):
    """`ChatPromptEncoder` when a family adapter for a pretrained chat teacher is given, else the
    tiny family's `PromptEncoder`."""
    if adapter is None:
        return PromptEncoder(tokenizer, labels, seq_length)
    return ChatPromptEncoder(tokenizer, labels, seq_length, adapter, task)
