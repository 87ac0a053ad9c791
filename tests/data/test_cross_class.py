"""Curation that respects labels: a near or semantic match across classes is never dropped
silently, and imported labels match a class by name, alias and case."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distillscale.config import DataConfig
from distillscale.data.build import build_dataset, cross_class_summary, read_jsonl, validate_rows
from distillscale.data.card import cross_class_section
from distillscale.data.dedup import NearDupIndex, SemanticIndex
from distillscale.data.recipe import _label_aware_pass, _LabelOf
from distillscale.domain import load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
POS = "Helix Therapeutics says Zelvora shows statistically significant benefit in lung trial"
NEG = "Helix Therapeutics says Zelvora shows no statistically significant benefit in lung trial"
POS2 = "Helix Therapeutics says Zelvora shows statistically significant benefit in lung trials"


def test_near_index_keeps_cross_class_matches_and_records_them():
    idx = NearDupIndex(0.8, cross_class="keep")
    assert idx.add([POS], ["p"], labels=["positive"]) == [None]
    # NEG is a near duplicate of POS (Jaccard >= 0.8) but of another class: kept, recorded
    assert idx.add([NEG, POS2], ["n", "p2"], labels=["negative", "positive"]) == [None, "p"]
    assert idx.cross_pairs == [("n", "p")]
    # without labels the old behaviour: the contrast row goes
    plain = NearDupIndex(0.8)
    plain.add([POS], ["p"])
    assert plain.add([NEG], ["n"]) == ["p"]
    rej = NearDupIndex(0.8, cross_class="reject")
    rej.add([POS], ["p"], labels=["positive"])
    assert rej.add([NEG], ["n"], labels=["negative"]) == ["p"] and rej.cross_pairs == []


class Fixed:
    """Unit vectors chosen per text: a and b (other class) nearly equal, c a same-class copy."""

    def __init__(self):
        rng = np.random.default_rng(0)
        base = rng.normal(size=16)
        self.v = {"a": base, "b": base + 0.01 * rng.normal(size=16),
                  "c": base + 0.01 * rng.normal(size=16), "z": rng.normal(size=16)}

    def encode(self, texts):
        out = np.stack([self.v[t] for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("policy", ["keep", "reject"])
def test_semantic_index_respects_labels(policy):
    idx = SemanticIndex(Fixed(), threshold=0.95, n_clusters=1, seed=0, cross_class=policy)
    dup, _ = idx.add(["a", "z"], ["a", "z"], labels=["pos", "neg"])
    assert dup == [None, None]
    dup, _ = idx.add(["b", "c"], ["b", "c"], labels=["neg", "pos"])
    if policy == "keep":
        assert dup == [None, "a"] and idx.cross_pairs == [("b", "a")]
        assert idx.kept_ids == ["a", "z", "b"]
        np.testing.assert_allclose(idx.embeddings_of_kept()[1][2], Fixed().encode(["b"])[0])
    else:
        assert dup == ["a", "a"] and idx.cross_pairs == []


def test_pass_names_both_rows_and_the_gpu_path_never_drops_silently():
    kept = pd.DataFrame({"id": ["n", "p2"], "text": [NEG, POS2], "label": ["negative", "positive"]})
    earlier = [pd.DataFrame({"id": ["p"], "text": [POS], "label": ["positive"]})]
    rejects, cross = [], []

    def reject(df, reasons, stage):
        rejects.extend({"id": i, "reason": r, "stage": stage} for i, r in zip(df["id"], reasons))

    idx = NearDupIndex(0.8, cross_class="keep")
    idx.add([POS], ["p"], labels=["positive"])
    out, _ = _label_aware_pass(idx, "near", "near duplicate", kept, _LabelOf(earlier, kept),
                               reject, cross, "keep", 1)
    assert out["id"].tolist() == ["n"]
    assert rejects == [{"id": "p2", "reason": "near duplicate of id p", "stage": "near"}]
    assert cross == [{"stage": "near", "round": 1, "policy": "keep", "id": "n",
                      "label": "negative", "text": NEG, "other_id": "p",
                      "other_label": "positive"}]

    class LabelBlind:  # the Curator GPU workflows' interface: no labels
        cross_pairs: list = []

        def add(self, texts, ids):
            return ["p" for _ in texts]

    rejects.clear()
    cross.clear()
    out, _ = _label_aware_pass(LabelBlind(), "near", "near duplicate", kept,
                               _LabelOf(earlier, kept), reject, cross, "keep", 2)
    assert out.empty
    assert rejects[0]["reason"] == "cross-class near duplicate of id p (positive); this row n " \
                                   "is negative"
    assert [c["policy"] for c in cross] == ["reject"]
    summary = cross_class_summary(cross, pd.DataFrame({"id": ["p"], "text": [POS]}), "keep")
    assert summary["rejected"] == 1 and summary["examples"][0]["other_text"] == POS
    md = "\n".join(cross_class_section(summary))
    assert "## Cross-class near pairs" in md and NEG in md and "(positive)" in md


def test_imported_labels_match_by_name_alias_and_case_and_conflicts_are_named(tmp_path):
    tax = load_taxonomy(ROOT / "conf/domains/finance.yaml")
    raw = [{"text": "Acme wins FDA approval for Zelvora", "label": "Regulatory Approval"},
           {"text": "Acme wins FDA nod for Abrexin", "label": "APPROVAL"},
           {"text": "Acme wins EMA nod for Abrexin", "label": "regulatory-approval"},
           {"text": "Acme wins FDA nod for Abrexin", "label": "new_contract"},
           {"text": "Acme buys Globex", "label": "takeover?"}]
    kept, rejects = validate_rows(raw, tax)
    assert [r["label"] for r in kept] == ["regulatory_approval"] * 3
    assert rejects[0]["reason"].startswith("conflicting label (same text as id")
    assert "labelled regulatory_approval; this row new_contract" in rejects[0]["reason"]
    assert rejects[1]["reason"] == "unknown label 'takeover?'"


def test_file_generator_reads_its_columns_from_the_data_config(tmp_path):
    tax = load_taxonomy(ROOT / "conf/domains/finance.yaml")
    src = tmp_path / "mine.jsonl"
    names = ["Share Buyback", "dividend cut", "IPO_listing", "Litigation"]
    src.write_text("".join(json.dumps({"headline": f"Acme {i} event {names[i % 4]}",
                                       "event": names[i % 4]}) + "\n" for i in range(80)))
    data = DataConfig(generator="file", source_path=str(src), text_column="headline",
                      label_column="event", language="en")
    (tmp_path / "out").mkdir()
    m = build_dataset(tmp_path / "out", tax, data, seed=0)
    assert m["rows_kept"] + m["rows_rejected"] == 80
    labels = {r["label"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert labels <= {"share_buyback", "dividend_cut", "ipo_listing", "litigation"}
    assert len(labels) == 4
