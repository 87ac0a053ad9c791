"""`domain draft`: a taxonomy from a CSV class list, written through an OpenAI-compatible
endpoint (the stdlib stand-in for `vllm serve`, tests/fixtures/fake_openai_server.py)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from distillscale.config import ConfigError, LLMEndpointConfig
from distillscale.data.generate import generate_headlines
from distillscale.domain import load_taxonomy
from distillscale.domain_check import (
    add_draft_arguments,
    check_domain,
    clean_template,
    draft_command,
    draft_taxonomy,
    read_class_list,
)

ROOT = Path(__file__).resolve().parents[1]
TASK = "Classify the clinical trial news headline into one event class."
CSV = """name,definition,prior,aliases,examples
Positive Readout,a trial met its primary goal,50,positive data|topline win,Acme drug meets goal in lung cancer trial
negative_readout,a trial missed its primary goal,30,,
approval,a regulator cleared a drug for sale,20,clearance,FDA approves Acme's drug|EU clears Acme drug
"""


def _llm(tmp_path: Path, **kw) -> LLMEndpointConfig:
    fake = [sys.executable, str(ROOT / "tests/fixtures/fake_openai_server.py"),
            "--model", "{model}", "--port", "{port}",
            "--log-requests", str(tmp_path / "requests.jsonl")]
    return LLMEndpointConfig(**({"endpoint": "serve", "model": "drafter", "serve_command": fake,
                                 "startup_timeout_s": 60} | kw))


def test_draft_writes_a_taxonomy_that_loads_checks_and_generates(tmp_path):
    classes = tmp_path / "trials.csv"
    classes.write_text(CSV)
    out = tmp_path / "trials.yaml"
    tax = draft_taxonomy(classes, out, task=TASK, llm=_llm(tmp_path), templates_per_class=6,
                         values_per_slot=5)
    again = load_taxonomy(out)
    assert again == tax and again.task == TASK and again.name == "trials"
    assert again.labels == ["positive_readout", "negative_readout", "approval"]
    assert [c.prior for c in again.classes] == [50, 30, 20]
    assert again.by_name("positive_readout").aliases == ["positive data", "topline win"]
    for c in again.classes:
        # 4 numbered lines + the spaced placeholder folded to {company_name}; the preamble and
        # the stray-brace line are dropped.
        assert len(c.templates) == 5, c.templates
        assert any("{company_name}" in t for t in c.templates)
        assert all(c.definition.split()[0] in t for t in c.templates)
    assert set(again.slots) == {"company", "company_name", "country"}
    assert again.slots["company"] == [f"Company {i}" for i in range(5)]
    # Countries feed the knowledge facts only because the values are countries.
    assert again.knowledge_slot == "country"
    report = check_domain(out, separability_check=False)
    assert report.errors == [] and set(report.samples) == set(again.labels)
    rows = generate_headlines(again, 30, "balanced", 0, 0)
    assert {r["label"] for r in rows} == set(again.labels)
    assert not any("{" in r["text"] or "}" in r["text"] for r in rows)

    # Every prompt is built from the task and the classes' own definitions and examples.
    requests = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == 3 + 3  # one per class, one per slot
    for r in requests:
        system = r["messages"][0]["content"]
        assert TASK in system and all(c.definition in system for c in again.classes)
        assert r["model"] == "drafter" and r["max_tokens"] >= 1024
    users = [r["messages"][1]["content"] for r in requests]
    assert any("FDA approves Acme's drug" in u and "Class: approval" in u for u in users)
    assert any(u.startswith("Placeholder: {country}") for u in users)
    assert out.read_text().startswith("# Drafted by `distillscale domain draft")


def test_draft_command_line(tmp_path, capsys):
    classes = tmp_path / "trials.csv"
    classes.write_text(CSV.replace(",50,", ",,").replace(",30,", ",,").replace(",20,", ",,"))
    p = argparse.ArgumentParser()
    add_draft_arguments(p)
    fake = _llm(tmp_path).serve_command
    # Options first, then the class list and its settings (as `data build`).
    args = p.parse_args(["--task", TASK, "--out", str(tmp_path / "t.yaml"), "--templates", "4",
                         "--values", "3", str(classes), "data.llm.endpoint=serve",
                         "data.llm.model=drafter", f"data.llm.serve_command={json.dumps(fake)}"])
    assert draft_command(args) == 0
    tax = load_taxonomy(tmp_path / "t.yaml")
    # No priors given: equal shares.
    assert [c.prior for c in tax.classes] == [33.33] * 3
    assert all(len(c.templates) == 3 for c in tax.classes)
    assert "drafted 3 classes, 3 slots" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"data\.llm\.model: Field required"):
        draft_command(p.parse_args(["--task", TASK, "--out", str(tmp_path / "u"), str(classes),
                                    "data.llm.endpoint=http://127.0.0.1:9/v1"]))
    with pytest.raises(ConfigError, match="data.llm.KEY=VALUE settings only"):
        draft_command(p.parse_args(["--task", TASK, "--out", str(tmp_path / "u"), str(classes),
                                    "teacher.train.steps=3"]))


@pytest.mark.parametrize("text, message", [
    ("title,definition\na,b c d\n", r"x\.csv:1: the class list needs columns name and definition"),
    ("name,definition\nfoo,a thing\nFoo,another thing\n", r"x\.csv:3: name: class 'foo' is also on line 2"),
    ("name,definition\n9lives,a thing\nb,another\n", r"x\.csv:2: name: '9lives' does not make"),
    ("name,definition,prior\na,a thing,ten\nb,other,5\n", r"x\.csv:2: prior: 'ten' is not a number"),
    ("name,definition,prior\na,a thing,10\nb,other,\n", "a prior for every class or for none"),
    ("name,definition\na,a thing\n", "at least two classes"),
    ("name,definition\na,a thing\nb,\n", r"x\.csv:3: definition: class b needs a definition"),
])
def test_bad_class_lists_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "x.csv"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        read_class_list(p)
    assert "\n" not in str(e.value)


def test_reply_lines_become_templates_or_are_dropped():
    assert clean_template("{Company Name} wins {Deal-Size} deal") == \
        "{company_name} wins {deal_size} deal"
    assert clean_template("{company} wins { deal") is None
    assert clean_template("Sure, here are eight templates:") is None
    assert clean_template("{9x} wins") is None
    assert clean_template("Acme wins a deal") is None


def test_a_reply_without_templates_names_the_class(tmp_path, monkeypatch):
    import distillscale.domain_check as dc

    classes = tmp_path / "c.csv"
    classes.write_text("name,definition\nalpha,first kind\nbeta,second kind\n")
    # The stand-in answers a prompt it does not recognise with one line and no placeholder:
    # nothing to keep as a template.
    monkeypatch.setattr(dc, "draft_template_prompt", lambda c, others, n: "Say something.")
    with pytest.raises(RuntimeError, match="class alpha: the model's reply held no usable"):
        draft_taxonomy(classes, tmp_path / "c.yaml", task=TASK, llm=_llm(tmp_path))
    assert not (tmp_path / "c.yaml").exists()
