import json

import pytest
import torch

from distillscale.teacher.supervision import (
    FORMATS,
    load_supervision_rows,
    supervision_batch,
)
from distillscale.tokenizer import PromptEncoder, build_word_tokenizer

LABELS = ["earnings_beat", "earnings_miss"]
ROWS = [
    {"id": "a", "text": "Acme profit tops estimates", "label": "earnings_beat",
     "traces": {"cot_short": "cue tops . results above expectations .",
                "cot_long": "cue profit tops . results above expectations . not earnings_miss"}},
    {"id": "b", "text": "Acme misses forecast", "label": "earnings_miss",
     "traces": {"cot_short": "cue misses .", "cot_long": "cue misses . results below expectations ."}},
]


@pytest.fixture(scope="module")
def enc():
    texts = [r["text"] for r in ROWS] + [t for r in ROWS for t in r["traces"].values()]
    return PromptEncoder(build_word_tokenizer(texts, LABELS), LABELS, 64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_are_disjoint_and_cover_every_target(enc, fmt):
    sup = supervision_batch(enc, ROWS, fmt)
    total = sup.prompt_mask + sup.trace_mask + sup.answer_mask
    assert total.max() <= 1
    # Every real target but the final eos is in exactly one of the three masks.
    real = (sup.targets != enc.pad_id).float()
    eos = (sup.targets == enc.eos_id).float()
    assert torch.equal(total, real - eos)
    assert torch.equal(sup.answer_mask.sum(1), torch.ones(2))
    assert torch.equal(sup.label_ids, torch.tensor([0, 1]))
    ans = sup.targets[sup.answer_mask.bool()]
    assert ans.tolist() == [enc.label_token_ids[0], enc.label_token_ids[1]]
    assert torch.equal(sup.kd_mask, sup.trace_mask + sup.answer_mask)


def test_label_has_no_trace_and_cot_depths_differ(enc):
    assert supervision_batch(enc, ROWS, "label").trace_mask.sum() == 0
    short = supervision_batch(enc, ROWS, "cot_short").trace_mask.sum(1)
    long = supervision_batch(enc, ROWS, "cot_long").trace_mask.sum(1)
    assert (long > short).all()
    blended = supervision_batch(enc, ROWS, "blended_cot")
    assert torch.equal(blended.trace_mask.sum(1), long)
    # The trace mask covers exactly the trace text, `</think>` and `event :`.
    n_trace = len(enc.tok.encode(ROWS[1]["traces"]["cot_short"], add_special_tokens=False))
    assert short[1] == n_trace + 1 + len(enc.tail_ids)


def test_unknown_format_is_an_error(enc):
    with pytest.raises(ValueError, match="unknown supervision format"):
        supervision_batch(enc, ROWS, "cot_medium")


def test_load_supervision_rows_drops_rejected_traces(tmp_path):
    rows = [dict(ROWS[0]), {**ROWS[1], "traces": {"cot_short": "cue misses ."}}]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    assert [r["id"] for r in load_supervision_rows(tmp_path, "train", "label")] == ["a", "b"]
    assert [r["id"] for r in load_supervision_rows(tmp_path, "train", "cot_long")] == ["a"]
    assert [r["id"] for r in load_supervision_rows(tmp_path, "train", "blended_cot")] == ["a"]
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        load_supervision_rows(tmp_path, "val", "label")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_supervision_rows(tmp_path, "bad", "label")
