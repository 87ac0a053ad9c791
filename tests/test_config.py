from pathlib import Path

import pytest

from distillscale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf/experiments/quickstart.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: t
domain: {taxonomy: conf/domains/cyber.yaml}
teacher:
  arch: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
         num_query_groups: 2}
"""


def test_quickstart_loads_and_composes_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(QUICKSTART)
    assert cfg.teacher.arch.num_layers == 4  # from conf/models/tiny.yaml via defaults
    assert {s.axis for s in cfg.students} == {"width", "depth"}


def test_override_sets_nested_and_list_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(QUICKSTART, ["teacher.train.steps=7", "students.1.compression_ratio=0.3"])
    assert cfg.teacher.train.steps == 7
    assert cfg.students[1].compression_ratio == 0.3


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "bad.yaml", BASE + "distill:\n  temprature: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "distill.temprature" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_an_experiment_must_name_its_domain(tmp_path):
    p = write(tmp_path, "nodomain.yaml", BASE.replace("domain: {taxonomy: conf/domains/cyber.yaml}\n", ""))
    with pytest.raises(ConfigError, match=r"nodomain\.yaml: domain: required key is missing"):
        load_config(p)
    p = write(tmp_path, "empty.yaml", BASE.replace("{taxonomy: conf/domains/cyber.yaml}", "{}"))
    with pytest.raises(ConfigError, match=r"domain\.taxonomy: required key is missing"):
        load_config(p)


def test_wrong_type_from_command_line(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"^command line: teacher\.train\.steps: .*integer"):
        load_config(p, ["teacher.train.steps=lots"])


@pytest.mark.parametrize(
    "extra, key, text",
    [
        ("students: [{name: s, axis: width, compression_ratio: 1.0}]",
         "students.0.compression_ratio", "less than 1"),
        ("students: [{name: s, axis: width, shape: {num_attention_heads: 3}}]",
         "students", "multiple of the teacher's num_query_groups"),
        ("students: [{name: s, axis: depth, shape: {num_layers: 5}}]",
         "students", "larger than the teacher"),
        ("students: [{name: s, axis: depth, compression_ratio: 0.5, shape: {num_layers: 1}}]",
         "students.0", "exactly one of"),
        ("launch: {tensor_parallel: 4}", "<top>", "must divide"),
    ],
)
def test_impossible_values_rejected(tmp_path, extra, key, text):
    p = write(tmp_path, "x.yaml", BASE + extra + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(p).split("/")[-1]) or "x.yaml" in str(e.value)
    assert key in str(e.value) and text in str(e.value)


def test_heads_not_multiple_of_groups_names_the_defining_file(tmp_path):
    write(tmp_path, "model.yaml", "teacher:\n  arch: {num_layers: 2, hidden_size: 60, "
          "ffn_hidden_size: 64, num_attention_heads: 3, num_query_groups: 2}\n")
    p = write(tmp_path, "exp.yaml", "defaults: [model.yaml]\nname: t\n"
              "domain: {taxonomy: conf/domains/cyber.yaml}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.yaml" in str(e.value) and "teacher.arch" in str(e.value)
    assert "exp.yaml" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "broken.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config(p)


def test_bad_override_syntax(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["teacher.train.steps"])


def test_section_hash_tracks_only_its_sections(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    a = load_config(p)
    b = load_config(p, ["distill.train.steps=3"])
    assert a.section_hash("teacher") == b.section_hash("teacher")
    assert a.section_hash("distill") != b.section_hash("distill")


def test_second_event_rate_off_keeps_the_data_identity_and_needs_the_template_generator():
    plain = load_config(QUICKSTART)
    off = load_config(QUICKSTART, ["data.second_event_rate=0"])
    on = load_config(QUICKSTART, ["data.second_event_rate=0.4"])
    # off, the key is not in the dump: the data stage's identity is the one from before the key
    assert "second_event_rate" not in off.section_payload("data")["data"]
    assert off.section_hash("domain", "data", "seed") == plain.section_hash("domain", "data", "seed")
    assert on.section_payload("data")["data"]["second_event_rate"] == 0.4
    assert on.section_hash("domain", "data", "seed") != plain.section_hash("domain", "data", "seed")
    with pytest.raises(ConfigError, match="second_event_rate applies to data.generator=templates"):
        load_config(QUICKSTART, ["data.second_event_rate=0.4", "data.generator=designer"])
    with pytest.raises(ConfigError, match="data.second_event_rate: .*less than or equal to 1"):
        load_config(QUICKSTART, ["data.second_event_rate=1.5"])


def test_the_knowledge_probe_is_refused_as_mmlu_at_load():
    cfg = load_config(QUICKSTART)
    assert cfg.eval.general.probe_path == "{run_dir}/teacher/knowledge_probe"
    assert cfg.eval.general.mmlu_path is None
    for key in ("mmlu_path", "mmlu_pro_path"):
        with pytest.raises(ConfigError) as e:
            load_config(QUICKSTART, [f"eval.general.{key}=runs/x/teacher/knowledge_probe"])
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"command line: eval.general.{key}: ")
        assert "synthetic knowledge probe" in msg and "eval.general.probe_path" in msg


def test_an_unset_probe_path_keeps_the_eval_identity():
    # A config scoring real MMLU only dumps no probe_path: its eval stage is not re-run for
    # a key it does not use.
    plain = load_config(QUICKSTART, ["eval.general.probe_path=null",
                                     "eval.general.mmlu_path=/data/mmlu"])
    assert "probe_path" not in plain.section_payload("eval")["eval"]["general"]
    probe = load_config(QUICKSTART)
    assert probe.section_payload("eval")["eval"]["general"]["probe_path"].endswith("knowledge_probe")
