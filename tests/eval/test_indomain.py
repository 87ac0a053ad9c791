import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from distillscale.eval.indomain import score


def test_metrics_match_sklearn_and_cis_bracket_values():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 400)
    pred = np.where(rng.random(400) < 0.7, y, rng.integers(0, 6, 400))
    m = score(y, pred, y_gold=y, bootstrap=300, seed=1)
    assert np.isclose(m["macro_f1"]["value"], f1_score(y, pred, average="macro"))
    assert np.isclose(m["weighted_f1"]["value"], f1_score(y, pred, average="weighted"))
    assert np.isclose(m["accuracy"]["value"], accuracy_score(y, pred))
    assert m["gold_accuracy"]["value"] == m["accuracy"]["value"]
    for v in m.values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
        assert v["ci_high"] - v["ci_low"] < 0.15


def test_bootstrap_ci_covers_true_accuracy_most_of_the_time():
    # Classifier with true accuracy 0.8 on fresh samples: the 95% CI should cover 0.8 in
    # roughly 95% of repetitions (allow a generous band for 60 repetitions).
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(60):
        y = rng.integers(0, 4, 300)
        correct = rng.random(300) < 0.8
        pred = np.where(correct, y, (y + 1) % 4)
        m = score(y, pred, bootstrap=200, seed=int(rng.integers(1 << 30)))["accuracy"]
        covered += m["ci_low"] <= 0.8 <= m["ci_high"]
    assert covered >= 50


def test_per_class_f1_and_confusion_match_sklearn():
    from sklearn.metrics import confusion_matrix

    from distillscale.eval.indomain import score_detailed

    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    names = ["a", "b", "c", "d", "e"]
    _, per_class, cells = score_detailed(y, pred, None, 100, 0, False, names)
    ref = f1_score(y, pred, average=None, labels=range(5))
    assert [r["label"] for r in per_class] == names
    for r, want in zip(per_class, ref):
        assert r["value"] == pytest.approx(want)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    cm = confusion_matrix(y, pred, labels=range(5))
    got = np.zeros((5, 5), int)
    for c in cells:
        got[names.index(c["true"]), names.index(c["pred"])] = c["count"]
        assert c["ci_low"] <= c["count"] <= c["ci_high"]
    assert (got == cm).all()


def test_parse_failures_count_as_wrong_and_are_reported():
    from distillscale.eval.indomain import score_detailed

    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    pred = np.array([0, 1, -1, 0, -1, 2, 1, 1])
    m, _, cells = score_detailed(y, pred, None, 50, 0, True, ["x", "y", "z"])
    assert m["parse_failure_rate"]["value"] == pytest.approx(2 / 8)
    assert m["accuracy"]["value"] == pytest.approx(5 / 8)
    # scikit-learn with the failure as its own (never true) class gives the same macro F1
    ref = f1_score(y, np.where(pred < 0, 3, pred), average="macro", labels=[0, 1, 2])
    assert m["macro_f1"]["value"] == pytest.approx(ref)
    assert sum(c["count"] for c in cells if c["pred"] == "<no answer>") == 2


@pytest.mark.parametrize("text,want", [
    ("merger_acquisition <eos>", 0),
    ("<think_long> maybe earnings ? no , a deal </think> event : merger_acquisition", 0),
    ("<think_short> merger_acquisition looks likely </think> event : earnings_report", 1),
    ("<think_long> the reasoning never ends merger_acquisition", -1),
    ("nothing useful here", -1),
    ("answer: Earnings_Report", 1),
])
def test_parse_answer_reads_after_the_reasoning(text, want):
    from distillscale.eval.indomain import parse_answer

    assert parse_answer(text, ["merger_acquisition", "earnings_report"]) == want


def test_generative_scoring_decodes_then_parses(monkeypatch):
    """Greedy decoding through a scripted model: it reasons, naming a wrong class, then answers."""
    import torch

    import distillscale.eval.indomain as ind
    from distillscale.tokenizer import PromptEncoder, build_word_tokenizer

    labels = ["merger_acquisition", "earnings_report"]
    tok = build_word_tokenizer(["acme buys rival", "acme beats estimates"], labels)
    enc = PromptEncoder(tok, labels, 48)
    vocab = len(tok)
    script = {  # headline word -> what the model "writes"
        "buys": "earnings_report ? no </think> event : merger_acquisition",
        "beats": "hmm </think> event : earnings_report",
    }

    def fake_logits(model, toks):
        out = torch.zeros(toks.shape[0], toks.shape[1], vocab)
        for i, row in enumerate(toks.tolist()):
            text = tok.decode([t for t in row if t != enc.pad_id], skip_special_tokens=False)
            key = "buys" if "buys" in text else "beats"
            plan = tok.encode(script[key], add_special_tokens=False) + [enc.eos_id]
            prompt_len = len(enc.prompt_ids(f"acme {key} x")) - len(enc.tail_ids) + 1
            done = len(row) - row.count(enc.pad_id) - prompt_len  # tokens generated so far
            nxt = plan[min(max(done, 0), len(plan) - 1)]
            out[i, -1, nxt] = 10.0
        return out

    monkeypatch.setattr(ind, "forward_logits", fake_logits)
    monkeypatch.setattr(ind, "logits_at",
                        lambda m, t, p: fake_logits(m, t)[torch.arange(len(p)), p])
    rows = [{"text": "acme buys rival", "label": labels[0]},
            {"text": "acme beats estimates", "label": labels[1]}]
    pred, texts = ind.generate_labels(torch.nn.Identity(), enc, rows, max_new_tokens=20, depth="cot_short")
    assert "</think>" in texts[0]
    assert pred.tolist() == [0, 1]
    # With too few tokens the reasoning is cut before the answer: a parse failure.
    pred, _ = ind.generate_labels(torch.nn.Identity(), enc, rows, max_new_tokens=2, depth="cot_short")
    assert pred.tolist() == [-1, -1]
