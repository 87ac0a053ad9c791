import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillscale.domain import load_taxonomy
from distillscale.teacher.adapters import load_adapter
from distillscale.teacher.generate import (
    GenerationSettings,
    generate_supervision,
    supervision_stats,
)

sys.path.insert(0, str(Path(__file__).parent))
from scripted_backend import ScriptedBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tax():
    return load_taxonomy(ROOT / "conf/domains/finance.yaml")


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(ROOT / "conf/teachers/tiny.yaml")


def _rows(tax, n):
    return [{"id": f"r{i}", "text": f"h{i} {tax.labels[i % 5]}", "label": tax.labels[i % 5]}
            for i in range(n)]


def test_labels_traces_and_stats(tmp_path, tax, adapter):
    rows = _rows(tax, 10)
    rows[3]["gold_label"] = tax.labels[9]
    out = generate_supervision(ScriptedBackend(), adapter, tax, rows, tmp_path,
                               GenerationSettings(depths=["label", "cot_long"], shard_size=4), "t")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert all(r["teacher"]["label"]["label"] == r["label"] for r in out)
    assert out[0]["traces"] == {"cot_long": f"because {rows[0]['label']} ."}
    stats = supervision_stats(out, ["label", "cot_long"], tax.labels)
    assert stats["label"]["accuracy"] == 1.0 and stats["label"]["gold_agreement"] == 0.9
    assert stats["cot_long"]["trace_tokens"]["mean"] == 3
    assert len(list(tmp_path.glob("shard-*.jsonl"))) == 3


def test_malformed_answers_are_retried_then_kept_with_the_reason(tmp_path, tax, adapter):
    rows = _rows(tax, 6)
    # Two garbage answers on the greedy pass: both retried with sampling and then fine.
    out = generate_supervision(ScriptedBackend(garbage_first=2), adapter, tax, rows,
                               tmp_path / "a", GenerationSettings(depths=["label"]), "t")
    assert [r["teacher"]["label"]["attempts"] for r in out] == [2, 2, 1, 1, 1, 1]
    assert all(r["teacher"]["label"]["error"] is None for r in out)

    class Stubborn(ScriptedBackend):
        def complete(self, prompts, max_tokens, stop=None, temperature=0.0, seed=0):
            return [c.__class__("earnings_beat or earnings_miss", 3, "stop")
                    for c in super().complete(prompts, max_tokens, stop, temperature, seed)]

    out = generate_supervision(Stubborn(), adapter, tax, rows, tmp_path / "b",
                               GenerationSettings(depths=["label", "cot_short"], max_retries=2),
                               "t")
    t = out[0]["teacher"]["cot_short"]
    assert t["label"] is None and t["error"].startswith("two labels") and t["attempts"] == 3
    assert out[0]["traces"] == {}  # a rejected answer's trace is not supervision
    stats = supervision_stats(out, ["cot_short"], tax.labels)["cot_short"]
    assert stats["rejected"] == 6 and stats["rejected_by_reason"] == {"two labels": 6}


def test_timeouts_are_retried_with_a_bound(tmp_path, tax, adapter):
    rows = _rows(tax, 3)
    s = GenerationSettings(depths=["label"], max_retries=2, backoff_s=0.0)
    out = generate_supervision(ScriptedBackend(timeouts=2), adapter, tax, rows, tmp_path / "a",
                               s, "t")
    assert all(r["teacher"]["label"]["label"] == r["label"] for r in out)
    out = generate_supervision(ScriptedBackend(timeouts=99), adapter, tax, rows, tmp_path / "b",
                               s, "t")
    err = out[0]["teacher"]["label"]["error"]
    assert err.startswith("backend error after 3 attempts") and "TimeoutError" in err


def test_killed_run_resumes_without_losing_or_repeating_rows(tmp_path, tax, adapter):
    n, work = 24, tmp_path / "work"
    work.mkdir()
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "scripted_backend.py"), str(ROOT),
         str(work), str(n)], env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(work.glob("shard-*.jsonl"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = sorted(p.name for p in work.glob("shard-*.jsonl"))
    assert 2 <= len(finished) < n // 4, "the child was not killed mid-run"
    backend = ScriptedBackend()
    log = tmp_path / "resume.log"
    backend.log = log
    out = generate_supervision(backend, adapter, tax, _rows(tax, n), work,
                               GenerationSettings(depths=["label", "cot_short"], shard_size=4),
                               "resume")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(n)]
    # Only the rows of the missing shards were asked again.
    asked = {h for line in log.read_text().splitlines() for h in json.loads(line)}
    done_rows = {r["id"] for p in finished for r in map(json.loads, (work / p).open())}
    assert asked == {f"h{int(i[1:])}" for i in {f"r{i}" for i in range(n)} - done_rows}
    clean = generate_supervision(ScriptedBackend(), adapter, tax, _rows(tax, n),
                                 tmp_path / "clean",
                                 GenerationSettings(depths=["label", "cot_short"], shard_size=4),
                                 "clean")
    assert out == clean


def test_changed_rows_restart_the_shards(tmp_path, tax, adapter):
    s = GenerationSettings(depths=["label"], shard_size=4)
    generate_supervision(ScriptedBackend(), adapter, tax, _rows(tax, 8), tmp_path, s, "t")
    out = generate_supervision(ScriptedBackend(), adapter, tax, _rows(tax, 6), tmp_path, s, "t")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(6)]
