"""The dataset card's bag-of-words baseline: fitted on train, scored on test, flagged when a
bag of words solves the task."""

from collections import Counter

import numpy as np

from distillscale.data.card import write_card
from distillscale.domain import Taxonomy
from distillscale.domain_check import heldout_baseline

TAX = Taxonomy.model_validate({
    "name": "toy", "task": "Classify the toy text.", "for_import_only": True,
    "classes": [{"name": n, "definition": f"texts about {n}", "prior": 50}
                for n in ("alpha", "beta")]})


def _rows(n: int, seed: int, shared: float) -> list[dict]:
    """Texts whose class word appears with probability 1 - shared; otherwise a shared word."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = ("alpha", "beta")[i % 2]
        cue = label if rng.random() >= shared else "gamma"
        filler = " ".join(rng.choice(["red", "blue", "green", "big", "small"], 3))
        out.append({"id": f"{seed}-{i}", "text": f"{filler} {cue}", "label": label})
    return out


def _card(tmp_path, splits) -> str:
    metrics = {"rows_in": 0, "rows_kept": 0, "rows_rejected": 0, "classes_present": 2}
    write_card(tmp_path, TAX, splits, metrics)
    return (tmp_path / "dataset_card.md").read_text()


def test_card_reports_the_heldout_baseline(tmp_path):
    splits = {"train": _rows(400, 0, 0.5), "val": _rows(20, 1, 0.5), "test": _rows(200, 2, 0.5)}
    b = heldout_baseline(splits["train"], splits["test"])
    # Half the rows carry their class word, the rest are a coin flip: about 0.75.
    assert 0.6 < b["macro_f1"] < 0.9 and b["train_rows"] == 400 and b["test_rows"] == 200
    card = _card(tmp_path, splits)
    assert "## Bag-of-words baseline" in card
    assert f"macro F1 {b['macro_f1']:.3f}" in card and "nearly solve" not in card


def test_card_flags_a_task_word_counts_solve(tmp_path):
    splits = {"train": _rows(400, 0, 0.0), "val": _rows(20, 1, 0.0), "test": _rows(200, 2, 0.0)}
    card = _card(tmp_path, splits)
    assert "macro F1 1.000" in card and "word counts nearly solve this task" in card
    # A sample of the train split when it is larger than the cap.
    b = heldout_baseline(splits["train"], splits["test"], max_train=100, seed=3)
    assert b["train_rows"] == 100 and Counter(r["label"] for r in splits["test"])["alpha"] == 100
