"""`distillscale domain check` on crafted taxonomies: each problem is named with file, line, key."""

import json
from pathlib import Path

import pytest

from distillscale.cli import main
from distillscale.config import ConfigError
from distillscale.domain import load_taxonomy
from distillscale.domain_check import check_domain, separability

BASE = """\
name: mini
task: Classify the trial news headline into one event class.
classes:
  - name: positive_readout
    definition: a trial met its goal
    aliases: [positive data]
    prior: 40
    templates:
      - "{company} drug {drug} meets primary endpoint in {indication} trial"
      - "{company} reports positive data for {drug} in {indication}"
      - "{drug} cuts {indication} risk by {pct}% in {company} study"
      - "{company} says {drug} shows statistically significant benefit"
  - name: negative_readout
    definition: a trial missed its goal
    aliases: [negative data]
    prior: 35
    templates:
      - "{company} drug {drug} fails primary endpoint in {indication} trial"
      - "{company} halts {indication} study of {drug} after interim look"
      - "{drug} misses goal in {company} {indication} study"
      - "{company} says {drug} shows no statistically significant benefit"
  - name: approval
    definition: a regulator approved a drug
    aliases: [clearance]
    prior: 25
    templates:
      - "{regulator} approves {company}'s {drug} for {indication}"
      - "{company} wins {regulator} nod for {drug}"
      - "{regulator} clears {drug} to treat {indication}"
      - "{company} gets green light from {regulator} for {drug}"
slots:
  company: {faker: company, pool: 200, exclude: [", "]}
  drug: [Zelvora, Abrexin, Tolamab, Cardinex]
  indication: [lung cancer, psoriasis, heart failure]
  regulator: [FDA, EMA]
  pct: {int: [5, 60]}
"""


def write(tmp_path, text, name="mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def quick(path, **kw):
    return check_domain(path, separability_check=False, **kw)


def test_clean_file_has_no_errors_and_samples_every_class(tmp_path):
    r = quick(write(tmp_path, BASE))
    assert r.errors == []
    # the two readouts' contrast templates are near duplicates across classes: reported
    assert any("near duplicates" in w and "no statistically" in w for w in r.warnings)
    assert set(r.samples) == {"positive_readout", "negative_readout", "approval"}
    assert all(len(v) == 3 and "{" not in " ".join(v) for v in r.samples.values())


def test_misspelt_faker_provider_names_file_line_and_slot(tmp_path):
    text = BASE.replace("faker: company", "faker: compny")
    path = write(tmp_path, text)
    r = quick(path)
    want = f"{path}:{line_of(text, 'compny')}: slots.company.faker: Faker (en_US) has no provider"
    assert len(r.errors) == 1 and r.errors[0].startswith(want)
    assert "did you mean 'company'" in r.errors[0]
    with pytest.raises(ConfigError, match="slots.company.faker"):
        load_taxonomy(path)


def test_class_without_templates_fails_at_load_unless_import_only(tmp_path):
    start = BASE.index("    templates:\n      - \"{regulator} approves")
    text = BASE[:start] + "slots:" + BASE.split("slots:")[1]
    path = write(tmp_path, text)
    r = quick(path)
    assert len(r.errors) == 1
    assert f"{path}:{line_of(text, 'name: approval')}: classes.2.templates: class approval " \
           "has no templates" in r.errors[0]
    ok = write(tmp_path, "for_import_only: true\n" + text, "import.yaml")
    tax = load_taxonomy(ok)
    assert tax.for_import_only and tax.match_label("Clearance") == "approval"
    assert quick(ok).errors == [] and quick(ok).samples == {}


def test_priors_as_fractions_and_not_summing_to_100_warn(tmp_path):
    frac = BASE.replace("prior: 40", "prior: 0.4").replace("prior: 35", "prior: 0.35") \
        .replace("prior: 25", "prior: 0.25")
    w = quick(write(tmp_path, frac)).warnings
    assert any("look like fractions" in x and ": classes:" in x for x in w)
    w = quick(write(tmp_path, BASE.replace("prior: 40", "prior: 70"), "b.yaml")).warnings
    assert any("priors sum to 130, not 100" in x for x in w)
    assert not any("priors sum" in x for x in quick(write(tmp_path, BASE, "c.yaml")).warnings)


def test_alias_that_is_another_class_name_warns_and_shared_alias_fails(tmp_path):
    text = BASE.replace("aliases: [clearance]", "aliases: [clearance, Positive Readout]")
    path = write(tmp_path, text)
    w = quick(path).warnings
    hit = [x for x in w if "is the name of class positive_readout" in x]
    assert hit and hit[0].startswith(f"{path}:{line_of(text, 'Positive Readout')}: "
                                     "classes.2.aliases.1:")
    assert load_taxonomy(path).match_label("POSITIVE READOUT") == "positive_readout"
    shared = BASE.replace("aliases: [clearance]", "aliases: [clearance, negative-data]")
    r = quick(write(tmp_path, shared, "s.yaml"))
    assert any("classes.2.aliases.1: alias 'negative-data' of approval is also an alias of "
               "negative_readout" in e for e in r.errors)


def test_stray_brace_unused_slot_and_few_templates_warn(tmp_path):
    text = BASE.replace('"{regulator} clears {drug} to treat {indication}"',
                        '"{regulator} clears {drug to treat {indication}"')
    text = text.replace("  pct: {int: [5, 60]}", "  pct: {int: [5, 60]}\n  city: [Paris, Oslo]")
    path = write(tmp_path, text)
    w = quick(path).warnings
    assert any(x.startswith(f"{path}:{line_of(text, '{drug to treat')}: classes.2.templates.2:")
               and "stray brace" in x for x in w)
    assert any("slots.city: slot 'city' is used by no template" in x for x in w)
    few = write(tmp_path, BASE.replace('      - "{company} wins {regulator} nod for {drug}"\n', "")
                .replace('      - "{regulator} clears {drug} to treat {indication}"\n', ""), "f.yaml")
    assert any("class approval has only 2 template(s)" in x for x in quick(few).warnings)


def test_country_slot_without_knowledge_slot_warns(tmp_path):
    text = BASE.replace('"{company} wins {regulator} nod for {drug}"',
                        '"{company} wins {regulator} nod for {drug} in {country}"')
    text += "  country: [US, Germany, South Korea, Japan]\n"
    w = quick(write(tmp_path, text)).warnings
    assert any("slot 'country' holds countries but knowledge_slot is unset" in x for x in w)
    ks = write(tmp_path, "knowledge_slot: country\n" + text.replace("Japan", "Atlantis"), "k.yaml")
    w = quick(ks).warnings
    assert any("knowledge_slot values that are not countries" in x and "Atlantis" in x for x in w)
    bad = write(tmp_path, "knowledge_slot: pct\n" + text, "bad.yaml")
    assert any("knowledge_slot: 'pct' is not a slot with a list" in e for e in quick(bad).errors)


def test_separability_flags_a_trivial_task_and_names_the_confused_pair(tmp_path):
    r = check_domain(write(tmp_path, BASE), rows=450, folds=3)
    sep = r.separability
    assert sep is not None and sep.rows > 300
    # the readouts share structure: if anything is confused, it is those two
    assert all({p["a"], p["b"]} == {"negative_readout", "positive_readout"}
               for p in sep.confusable)
    assert any(g["ngram"] == "approves" or "regulator" not in g["ngram"]
               for g in sep.giveaways["approval"])
    trivial = ["alpha beta gamma"] * 0 + [f"apples {i} red" for i in range(40)] + \
        [f"pears {i} green" for i in range(40)]
    s = separability(trivial, ["a"] * 40 + ["b"] * 40, folds=4)
    assert s.macro_f1 == 1.0 and s.giveaways["a"][0]["ngram"] in ("apples", "red")
    noise = [f"word{i % 7} thing{i % 5}" for i in range(120)]
    s = separability(noise, ["a", "b", "c"] * 40, folds=4)
    assert s.macro_f1 < 0.7 and s.giveaways == {"a": [], "b": [], "c": []}


def test_second_events_lower_separability_through_the_data_stage_generator(tmp_path, capsys):
    path = write(tmp_path, BASE)
    plain = check_domain(path, rows=300, folds=3)
    assert plain.second_event_share == 0.0
    out = tmp_path / "hard.json"
    assert main(["domain", "check", str(path), "--rows", "300", "--folds", "3",
                 "--second-event-rate", "1", "--json", str(out)]) == 0
    hard = json.loads(out.read_text())
    assert hard["second_event_rate"] == 1.0 and hard["second_event_share"] == 1.0
    assert "second event in 100% (data.second_event_rate=1)" in hard["separability"]["source"]
    # every headline names two classes' events: word counts cannot tell which came first
    assert hard["separability"]["macro_f1"] < plain.separability.macro_f1 - 0.2
    capsys.readouterr()
    assert main(["domain", "check", str(path), "--second-event-rate", "1.5"]) == 2
    assert "--second-event-rate must be from 0 to 1" in capsys.readouterr().err
    assert main(["domain", "check", str(path), "--second-event-rate", "0.5",
                 "--data", str(path)]) == 2
    assert "does not apply to --data" in capsys.readouterr().err


def test_confusable_with_names_other_classes_of_the_taxonomy(tmp_path):
    pair = "    aliases: [positive data]\n    confusable_with: [negative_readout]\n"
    ok = write(tmp_path, BASE.replace("    aliases: [positive data]\n", pair), "ok.yaml")
    tax = load_taxonomy(ok)
    # declared once, it holds both ways
    assert tax.confusable("negative_readout") == ["positive_readout"]
    assert tax.confusable("approval") == []
    text = BASE.replace("    aliases: [positive data]\n", pair.replace(
        "[negative_readout]", "[negative_redout, positive_readout]"))
    path = write(tmp_path, text)
    where = f"{path}:{line_of(text, 'confusable_with')}: classes.0.confusable_with"
    assert quick(path).errors == [
        f"{where}.0: 'negative_redout' is not a class (did you mean 'negative_readout'?)",
        (f"{where}.1: class positive_readout lists itself (name the other classes it is "
         "confused with)")]


def test_cli_exit_codes_json_and_labelled_data(tmp_path, capsys):
    bad = write(tmp_path, BASE.replace("faker: company", "faker: compny"), "bad.yaml")
    assert main(["domain", "check", str(bad), "--no-separability"]) == 1
    assert "slots.company.faker" in capsys.readouterr().out
    good = write(tmp_path, BASE)
    data = tmp_path / "rows.csv"
    rows = ["text,event"] + [f"Acme drug {i} meets goal,Positive Data" for i in range(12)] + \
        [f"Regulator clears drug {i},APPROVAL" for i in range(12)] + ["odd one,moon"]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "report.json"
    assert main(["domain", "check", str(good), "--data", str(data), "--label-column", "event",
                 "--folds", "3", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["separability"]["rows"] == 24 and rep["separability"]["source"] == str(data)
    assert any("1 row(s) have a label that is no class" in w for w in rep["warnings"])
    assert main(["domain", "check", str(good), "--no-separability", "--strict"]) == 1


def test_shipped_domains_load_clean():
    root = Path(__file__).resolve().parents[1] / "conf/domains"
    for path in sorted(root.glob("*.yaml")):
        r = quick(path)
        assert r.errors == [], path
        assert not any("stray brace" in w or "priors sum" in w or "used by no template" in w
                       for w in r.warnings), (path, r.warnings)


def test_results_class_count_comes_from_the_domain_or_the_results(tmp_path, capsys):
    from argparse import Namespace

    from distillscale.cli import _num_classes

    results = tmp_path / "results_long.csv"
    results.write_text("x\n")
    args = Namespace(num_classes=None, domain=None, results=results, command="fit")
    with pytest.raises(ConfigError, match="give --num-classes N or --domain TAXONOMY"):
        _num_classes(args)
    cyber = Path(__file__).resolve().parents[1] / "conf/domains/cyber.yaml"
    assert _num_classes(Namespace(**{**vars(args), "domain": cyber})) == 10
    (tmp_path / "per_class_f1.csv").write_text("model,label,support\nt,a,3\nt,b,4\ns,a,3\n")
    assert _num_classes(args) == 2
    assert _num_classes(Namespace(**{**vars(args), "num_classes": 7})) == 7
    fixture = Path(__file__).resolve().parent / "fixtures" / "results_long.csv"
    assert main(["fit", "--results", str(fixture), "--out", str(tmp_path / "f")]) == 2
    assert "in-domain classes" in capsys.readouterr().err


def test_schema_reference_in_the_docs_is_current():
    from distillscale.domain_docs import DOC, render, schema_reference

    text = DOC.read_text()
    assert render(text) == text, "run `python -m distillscale.domain_docs`"
    ref = schema_reference()
    for field in ("knowledge_slot", "for_import_only", "aliases", "prior", "faker", "exclude"):
        assert f"| `{field}` |" in ref
    assert "in percent" in ref  # descriptions come from the models
