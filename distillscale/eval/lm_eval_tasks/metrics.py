"""Prompt and metric functions of the shipped lm-eval tasks (referenced as `!function`)."""

from __future__ import annotations

import numpy as np

LETTERS = "ABCDEFGHIJ"


def mmlu_pro_text(doc) -> str:
    lines = [f"{doc['prefix']}{doc['question'].strip()}"]
    lines += [f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(doc["options"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_pro_letters(doc) -> list[str]:
    return list(LETTERS[: len(doc["options"])])


def mmlu_pro_options(doc) -> list[str]:
    return [o.strip() for o in doc["options"]]


def indomain_choices(doc) -> list[str]:
    return list(doc["classes"])


def indomain_results(doc, results) -> dict:
    """Label-constrained prediction: the class with the highest log-likelihood."""
    lls = np.array([r[0] for r in results])
    pred = int(lls.argmax())
    gold = int(doc["label_index"])
    return {"acc": float(pred == gold), "macro_f1": (gold, pred)}


def macro_f1(items) -> float:
    """Macro F1 over the classes present in labels or predictions (scikit-learn's default)."""
    # heavy: scikit-learn (about a second to import), only where it fits or scores
    from sklearn.metrics import f1_score

    golds, preds = zip(*items)
    return float(f1_score(golds, preds, average="macro"))
