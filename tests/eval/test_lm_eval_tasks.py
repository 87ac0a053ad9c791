"""The shipped lm-eval tasks end to end on local files, scored by a rule-based LM whose exact
accuracy is known in advance."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from distillscale.config import load_config
from distillscale.eval.general import benchmark_paths, evaluate, general_tasks
from distillscale.eval.lm_eval_tasks.loaders import LocalBenchmarkError, load_mmlu
from distillscale.knowledge.general import PROBE_DIR, write_knowledge_probe

ROOT = Path(__file__).resolve().parents[2]


@register_model("distillscale_rule_lm")
class RuleLM(LM):
    """Knows every answer to questions about 'alpha' topics, answers 'A' (or the first option)
    otherwise; for the in-domain task it picks the class named in the headline."""

    def __init__(self, known=("alpha",), **kwargs):
        super().__init__()
        self.known = known

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for req in requests:
            ctx, cont = req.args
            doc = req.doc
            if "label_index" in doc:  # in-domain: "... headline : <class> rises event :"
                named = re.search(r"headline : (\w+)", ctx).group(1)
                score = 0.0 if cont.strip() == named else -1.0
            else:
                gold = doc.get("answer_index", doc.get("answer"))
                choices = doc.get("options", doc.get("choices"))
                idx = _index(cont, choices)
                if any(k in doc["question"] for k in self.known):
                    score = 0.0 if idx == gold else -1.0
                else:
                    score = 0.0 if idx == 0 else -1.0
            out.append((score, score == 0.0))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def _index(cont, choices):
    c = cont.strip()
    if len(c) == 1 and c in "ABCDEFGHIJ":
        return "ABCDEFGHIJ".index(c)
    return [x.strip() for x in choices].index(c)


def _mmlu(root, n=20):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        topic = "alpha" if i % 2 == 0 else "beta"
        rows.append({"question": f"{topic} question {i}?", "subject": topic,
                     "choices": [f"c{i}_{j}" for j in range(4)], "answer": int(rng.integers(4))})
    df = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    df.to_parquet(root / "test.parquet")
    df.head(4).to_parquet(root / "dev.parquet")
    return df


def _mmlu_pro(root, n=12):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        k = 4 + i % 7
        a = int(rng.integers(k))
        topic = "alpha" if i % 3 == 0 else "gamma"
        rows.append({"question": f"{topic} pro {i}?", "options": [f"o{i}_{j}" for j in range(k)],
                     "answer": "ABCDEFGHIJ"[a], "answer_index": a, "category": topic})
    df = pd.DataFrame(rows)
    (root / "test").mkdir(parents=True, exist_ok=True)  # hub layout: <split>/*.parquet
    df.to_parquet(root / "test" / "part-0.parquet")
    return df


def _expected(df, gold_col):
    known = df["question"].str.contains("alpha")
    return float(np.where(known, 1.0, df[gold_col] == 0).mean())


@pytest.mark.parametrize("cloze", [False, True])
def test_mmlu_and_mmlu_pro_exact_accuracy(tmp_path, monkeypatch, cloze):
    monkeypatch.chdir(tmp_path / ".." )  # the loaders must not depend on the working directory
    mmlu = _mmlu(tmp_path / "mmlu")
    pro = _mmlu_pro(tmp_path / "pro")
    tasks, meta, notes = general_tasks(
        {"mmlu_path": str(tmp_path / "mmlu"), "mmlu_pro_path": str(tmp_path / "pro")}, cloze)
    assert notes == ["probe: skipped (eval.general.probe_path is not set)"]
    res = evaluate(RuleLM(), tasks, meta)
    assert res["mmlu"]["value"] == pytest.approx(_expected(mmlu, "answer"))
    assert res["mmlu_pro"]["value"] == pytest.approx(_expected(pro, "answer_index"))
    assert res["mmlu"]["n"] == 20 and res["mmlu_pro"]["n"] == 12
    for v in res.values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"] and v["ci_high"] > v["ci_low"]


def test_unset_benchmark_is_skipped_with_a_note():
    tasks, meta, notes = general_tasks({}, cloze=False)
    assert tasks == {} and meta == {}
    assert notes == ["mmlu: skipped (eval.general.mmlu_path is not set)",
                     "mmlu_pro: skipped (eval.general.mmlu_pro_path is not set)",
                     "probe: skipped (eval.general.probe_path is not set)"]
    with pytest.raises(ValueError, match=r"unknown benchmark key\(s\) \['mmlu'\]"):
        general_tasks({"mmlu": "/data/mmlu"}, cloze=False)


@pytest.mark.parametrize("cloze", [False, True])
def test_quickstart_eval_reports_the_probe_as_probe_never_as_mmlu(tmp_path, cloze):
    # The quickstart's eval.general, with the probe where its teacher stage writes it.
    cfg = load_config(ROOT / "conf/experiments/quickstart.yaml", [f"output_dir={tmp_path / 'run'}"])
    k = cfg.teacher.knowledge
    write_knowledge_probe(cfg.run_dir / "teacher" / PROBE_DIR, cfg.seed, 40, countries=k.countries,
                          arithmetic=k.arithmetic, conversions=k.conversions)
    tasks, meta, notes = general_tasks(benchmark_paths(cfg.eval.general, cfg.run_dir), cloze)
    assert tasks == {"probe": "distillscale_probe_cloze" if cloze else "distillscale_probe"}
    assert "mmlu: skipped (eval.general.mmlu_path is not set)" in notes
    res = evaluate(RuleLM(), tasks, meta)
    # The rule LM knows no probe question: it answers the first choice, right where answer = 0.
    test = pd.read_parquet(cfg.run_dir / "teacher" / PROBE_DIR / "test.parquet")
    assert set(res) == {"probe"}
    assert res["probe"]["n"] == 40
    assert res["probe"]["value"] == pytest.approx(float((test["answer"] == 0).mean()))


def test_the_probe_is_refused_as_mmlu_at_eval_by_its_marker(tmp_path):
    # Outside a teacher folder the probe is told apart by its marker file, not its place.
    quiz = tmp_path / "quiz"
    write_knowledge_probe(quiz, 0, 12, countries=20, arithmetic=10, conversions=10)
    assert json.loads((quiz / "probe.json").read_text())["synthetic"] is True
    for key in ("mmlu_path", "mmlu_pro_path"):
        with pytest.raises(ValueError, match=rf"^eval\.general\.{key}: .*quiz is the synthetic "
                                             r"knowledge probe.*set eval\.general\.probe_path"):
            general_tasks({key: str(quiz)}, cloze=True)
    tasks, _, _ = general_tasks({"probe_path": str(quiz)}, cloze=True)
    assert tasks == {"probe": "distillscale_probe_cloze"}


def test_indomain_task_macro_f1_aggregation(tmp_path):
    classes = ["merger", "earnings", "lawsuit"]
    rows = []
    # The rule LM reads the class off the headline's first word; some headlines name the wrong
    # class, so predictions differ from labels in a known way.
    lead = ["merger", "earnings", "lawsuit", "merger", "earnings", "earnings", "lawsuit", "merger"]
    label = ["merger", "earnings", "lawsuit", "earnings", "earnings", "lawsuit", "lawsuit", "merger"]
    for i, (w, lab) in enumerate(zip(lead, label)):
        rows.append({"id": str(i), "text": f"{w} rises {i}", "label": lab})
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from sklearn.metrics import accuracy_score, f1_score

    res = evaluate(RuleLM(), {"indomain": "distillscale_indomain"},
                   {"indomain_path": str(tmp_path)})
    y = [classes.index(x) for x in label]
    p = [classes.index(x) for x in lead]
    assert res["indomain"]["value"] == pytest.approx(accuracy_score(y, p))
    assert res["indomain_macro_f1"]["value"] == pytest.approx(f1_score(y, p, average="macro"))


def test_bad_local_copy_fails_naming_file_and_row(tmp_path):
    df = _mmlu(tmp_path / "m", 6)
    df.loc[3, "answer"] = 7
    df.to_parquet(tmp_path / "m" / "test.parquet")
    with pytest.raises(LocalBenchmarkError, match=r"test\.parquet: row 3: answer 7 is not in 0\.\.3"):
        load_mmlu(mmlu_path=str(tmp_path / "m"))
    with pytest.raises(LocalBenchmarkError, match="mmlu_path"):
        load_mmlu()
