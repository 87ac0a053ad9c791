import json

import pandas as pd
import pytest

from distillscale.knowledge.general import (
    PROBE_CHOICES,
    SUBJECTS,
    build_facts,
    country_name,
    is_knowledge_probe,
    knowledge_corpus,
    probe_rows,
    write_knowledge_probe,
)


def test_facts_are_deterministic_and_seeded():
    a, b = build_facts(3), build_facts(3)
    assert knowledge_corpus(a) == knowledge_corpus(b)
    assert knowledge_corpus(build_facts(4)) != knowledge_corpus(a)
    assert {f.subject for f in a} == set(SUBJECTS)


def test_facts_are_true():
    facts = {f.question: f.answer for f in build_facts(0, include=("germany", "japan"))}
    assert facts["what is the currency of germany ?"] == "euro"
    assert facts["what is the currency of japan ?"] == "yen"
    assert facts["which language is spoken in japan ?"] == "japanese"
    for q, a in facts.items():
        if q.startswith("what is ") and (" plus " in q or " minus " in q):
            x, op, y = q.removeprefix("what is ").removesuffix(" ?").split()
            assert int(a) == (int(x) + int(y) if op == "plus" else int(x) - int(y))
        if q.startswith("how many "):
            qty = q.split()[5]
            assert int(a) % int(qty) == 0


def test_headline_countries_resolve_and_can_be_forced_in():
    names = [country_name(w) for w in ("US", "UK", "Germany")]
    assert names == ["united states", "united kingdom", "germany"]
    assert country_name("Acme") is None
    facts = build_facts(0, countries=10, include=tuple(names))
    assert {f.subject_entity for f in facts if f.subject == "currency"} >= set(names)
    with pytest.raises(ValueError, match="fewer than"):
        build_facts(0, countries=2, include=tuple(names))


def test_probe_rows_have_one_right_answer_among_four():
    facts = build_facts(0)
    truth = {f.question: f.answer for f in facts}
    rows = probe_rows(facts, seed=0)
    assert len(rows) == len(facts)
    positions = set()
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"][r["answer"]] == truth[r["question"]]
        positions.add(r["answer"])
    assert positions == {0, 1, 2, 3}  # the answer is not always in the same slot


def test_write_knowledge_probe_in_cais_mmlu_schema_with_its_marker(tmp_path):
    sizes = write_knowledge_probe(tmp_path, seed=1, n=50, countries=20, arithmetic=30,
                                  conversions=20)
    test = pd.read_parquet(tmp_path / "test.parquet")
    dev = pd.read_parquet(tmp_path / "dev.parquet")
    assert list(test.columns) == ["question", "subject", "choices", "answer"]
    assert sizes == {"test": 50, "dev": 20} and len(test) == 50
    assert set(dev.subject) == set(SUBJECTS) and (dev.subject.value_counts() == 5).all()
    assert not set(dev.question) & set(test.question)  # few-shot examples are not test items
    assert all(len(c) == PROBE_CHOICES for c in test.choices)
    assert test.answer.between(0, PROBE_CHOICES - 1).all()
    # The marker says what the folder is, so that it cannot pass for a copy of MMLU.
    marker = json.loads((tmp_path / "probe.json").read_text())
    assert marker["synthetic"] is True and marker["metric"] == "probe"
    assert marker["choices"] == PROBE_CHOICES and marker["splits"] == sizes
    assert is_knowledge_probe(tmp_path) and not is_knowledge_probe(tmp_path / "elsewhere")
    assert is_knowledge_probe("{run_dir}/teacher/knowledge_probe")  # by its place, unwritten
    # Deterministic: the same call writes the same questions.
    write_knowledge_probe(tmp_path / "again", seed=1, n=50, countries=20, arithmetic=30,
                          conversions=20)
    pd.testing.assert_frame_equal(test, pd.read_parquet(tmp_path / "again" / "test.parquet"))


def test_country_names_never_merge_two_countries():
    import pycountry

    from distillscale.knowledge.general import country_name, country_names

    names = country_names()
    assert len(names) == len(pycountry.countries)
    assert len(set(names.values())) == len(names)  # every ISO country, a name of its own
    assert names["KR"] == "south korea" and names["KP"] == "north korea"
    assert names["CD"] != names["CG"] and names["VG"] != names["VI"]
    # every ISO name, official name and common name resolves back to its own country
    for c in pycountry.countries:
        for spelling in {c.name, getattr(c, "official_name", c.name),
                         getattr(c, "common_name", c.name)}:
            assert country_name(spelling) == names[c.alpha_2], spelling
    assert country_name("South Korea") != country_name("North Korea")
    assert country_name("Russia") == names["RU"] and country_name("Atlantis") is None
