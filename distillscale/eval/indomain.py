"""In-domain evaluation: label-constrained predictions and metrics with bootstrap CIs.

Label-constrained scoring reads, at the answer position, the logits of the class tokens only
and takes the argmax: no parse failures, so the metric measures the classifier, not the format.
"""

from __future__ import annotations

import numpy as np
import torch

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


def _from_confusion(cm: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro / weighted F1 and accuracy from a confusion matrix (rows = truth), restricted to
    `labels` as scikit-learn's `f1_score(labels=...)` is. Computing them from counts lets the
    bootstrap resample thousands of times without re-running scikit-learn per draw."""
    tp = np.diag(cm)[labels].astype(float)
    support = cm.sum(1)[labels].astype(float)
    predicted = cm.sum(0)[labels].astype(float)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
    }


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_gold: np.ndarray | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each metric's value and percentile-bootstrap 95% CI (rows resampled with replacement).

    F1 averages over the classes that occur in the labels or the predictions (scikit-learn's
    default): a class absent from a small test split neither helps nor hurts.
    `gold_accuracy` compares with the class each headline was generated for.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    k = int(max(y_true.max(), y_pred.max())) + 1
    labels = np.unique(np.concatenate([y_true, y_pred]))
    n = len(y_true)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (bootstrap, n))

    def confusion(y, p):
        return np.bincount(y * k + p, minlength=k * k).reshape(k, k)

    point = _from_confusion(confusion(y_true, y_pred), labels)
    samples = [_from_confusion(confusion(y_true[d], y_pred[d]), labels) for d in draws]
    if y_gold is not None:
        y_gold = np.asarray(y_gold)
        point["gold_accuracy"] = float((y_gold == y_pred).mean())
        for d, smp in zip(draws, samples):
            smp["gold_accuracy"] = float((y_gold[d] == y_pred[d]).mean())
    out: dict[str, dict[str, float]] = {}
    for name, value in point.items():
        lo = hi = value
        if bootstrap:
            lo, hi = (float(v) for v in np.percentile([s[name] for s in samples], [2.5, 97.5]))
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi}
    return out
