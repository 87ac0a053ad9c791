import pytest
import torch

from distillscale.tokenizer import (
    THINK_CLOSE,
    THINK_OPEN,
    PromptEncoder,
    build_word_tokenizer,
    load_tokenizer,
)

LABELS = ["earnings_beat", "earnings_miss"]
ROWS = [
    {"id": "a", "text": "Acme profit tops estimates", "label": "earnings_beat",
     "traces": {"cot_short": "cue tops . results above expectations .",
                "cot_long": "cue profit tops . results above expectations . not earnings_miss "
                            ": results below expectations ."}},
    {"id": "b", "text": "Acme misses Q3 revenue forecast as sales weaken", "label": "earnings_miss",
     "traces": {"cot_short": "cue misses . results below expectations .",
                "cot_long": "cue misses weaken . results below expectations ."}},
]


@pytest.fixture(scope="module")
def tok():
    texts = [r["text"] for r in ROWS] + [t for r in ROWS for t in r["traces"].values()]
    return build_word_tokenizer(texts, LABELS)


def test_labels_and_thinking_tokens_are_single_tokens(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    for w in LABELS + list(THINK_OPEN.values()) + [THINK_CLOSE]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    ids = tok.encode("cue tops .</think> event :", add_special_tokens=False)
    assert tok.convert_tokens_to_ids(THINK_CLOSE) in ids


def test_chat_template_selects_the_thinking_depth(tok):
    msgs = [{"role": "user", "content": "Acme profit tops estimates"}]
    label = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                    thinking="none")
    long = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   thinking="long")
    assert label.split() == ["<bos>", "headline", ":", "Acme", "profit", "tops", "estimates", "event", ":"]
    assert long.split()[-1] == THINK_OPEN["cot_long"]


def test_label_format_is_unchanged_and_padded_to_the_longest_row(tok):
    enc = PromptEncoder(tok, LABELS, seq_length=64)
    b = enc.encode(ROWS)
    longest = max(len(enc.prompt_ids(r["text"])) for r in ROWS) + 2
    assert b.tokens.shape == (2, longest - 1)
    for i, r in enumerate(ROWS):
        pos = int(b.answer_pos[i])
        assert b.targets[i, pos] == enc.label_token_ids[LABELS.index(r["label"])]
        assert b.tokens[i, pos - 1 : pos + 1].tolist() == enc.tail_ids
    assert (b.trace_len == 0).all()


def test_trace_sits_between_prompt_and_answer(tok):
    enc = PromptEncoder(tok, LABELS, seq_length=64)
    b = enc.encode(ROWS, depth="cot_long")
    for i, r in enumerate(ROWS):
        pos, tl = int(b.answer_pos[i]), int(b.trace_len[i])
        assert b.targets[i, pos] == enc.label_token_ids[LABELS.index(r["label"])]
        trace_targets = b.targets[i, pos - tl : pos].tolist()
        body = tok.encode(r["traces"]["cot_long"], add_special_tokens=False)
        assert trace_targets == body + [enc.think_close_id] + enc.tail_ids
        assert b.tokens[i, pos - tl] == enc.think_open_ids["cot_long"]


def test_long_traces_are_cut_to_fit(tok):
    enc = PromptEncoder(tok, LABELS, seq_length=24)
    row = dict(ROWS[0], traces={"cot_long": " ".join(["results"] * 50)})
    b = enc.encode([row], depth="cot_long")
    assert b.tokens.shape[1] + 1 <= 24
    assert b.targets[0, int(b.answer_pos[0])] == enc.label_token_ids[0]


def test_missing_trace_names_the_row(tok):
    enc = PromptEncoder(tok, LABELS, seq_length=64)
    with pytest.raises(KeyError, match="row a: no 'cot_short' trace"):
        enc.encode([{"id": "a", "text": "x", "label": "earnings_beat"}], depth="cot_short")
    assert torch.is_tensor(enc.encode([ROWS[0]]).tokens)
