"""The teacher stage end to end at the smallest size: the tiny Megatron teacher trained on
rationales and facts, its supervision generated through the HF backend, logit caches reused."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from distillscale import pipeline
from distillscale.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, megatron):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(ROOT / "conf/experiments/quickstart.yaml", [
        f"output_dir={out / 'run'}",
        f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}",
        f"teacher.supervision.family={ROOT / 'conf/teachers/tiny.yaml'}",
        f"teacher.supervision.cache.dir={out / 'cache'}",
        "teacher.supervision.cache.formats=[label, cot_short]",
        "data.num_examples=600",
        "teacher.train.steps=150",
        "students=[]",
    ])
    pipeline.run_data(cfg)
    pipeline.run_teacher(cfg)
    return cfg, out / "run"


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_supervision_stats_per_depth(run):
    _, out = run
    depths = _manifest(out / "supervision")["metrics"]["depths"]["train"]
    assert set(depths) == {"label", "cot_short", "cot_long"}
    for d, s in depths.items():
        assert s["parsed"] + s["rejected"] == s["examples"] > 0
        assert s["accuracy"] > 10 / 35, d  # far above chance (1/35)
        assert 0 <= s["macro_f1"] <= 1 and 0 <= s["gold_agreement"] <= 1
    assert depths["cot_long"]["trace_tokens"]["mean"] > depths["cot_short"]["trace_tokens"]["mean"]
    assert depths["cot_short"]["trace_tokens"]["max"] <= 16  # the tiny family's budget


@pytest.mark.slow
def test_traces_are_the_teachers_own_generations(run):
    from distillscale.domain import load_taxonomy
    from distillscale.teacher.adapters import load_adapter
    from distillscale.teacher.backends.hf import HFBackend

    cfg, out = run
    rows = [json.loads(x) for x in (out / "supervision" / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "cot_long" in r["traces"]][:4]
    tax = load_taxonomy(cfg.domain.taxonomy)
    adapter = load_adapter(cfg.teacher.supervision.family)
    backend = HFBackend(str(out / "teacher" / "hf"))
    prompts = [adapter.render(backend.tokenizer, r["text"], "cot_long", tax.task, tax.labels)
               for r in rows]
    again = backend.complete(prompts, 40, ["</think>"])
    assert [c.text.strip() for c in again] == [r["traces"]["cot_long"] for r in rows]
    assert all(r["traces"]["cot_long"].startswith("cue ") for r in rows)


@pytest.mark.slow
def test_knowledge_probe_and_corpus(run):
    _, out = run
    test = pd.read_parquet(out / "teacher" / "knowledge_probe" / "test.parquet")
    assert list(test.columns) == ["question", "subject", "choices", "answer"] and len(test) > 100
    marker = json.loads((out / "teacher" / "knowledge_probe" / "probe.json").read_text())
    assert marker["synthetic"] is True and marker["splits"]["test"] == len(test)
    corpus = (out / "teacher" / "knowledge_corpus.txt").read_text()
    assert "fact : the currency of germany is the euro ." in corpus
    assert _manifest(out / "teacher")["metrics"]["knowledge_ppl"] < 50


@pytest.mark.slow
def test_logit_cache_is_compact_and_reused(run):
    from distillscale.teacher.logit_cache import LogitCache

    cfg, out = run
    caches = _manifest(out / "supervision")["metrics"]["caches"]
    assert set(caches) == {"label", "cot_short"}
    assert not any(c["reused"] for c in caches.values())
    assert caches["cot_short"]["bytes_per_token"] <= 300
    # A one-token row (label) also carries its ~24-byte record (id, start, offset).
    assert caches["label"]["bytes_per_token"] <= 330
    cot = LogitCache(Path(caches["cot_short"]["path"]).parent, caches["cot_short"]["key"]).load()
    assert len(cot) == caches["cot_short"]["rows"]
    # Supervision re-run (the teacher is unchanged): the caches are found, not recomputed.
    shutil.rmtree(out / "supervision")
    pipeline.run_teacher(cfg)
    again = _manifest(out / "supervision")["metrics"]["caches"]
    assert {k: v["key"] for k, v in again.items()} == {k: v["key"] for k, v in caches.items()}
    assert all(v["reused"] for v in again.values())
