"""In-domain evaluation: label-constrained predictions and metrics with bootstrap CIs.

Label-constrained scoring reads, at the answer position, the logits of the class tokens only
and takes the argmax: no parse failures, so the metric measures the classifier, not the format.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from distillscale.models.megatron_gpt import forward_logits
from distillscale.tokenizer import PromptEncoder


@torch.no_grad()
def predict_labels(model, encoder: PromptEncoder, rows: list[dict], batch_size: int = 128) -> np.ndarray:
    """Class index predicted for each row."""
    class_ids = torch.tensor(encoder.label_token_ids)
    preds = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        b = encoder.encode(rows[i : i + batch_size])
        logits = forward_logits(model, b.tokens)
        at_answer = logits[torch.arange(len(b.answer_pos)), b.answer_pos]
        preds.append(at_answer[:, class_ids].argmax(-1))
    return torch.cat(preds).numpy()


def _metric(name: str, y: np.ndarray, p: np.ndarray, labels: list[int]) -> float:
    if name == "macro_f1":
        return float(f1_score(y, p, average="macro", labels=labels, zero_division=0))
    if name == "weighted_f1":
        return float(f1_score(y, p, average="weighted", labels=labels, zero_division=0))
    return float(accuracy_score(y, p))


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_gold: np.ndarray | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each metric's value and percentile-bootstrap 95% CI (rows resampled with replacement).

    F1 averages over the classes that occur in the labels or the predictions (as scikit-learn
    does by default): a class absent from a small test split neither helps nor hurts.
    `gold_accuracy` compares with the class each headline was generated for.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    plan = [("macro_f1", y_true), ("weighted_f1", y_true), ("accuracy", y_true)]
    if y_gold is not None:
        plan.append(("gold_accuracy", np.asarray(y_gold)))
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws = [rng.integers(0, n, n) for _ in range(bootstrap)]
    out: dict[str, dict[str, float]] = {}
    for name, y in plan:
        value = _metric(name, y, y_pred, labels)
        lo = hi = value
        if draws:
            samples = [_metric(name, y[d], y_pred[d], labels) for d in draws]
            lo, hi = (float(v) for v in np.percentile(samples, [2.5, 97.5]))
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi}
    return out
