"""A data build stopped after a round (Slurm's SIGUSR1, a kill) resumes from the round's
checkpoint and makes exactly the build an uninterrupted run makes."""

import json
import os
import signal
from pathlib import Path

import pytest

from distillscale.cli import main
from distillscale.data import recipe
from distillscale.train import preemption
from distillscale.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--domain", str(ROOT / "conf/domains/finance.yaml"), "--rows", "700", "max_rounds=3",
        "semantic_clusters=8", "embedding=minilm_static", "card_umap_points=0",
        "min_per_class=8"]
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl")


def _build(out: Path, *extra: str) -> int:
    return main(["data", "build", *ARGS, *extra, "--out", str(out)])


@pytest.fixture
def rounds_run(monkeypatch):
    """The names of the rounds synthesized, in order; `stop_in` sends SIGUSR1 to this process
    while that round is being made (as Slurm's warning would)."""
    real = recipe.synthesize
    seen: list[str] = []
    stop_in: set[str] = set()

    def counting(taxonomy, slot_values, spec, work_dir, *, name, **kw):
        seen.append(name)
        if name in stop_in:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(taxonomy, slot_values, spec, work_dir, name=name, **kw)

    monkeypatch.setattr(recipe, "synthesize", counting)
    yield seen, stop_in
    preemption.uninstall()


@pytest.mark.slow
def test_preempted_build_resumes_and_matches_an_uninterrupted_one(tmp_path, rounds_run):
    seen, stop_in = rounds_run
    whole = tmp_path / "whole"
    assert _build(whole) == 0
    man = json.loads((whole / "manifest.json").read_text())
    n = len(man["metrics"]["rounds"])
    assert n >= 2  # the build needs more than one round
    assert not (whole / "work").exists()  # the checkpoint goes with the finished build
    assert not whole.with_name("whole.tmp").exists()

    seen.clear()
    stop_in.add("round_001")
    cut = tmp_path / "cut"
    assert _build(cut) == REQUEUE_EXIT_CODE  # round 1 finished and checkpointed, then stopped
    assert seen == ["round_001"]
    assert not (cut / "manifest.json").exists()
    # The unfinished build is in `<out>.tmp` (the finished one replaces `<out>` atomically).
    work = cut.with_name("cut.tmp") / "work"
    state = json.loads((work / recipe.CHECKPOINT / "state.json").read_text())
    assert state["round"] == 1
    preemption.uninstall()  # a requeued job is a fresh process

    seen.clear()
    stop_in.clear()
    assert _build(cut) == 0
    assert seen == [f"round_{i:03d}" for i in range(2, n + 1)]  # round 1: the checkpoint
    for name in FILES:
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not work.exists()
    resumed = json.loads((cut / "manifest.json").read_text())
    assert resumed["rows_in"] == man["rows_in"] and resumed["rows_kept"] == man["rows_kept"]


@pytest.mark.slow
def test_checkpoint_of_other_settings_is_set_aside(tmp_path, rounds_run):
    seen, stop_in = rounds_run
    out = tmp_path / "data"
    stop_in.add("round_001")
    assert _build(out) == REQUEUE_EXIT_CODE
    preemption.uninstall()
    seen.clear()
    stop_in.clear()
    assert _build(out, "near_dup_threshold=0.75") == 0
    assert seen[0] == "round_001"  # not resumed: the near-dup threshold changed
    assert not out.with_name("data.tmp").exists()  # the set-aside checkpoint went with it
    assert json.loads((out / "manifest.json").read_text())["rows_kept"] > 0
