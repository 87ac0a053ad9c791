"""Label-constrained scoring of multi-token class names (a pretrained teacher's tokenizer):
the KV-cache scorer against brute force, one full forward per class."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from tiny_hf import build_checkpoint, build_tokenizer, domain_texts

TAXONOMY = ROOT / "conf/domains/finance.yaml"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    tok = build_tokenizer(domain_texts(TAXONOMY))
    return build_checkpoint("qwen3", folder, tok)


def _encoder(folder):
    from transformers import AutoTokenizer

    from distillscale.domain import load_taxonomy
    from distillscale.teacher.adapters import load_adapter
    from distillscale.tokenizer import ChatPromptEncoder

    tax = load_taxonomy(TAXONOMY)
    tok = AutoTokenizer.from_pretrained(folder)
    return ChatPromptEncoder(tok, tax.labels, 512, load_adapter(ROOT / "conf/teachers/chat.yaml"),
                             tax.task), tax


def test_cached_scorer_matches_a_full_forward_per_class(qwen3, megatron, monkeypatch):
    from transformers import AutoModelForCausalLM

    from distillscale.eval.indomain import class_scores_cached, class_scores_full, predict_labels
    from distillscale.models.hf_io import load_hf

    enc, tax = _encoder(qwen3)
    assert max(len(s) for s in enc.label_seqs) > 2  # names really span several tokens
    assert len({len(s) for s in enc.label_seqs}) > 1  # and of different lengths
    rows = [{"text": t, "label": tax.labels[0]} for t in (
        "Acme shares jump 12% after record quarter",
        "Regulator fines bank over reporting lapses",
        "Board approves $2 billion buyback",
    )]
    hf = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    # Brute force: a full transformers forward of prompt + class name, for every class.
    ref = torch.zeros(len(rows), len(enc.labels))
    with torch.no_grad():
        for i, r in enumerate(rows):
            p = enc.prompt_ids(r["text"])
            for c, s in enumerate(enc.label_seqs):
                lp = torch.log_softmax(hf(torch.tensor([p + s])).logits[0].float(), -1)
                ref[i, c] = sum(lp[len(p) - 1 + j, t] for j, t in enumerate(s))
    from distillscale.eval import indomain

    # One row per forward (the logits bound at 35 classes), then rows of different prompt
    # lengths in one forward (padding inside the packed sequence, the prefix cache repeated),
    # then with no shared prefix at all (no cache: the whole prompt in the packed sequence).
    for bound, batch in ((indomain.MAX_SCORED_POSITIONS, 2), (10_000, 2), (10_000, 3)):
        monkeypatch.setattr(indomain, "MAX_SCORED_POSITIONS", bound)
        cached = class_scores_cached(hf, enc, rows, batch_size=batch)
        assert torch.allclose(cached, ref, atol=1e-4), (bound, batch, (cached - ref).abs().max())
    assert indomain._common_prefix([enc.prompt_ids(r["text"]) for r in rows]) > 20
    monkeypatch.setattr(indomain, "_common_prefix", lambda prompts: 0)
    cached = class_scores_cached(hf, enc, rows, batch_size=3)
    assert torch.allclose(cached, ref, atol=1e-4), (cached - ref).abs().max()
    model, _, _ = load_hf(qwen3)
    full = class_scores_full(model, enc, rows, batch_size=2)
    assert torch.allclose(full, ref, atol=1e-4), (full - ref).abs().max()
    assert (predict_labels(model, enc, rows, hf_dir=qwen3) == ref.argmax(-1).numpy()).all()
    assert (predict_labels(model, enc, rows) == ref.argmax(-1).numpy()).all()


def test_chat_encoder_masks_every_class_token(qwen3):
    enc, tax = _encoder(qwen3)
    c = max(range(len(enc.labels)), key=lambda i: len(enc.label_seqs[i]))
    rows = [{"text": "Acme to buy rival", "label": tax.labels[c],
             "traces": {"cot_short": "A purchase of a rival company."}}]
    for depth, seqs in ((None, enc.label_seqs), ("cot_short", enc.trace_label_seqs)):
        b = enc.encode(rows, depth=depth)
        pos = int(b.answer_pos[0])
        n = len(seqs[c])
        assert b.answer_mask[0].nonzero().flatten().tolist() == list(range(pos, pos + n))
        assert b.targets[0, pos : pos + n].tolist() == seqs[c]
        assert int(b.targets[0, pos + n]) == enc.eos_id
    assert int(b.trace_len[0]) > 0
    text = enc.tok.decode(b.tokens[0, : int(b.answer_pos[0]) + 1])
    assert text.endswith("Answer:") and "A purchase of a rival company." in text
