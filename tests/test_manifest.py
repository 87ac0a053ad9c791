import json

import pytest

from distillscale.manifest import (
    atomic_path,
    atomic_stage,
    input_hash,
    is_up_to_date,
    read_manifest,
    remove_partials,
    replace_dir,
    write_bytes_atomic,
)


def test_stage_writes_manifest_and_resumes(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("a")
    out = tmp_path / "stage"
    with atomic_stage(out, "demo", "h1", {"src": src}) as o:
        (o.path / "result.txt").write_text("done")
        o.metrics["value"] = 3
    man = read_manifest(out)
    assert man["stage"] == "demo" and man["metrics"]["value"] == 3
    assert man["inputs"]["src"] == input_hash(src)
    assert "torch" in man["versions"] and man["wall_time_s"] >= 0
    assert is_up_to_date(out, "h1", {"src": src})
    assert not is_up_to_date(out, "h2", {"src": src})  # config changed
    src.write_text("b")
    assert not is_up_to_date(out, "h1", {"src": src})  # input changed


def test_killed_stage_keeps_previous_output(tmp_path):
    out = tmp_path / "stage"
    with atomic_stage(out, "demo", "h1", {}) as o:
        (o.path / "result.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt), atomic_stage(out, "demo", "h2", {}) as o:
        (o.path / "result.txt").write_text("partial")
        raise KeyboardInterrupt
    assert (out / "result.txt").read_text() == "first"
    assert json.loads((out / "manifest.json").read_text())["config_hash"] == "h1"
    # The partial work stays in the temp folder for the stage to resume from.
    assert (tmp_path / "stage.tmp" / "result.txt").read_text() == "partial"


def test_downstream_hash_changes_when_upstream_reruns(tmp_path):
    up = tmp_path / "up"
    with atomic_stage(up, "up", "h1", {}) as o:
        o.metrics["x"] = 1
    h_before = input_hash(up)
    with atomic_stage(up, "up", "h2", {}) as o:
        o.metrics["x"] = 2
    assert input_hash(up) != h_before


def test_missing_input_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished stage folder"):
        input_hash(tmp_path)
    with pytest.raises(FileNotFoundError, match="input not found"):
        input_hash(tmp_path / "nope.csv")


def test_atomic_path_publishes_only_a_finished_write(tmp_path):
    target = tmp_path / "sub" / "weights.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == [
        "weights.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and remove_partials(tmp_path) == []
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    # A finished folder replaces the previous one whole; nothing is left beside it.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "config.json").write_text("{}")
    replace_dir(tmp_path / ".out.partial", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sub"]
