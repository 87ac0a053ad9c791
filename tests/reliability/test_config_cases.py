"""Bad experiment configs and command lines: each one clear line naming the file, line or key,
exit 2, no traceback (and no stage started)."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import QUICKSTART

pytestmark = pytest.mark.reliability

BASE = f"defaults: [{QUICKSTART}]\n"

# (case, YAML body after the defaults line, overrides, fragment the error line must hold)
CONFIG_CASES = [
    ("duplicate-top-key", "seed: 1\nseed: 2\n", [], "key 'seed' given twice"),
    ("duplicate-nested-key", "teacher:\n  train:\n    lr: 0.1\n    lr: 0.2\n", [],
     "key 'lr' given twice"),
    ("duplicate-key-line", "name: a\nname: b\n", [], ":3:"),
    ("bool-steps-yaml", "teacher:\n  train:\n    steps: true\n", [],
     "teacher.train.steps: must be a number, not the boolean true"),
    ("bool-seed-override", "", ["seed=false"], "seed: must be a number"),
    ("bool-lr-override", "", ["teacher.train.lr=true"], "teacher.train.lr: must be a number"),
    ("bool-fraction", "", ["data.val_fraction=yes"], "data.val_fraction: must be a number"),
    ("name-dotdot", "", ["name=.."], "name: '..' is not usable as a folder name"),
    ("name-dot", "", ["name=."], "name: '.' is not usable"),
    ("student-name-dotdot", "", ["students=[{name: '..', axis: width, compression_ratio: 0.5}]"],
     "students.0.name"),
    ("name-slash", "", ["name=a/b"], "name"),
    ("unknown-key", "", ["teacher.trian.steps=3"], "teacher.trian: unknown key"),
    ("wrong-type", "", ["teacher.train.steps=abc"], "teacher.train.steps"),
    ("ratio-above-one", "", ["students.0.compression_ratio=1.5"], "compression_ratio"),
    ("ratio-zero", "", ["students.0.compression_ratio=0"], "compression_ratio"),
    ("duplicate-students", "", [("students=[{name: a, axis: width, compression_ratio: 0.5}, "
                                 "{name: a, axis: depth, compression_ratio: 0.5}]")],
     "duplicate student names"),
    ("yaml-syntax", "teacher: [\n", [], "not valid YAML"),
    ("override-no-equals", "", ["seed"], "must look like key.sub=value"),
    ("override-empty-key", "", ["teacher..lr=1"], "empty key"),
    ("no-such-list-element", "", ["students.9.name=x"], "no such list element"),
]


@pytest.mark.parametrize("case,body,overrides,fragment", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line(cli, tmp_path, case, body, overrides, fragment):
    cfg = tmp_path / f"{case}.yaml"
    cfg.write_text(BASE + body)
    r = cli("run", cfg, f"output_dir={tmp_path / 'run'}", *overrides)
    assert r.rc == 2, r.err
    assert "Traceback" not in r.err
    assert r.err.startswith("error: ") and fragment in r.err.splitlines()[0], r.err
    assert not (tmp_path / "run" / "data").exists()  # nothing ran


def test_output_dir_that_is_a_file(cli, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    r = cli("run", QUICKSTART, f"output_dir={f}")
    assert r.rc == 2 and "output_dir:" in r.err and "is not a folder" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_defaults_cycle(cli, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\nname: a\n")
    b.write_text("defaults: [a.yaml]\n")
    r = cli("run", a)
    assert r.rc == 2 and "defaults form a cycle" in r.err


def test_config_file_missing(cli, tmp_path):
    r = cli("run", tmp_path / "none.yaml")
    assert r.rc == 2 and "none.yaml: file not found" in r.err


def test_config_top_level_list(cli, tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    r = cli("run", cfg)
    assert r.rc == 2 and "top level must be a mapping" in r.err


def test_unknown_student_for_prune(cli, tmp_path):
    r = cli("prune", QUICKSTART, f"output_dir={tmp_path}", "--student", "nobody")
    assert r.rc == 2 and "no student named 'nobody'" in r.err


def test_duplicate_key_in_an_override_mapping(cli, tmp_path):
    r = cli("run", QUICKSTART, f"output_dir={tmp_path}",
            "students=[{name: a, name: b, axis: width, compression_ratio: 0.5}]")
    assert r.rc == 2 and "given twice" in r.err
