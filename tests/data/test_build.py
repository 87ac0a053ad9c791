import json
from collections import Counter
from pathlib import Path

import pytest

from distillscale.cli import main
from distillscale.config import DataConfig
from distillscale.data.build import build_dataset, read_jsonl, stratified_split
from distillscale.domain import load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
TAXONOMY = ROOT / "conf/domains/finance.yaml"


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy(TAXONOMY)


def test_generator_covers_every_class_with_floor(tmp_path, taxonomy):
    data = DataConfig(generator="templates", num_examples=1500, min_per_class=10)
    m = build_dataset(tmp_path, taxonomy, data, seed=0)
    assert m["classes_present"] == 35
    assert min(m["label_histogram"].values()) >= 10 - m["rows_rejected"]
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"]
    test = read_jsonl(tmp_path / "test.jsonl")
    assert {"id", "text", "label", "gold_label"} <= set(test[0])
    # natural prior: the head class is far more frequent than the tail
    hist = m["label_histogram"]
    assert hist["stock_price_movement"] > 5 * hist["accounting_restatement"]
    card = (tmp_path / "dataset_card.md").read_text()
    assert "| accounting_restatement |" in card and "class_histogram.png" in card
    assert m["card_figures"] == ["class_histogram.png", "length_distribution.png"]


def test_split_is_deterministic_and_stratified(taxonomy):
    rows = [{"id": f"{i:05d}", "label": taxonomy.labels[i % 5], "text": str(i)} for i in range(500)]
    a = stratified_split(rows, 0.1, 0.2, seed=1)
    b = stratified_split(list(reversed(rows)), 0.1, 0.2, seed=1)
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]
    counts = Counter(r["label"] for r in a["test"])
    assert set(counts.values()) == {20}  # 100 per class * 0.2
    ids = [r["id"] for split in a.values() for r in split]
    assert len(ids) == len(set(ids)) == 500


def test_too_few_rows_for_a_stratified_split_names_the_settings(taxonomy):
    rows = [{"id": f"{i:05d}", "label": taxonomy.labels[i % 16], "text": str(i)} for i in range(60)]
    with pytest.raises(ValueError, match=r"60 rows are too few .* 16 classes.*"
                                         r"data\.test_fraction=0\.2\) would get 12 rows"):
        stratified_split(rows, 0.1, 0.2, seed=1)
    assert len(stratified_split(rows * 3, 0.1, 0.2, seed=1)["val"]) >= 16


def test_import_accounts_for_every_row(tmp_path):
    src = tmp_path / "mine.jsonl"
    good = [{"headline": f"Acme {i} wins contract from Globex", "event": "new_contract"}
            for i in range(30)]
    lines = [json.dumps(r) for r in good]
    lines += [
        '{"headline": "broken json", ',                                   # malformed
        json.dumps({"headline": "", "event": "new_contract"}),             # empty
        json.dumps({"headline": "Acme beats", "event": "moon_landing"}),   # unknown label
        json.dumps(good[0]),                                               # duplicate
        json.dumps({"headline": "Acme buyback", "event": "buyback"}),      # alias -> share_buyback
    ]
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"headline": "\xff\xfe"}\n')
    out = tmp_path / "ds"
    rc = main(["data", "import", "--input", str(src), "--domain", str(TAXONOMY),
               "--out", str(out), "--text-column", "headline", "--label-column", "event"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["rows_in"] == 36 and man["rows_kept"] == 31 and man["rows_rejected"] == 5
    reasons = [r["reason"] for r in read_jsonl(out / "rejects.jsonl")]
    assert any(r.startswith("malformed line 31") for r in reasons)
    assert "empty text" in reasons
    assert "unknown label 'moon_landing'" in reasons
    assert any(r.startswith("duplicate of id") for r in reasons)
    assert any(r.startswith("malformed line 36") for r in reasons)  # invalid UTF-8
    kept = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert "share_buyback" in {r["label"] for r in kept}


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    rc = main(["data", "import", "--input", str(tmp_path / "none.csv"), "--domain",
               str(TAXONOMY), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "none.csv: input not found" in capsys.readouterr().err


def test_csv_import_keeps_every_row_and_maps_columns(tmp_path):
    src = tmp_path / "mine.csv"
    body = "title,event\n" + "".join(f"Acme {i} files for Chapter 11 protection,bankruptcy\n"
                                     for i in range(12))
    body += ",bankruptcy\nBeta Corp cuts dividend,not_a_class\n"
    body += "La Banque centrale européenne maintient ses taux directeurs,macro_policy\n"
    src.write_bytes(body.encode() + b"Gamma \xff\xfe wins order,new_contract\n")
    out = tmp_path / "ds"
    rc = main(["data", "import", "--input", str(src), "--domain", str(TAXONOMY),
               "--out", str(out), "--text-column", "title", "--label-column", "event"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert (man["rows_in"], man["rows_kept"], man["rows_rejected"]) == (16, 12, 4)
    reasons = sorted(r["reason"] for r in read_jsonl(out / "rejects.jsonl"))
    assert reasons == ["empty text", "invalid UTF-8 in text", "non-English (cld2)",
                       "unknown label 'not_a_class'"]
    rejected = read_jsonl(out / "rejects.jsonl")
    assert {r["row"] for r in rejected} == {12, 13, 14, 15}  # 0-based data rows
    assert all(r["raw"] for r in rejected)  # the raw input is kept


def test_unknown_override_is_a_one_line_error(tmp_path, capsys):
    rc = main(["data", "build", "--domain", str(TAXONOMY), "--rows", "50", "--out",
               str(tmp_path / "o"), "max_rounds=0"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: data.max_rounds:") and "\n" not in err


def test_faker_slot_pools_are_seeded_unique_and_filtered(taxonomy):
    a, b = taxonomy.slot_values(0), taxonomy.slot_values(0)
    assert a["company"] == b["company"]
    assert len(a["company"]) == len(set(a["company"])) == 4000
    assert not any(", " in c for c in a["company"])  # `exclude` drops "A, B and C" names
    assert a["company"] != taxonomy.slot_values(1)["company"]
    assert all(len(t) == 4 and t.isupper() for t in a["ticker"])


def test_second_events_are_counted_in_the_card_and_only_when_on(tmp_path):
    from distillscale.domain import Taxonomy

    tax = Taxonomy.model_validate({
        "name": "mini", "task": "Classify the headline into one event class.",
        "classes": [{"name": n, "definition": f"{n} news", "prior": 50,
                     "templates": [f"{{company}} {n} {w} {{pct}}%" for w in ("up", "down")]}
                    for n in ("alpha", "beta")],
        "slots": {"company": [f"Firm{i}" for i in range(40)], "pct": {"int": [1, 99]}},
    })
    on = build_dataset(tmp_path / "on", tax, DataConfig(generator="templates", num_examples=400,
                                                        second_event_rate=0.5, card_umap_points=0),
                       seed=0)
    assert 150 <= on["second_events"] <= 250
    card = (tmp_path / "on" / "dataset_card.md").read_text()
    assert f"- second_event_rate: `0.5 ({on['second_events']:,} of 400 rows)`" in card
    # a headline with a second event is labelled by the first
    for r in read_jsonl(tmp_path / "on" / "train.jsonl"):
        assert r["text"].split(" ")[1] == r["label"]
    off = build_dataset(tmp_path / "off", tax, DataConfig(generator="templates",
                                                          num_examples=400, card_umap_points=0),
                        seed=0)
    assert "second_events" not in off
    assert "second_event" not in (tmp_path / "off" / "dataset_card.md").read_text()
