import numpy as np
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
