"""The stage runner on stages of its own: identity, skip, re-run, version, checks, rank gate,
and the one place a stage folder is written."""

import json
from pathlib import Path

import pytest

from distillscale.config import load_config
from distillscale.runner import Runner, Stage, identity_hash

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "conf/experiments/quickstart.yaml",
                       [f"output_dir={tmp_path / 'run'}", *overrides])


def _counting_stage(calls, **kw):
    def body(ctx, out, **args):
        calls.append(args)
        (out.path / "value.txt").write_text(str(ctx.cfg.data.num_examples))
        out.metrics["n"] = ctx.cfg.data.num_examples

    defaults = dict(folder=lambda ctx, **a: ctx.paths.root / "toy", sections=("data",),
                    distributed=False, summary=lambda ctx, m, **a: f"toy: n={m['n']}")
    return Stage("toy", body, **{**defaults, **kw})


def test_a_stage_runs_once_then_is_skipped_until_its_sections_change(tmp_path, capsys):
    calls = []
    stage = _counting_stage(calls)
    folder = Runner(_cfg(tmp_path))(stage)
    assert (folder / "value.txt").read_text() == "3000"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["stage"] == "toy" and man["metrics"] == {"n": 3000}
    Runner(_cfg(tmp_path))(stage)
    assert len(calls) == 1  # up to date: skipped
    # A section outside the identity does not matter; one inside it does.
    Runner(_cfg(tmp_path, "eval.bootstrap_samples=7"))(stage)
    assert len(calls) == 1
    Runner(_cfg(tmp_path, "data.num_examples=50"))(stage)
    assert len(calls) == 2 and (folder / "value.txt").read_text() == "50"
    err = capsys.readouterr().err
    assert "toy: n=3000" in err and "up to date, skipped" in err and "re-running" in err


def test_a_stage_folder_that_lost_a_file_is_not_trusted(tmp_path):
    calls = []
    stage = _counting_stage(calls)
    folder = Runner(_cfg(tmp_path))(stage)
    (folder / "value.txt").unlink()
    Runner(_cfg(tmp_path))(stage)
    assert len(calls) == 2 and (folder / "value.txt").is_file()


def test_a_bumped_version_redoes_the_stage_and_changes_only_its_identity(tmp_path):
    cfg = _cfg(tmp_path)
    v1, v2 = _counting_stage([]), _counting_stage([], version=2)
    assert identity_hash(cfg, v1) == cfg.section_hash("data")  # version 1: the sections alone
    assert identity_hash(cfg, v2) != identity_hash(cfg, v1)
    calls = []
    Runner(cfg)(_counting_stage(calls))
    Runner(cfg)(_counting_stage(calls, version=2))
    assert len(calls) == 2


def test_keyword_arguments_reach_identity_folder_and_body(tmp_path):
    calls = []
    stage = _counting_stage(
        calls, folder=lambda ctx, step: ctx.paths.root / f"toy{step}",
        identity=lambda ctx, step: {"step": step})
    run = Runner(_cfg(tmp_path))
    a, b = run(stage, step=1), run(stage, step=2)
    assert a != b and calls == [{"step": 1}, {"step": 2}]
    run(stage, step=1)
    assert len(calls) == 2


def test_a_check_refuses_before_anything_is_read_or_written(tmp_path):
    def refuse(ctx, **kw):
        raise ValueError("toy: refused")

    with pytest.raises(ValueError, match="toy: refused"):
        Runner(_cfg(tmp_path))(_counting_stage([], check=refuse))
    assert not (tmp_path / "run").exists()


def test_a_failed_body_leaves_no_finished_folder(tmp_path):
    def body(ctx, out):
        (out.path / "half.txt").write_text("x")
        raise RuntimeError("toy: failed half way")

    stage = Stage("toy", body, folder=lambda ctx: ctx.paths.root / "toy", distributed=False)
    with pytest.raises(RuntimeError, match="half way"):
        Runner(_cfg(tmp_path))(stage)
    assert not (tmp_path / "run" / "toy" / "manifest.json").exists()


@pytest.fixture
def env_ranks(monkeypatch):
    """The rank comes from `RANK`, as under srun before a process group exists: an in-process
    Megatron model built by an earlier test leaves a one-rank gloo group that would answer 0."""
    from distillscale.runtime import ranks

    monkeypatch.setattr(ranks, "_dist", lambda: None)
    return monkeypatch


def test_a_rank_zero_stage_makes_the_other_ranks_wait_for_its_manifest(tmp_path, env_ranks):
    monkeypatch = env_ranks
    calls = []
    stage = _counting_stage(calls, collective=False)
    cfg = _cfg(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("DISTILLSCALE_STAGE_WAIT_S", "0.5")
    with pytest.raises(TimeoutError, match="rank 1 waited"):
        Runner(cfg)(stage)
    assert calls == []  # rank 1 never computes it
    monkeypatch.setenv("RANK", "0")
    Runner(cfg)(stage)
    monkeypatch.setenv("RANK", "1")
    assert Runner(cfg)(stage) == tmp_path / "run" / "toy" and len(calls) == 1


def test_a_stage_without_a_folder_runs_on_rank_zero_only(tmp_path, env_ranks):
    monkeypatch = env_ranks
    calls = []
    stage = Stage("note", lambda ctx, out: calls.append(out.path))
    monkeypatch.setenv("RANK", "1")
    Runner(_cfg(tmp_path))(stage)
    assert calls == []
    monkeypatch.setenv("RANK", "0")
    Runner(_cfg(tmp_path))(stage)
    assert calls == [tmp_path / "run"]


def test_the_stage_modules_declare_one_stage_each():
    from distillscale import stages

    names = {getattr(stages, m).STAGE.name for m in stages.__all__}
    assert names == {"data", "teacher", "supervision", "prune", "distill", "eval", "fit",
                     "report"}
