"""Choice of dedup backend and the recipe's settings mapped onto NeMo-Curator's GPU dedup
workflows. The workflows import cuDF, which a CPU machine lacks: they are replaced by
recorders, so what is checked is the arguments each one is built with."""

import json as _json
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from distillscale.data import gpu_dedup
from distillscale.data.dedup import char_shingles
from distillscale.data.gpu_dedup import (
    CuratorNearDup,
    CuratorSemanticDedup,
    curator_dedup_workflows,
    dedup_backend,
    minhashes_per_band,
    near_verdicts,
    semantic_verdicts,
)

MODULES = {
    "exact": ("nemo_curator.stages.deduplication.exact.workflow", "ExactDeduplicationWorkflow"),
    "fuzzy": ("nemo_curator.stages.deduplication.fuzzy.workflow", "FuzzyDeduplicationWorkflow"),
    "semantic": ("nemo_curator.stages.deduplication.semantic.workflow",
                 "SemanticDeduplicationWorkflow"),
}


def _machine(monkeypatch, *, cudf: bool, cuda: bool):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_dedup.importlib.util, "find_spec",
                        lambda name, *a: (object() if cudf else None) if name == "cudf"
                        else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def test_auto_picks_curator_only_with_both_a_gpu_and_cudf(monkeypatch):
    _machine(monkeypatch, cudf=True, cuda=True)
    assert dedup_backend() == "curator_gpu"
    assert dedup_backend("cpu") == "cpu"  # the override wins
    _machine(monkeypatch, cudf=True, cuda=False)
    assert dedup_backend("auto") == "cpu"
    _machine(monkeypatch, cudf=False, cuda=True)
    assert dedup_backend("auto") == "cpu"
    with pytest.raises(RuntimeError, match="curator_gpu needs a CUDA GPU and cuDF"):
        dedup_backend("curator_gpu")
    with pytest.raises(ValueError, match="data.dedup_backend: 'gpu' is not one of"):
        dedup_backend("gpu")


def test_this_machine_without_cudf_uses_the_cpu_indexes():
    assert dedup_backend() == "cpu"


def test_band_shape_puts_the_lsh_threshold_at_the_jaccard_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        r = minhashes_per_band(t)
        assert abs((1 / gpu_dedup.FUZZY_BANDS) ** (1 / r) - t) < 0.03
    assert minhashes_per_band(0.8) == 13  # Curator's own default band shape is 20 x 13
    with pytest.raises(ValueError):
        minhashes_per_band(1.0)


def test_workflow_arguments_follow_the_recipe_settings(monkeypatch, tmp_path):
    built = {}
    for kind, (module, cls) in MODULES.items():
        fake = types.ModuleType(module)
        setattr(fake, cls, lambda kind=kind, **kw: built.setdefault(kind, kw))
        monkeypatch.setitem(sys.modules, module, fake)
    flows = curator_dedup_workflows(
        input_path=tmp_path / "in", output_path=tmp_path / "out", cache_path=tmp_path / "cache",
        near_threshold=0.8, semantic_threshold=0.92, semantic_clusters=500, seed=7,
    )
    assert set(flows) == {"exact", "fuzzy", "semantic"}
    ex, fz, se = built["exact"], built["fuzzy"], built["semantic"]
    assert ex["input_path"] == str(tmp_path / "in") and ex["input_filetype"] == "parquet"
    assert ex["normalize_text"] is True and ex["text_field"] == "text"
    assert fz["char_ngrams"] == 5 and fz["num_bands"] == 20 and fz["minhashes_per_band"] == 13
    assert fz["seed"] == 7 and fz["cache_path"] == str(tmp_path / "cache" / "fuzzy")
    assert se["eps"] == pytest.approx(0.08)  # cosine distance = 1 - similarity threshold
    assert se["n_clusters"] == 500 and se["random_state"] == 7
    assert se["distance_metric"] == "cosine" and se["embedding_field"] == "embeddings"
    assert len({ex["output_path"], fz["output_path"], se["output_path"]}) == 3
    built.clear()
    flows = curator_dedup_workflows(
        input_path=tmp_path, output_path=tmp_path, cache_path=tmp_path, near_threshold=0.8,
        semantic_threshold=0.9, semantic_clusters=10, seed=0, semantic=False,
    )
    assert set(flows) == {"exact", "fuzzy"} and "semantic" not in built


# --- the recipe's GPU passes, with a stand-in for the workflow run -------------------------
#
# The stand-in computes what Curator's workflows compute (exact Jaccard of the character
# 5-gram sets instead of MinHash + LSH; every earlier row instead of k-means clusters) and
# writes it in the formats Curator 1.4's stages write, with ids offset and rows shuffled as
# Curator's own would be, so the pass plumbing and the verdicts are what is checked.

class FakeCurator:
    def __init__(self, near_threshold=0.8, first_id=1000):
        self.near_threshold, self.first_id, self.seen = near_threshold, first_id, []

    def __call__(self, flow, kind):
        self.seen.append((kind, flow))
        src = next(Path(flow.input_path).glob("*.parquet"))
        df = pd.read_parquet(src)
        (Path(flow.output_path)).mkdir(parents=True, exist_ok=True)
        if kind == "fuzzy":
            self._fuzzy(flow, df)
        else:
            self._semantic(flow, df)

    def _fuzzy(self, flow, df):
        n, lo = len(df), self.first_id
        Path(flow.output_path, "fuzzy_id_generator.json").write_text(_json.dumps(
            {"next_id": lo + n, "batch_registry": {"k": [lo, lo + n - 1]}}))
        sets = [set(char_shingles(t)) for t in df["text"]]
        src, dst = [], []
        for i in range(n):
            for j in range(i):
                if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= self.near_threshold:
                    src.append(i)
                    dst.append(j)
        out = Path(flow.cache_path) / "ConnectedComponentsStage"
        out.mkdir(parents=True)
        if not src:
            return
        g = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
        _, labels = connected_components(g, directed=False)
        members = sorted(set(src) | set(dst), reverse=True)  # not in row order
        pd.DataFrame({"_curator_dedup_id": [lo + m for m in members],
                      "_duplicate_group_id": [int(labels[m]) + 77 for m in members]}
                     ).to_parquet(out / "0.parquet", index=False)

    def _semantic(self, flow, df):
        assert flow.ranking_strategy.metadata_cols == ["order"]
        df = df.sort_values("order")
        emb = np.stack(df["embeddings"].to_numpy()).astype(np.float32)
        sims = emb @ emb.T
        rows = []
        for i, rid in enumerate(df["id"]):
            if i == 0:
                rows.append((rid, rid, 0.0))
                continue
            j = int(np.argmax(sims[i, :i]))
            rows.append((rid, df["id"].iloc[j], float(sims[i, j])))
        out = Path(flow.cache_path) / "pairwise_results"
        out.mkdir(parents=True)
        pd.DataFrame(rows, columns=["id", "max_id", "cosine_sim_score"]).to_parquet(
            out / "cluster_0.parquet", index=False)


@pytest.fixture
def workflows(monkeypatch):
    """Curator's workflow classes import cuDF: stand-ins that keep their arguments."""
    for module, cls in MODULES.values():
        fake = types.ModuleType(module)
        setattr(fake, cls, lambda **kw: types.SimpleNamespace(**kw))
        monkeypatch.setitem(sys.modules, module, fake)


BASE = [
    "Helix Therapeutics wins FDA approval for Zelvora",
    "Titan Steel to cut 1200 jobs in restructuring",
    "Morgan Stanley upgrades Orion Semiconductor to overweight",
    "Kestrel Motors files for Chapter 11 bankruptcy protection",
]


def test_near_verdicts_keep_the_earliest_row_of_each_component():
    comps = pd.DataFrame({"_curator_dedup_id": [14, 10, 12, 13, 11],
                          "_duplicate_group_id": [5, 5, 9, 9, 5]})
    # rows 0, 1 old (ids 10, 11); rows 2.. new; group 5 = rows {0, 1, 4}, group 9 = {2, 3}
    out = near_verdicts(comps, first_id=10, n_old=2, row_ids=["a", "b", "c", "d", "e"])
    assert out == [None, "c", "a"]  # row 2 keeps; row 3 -> row 2; row 4 -> row 0
    with pytest.raises(RuntimeError, match="outside"):
        near_verdicts(comps, first_id=11, n_old=2, row_ids=list("abcde"))


def test_semantic_verdicts_read_the_earlier_match_at_the_threshold():
    pairs = pd.DataFrame({"id": ["a", "b", "c", "d"], "max_id": ["a", "a", "a", "b"],
                          "cosine_sim_score": [0.0, 0.95, 0.5, 0.9]})
    assert semantic_verdicts(pairs, ["b", "c", "d"], 0.9) == ["a", None, "b"]


def test_curator_near_pass_is_global_and_maps_ids_back(tmp_path, workflows):
    fake = FakeCurator()
    idx = CuratorNearDup(tmp_path, threshold=0.8, runner=fake)
    assert idx.add(BASE, [f"a{i}" for i in range(4)]) == [None] * 4
    out = idx.add([
        "Kestrel Motors files for Chapter 11 bankruptcy protection - WSJ",  # old a3
        "Orbit Foods names new chief financial officer",
        "Orbit Foods names new chief financial officer.",                   # new b1
        "Helix Therapeutics Zelvora fails late-stage psoriasis study",
    ], ["b0", "b1", "b2", "b3"])
    assert out == ["a3", None, "b1", None]
    assert len(idx) == 6
    kind, flow = fake.seen[-1]
    assert kind == "fuzzy" and flow.char_ngrams == 5 and flow.minhashes_per_band == 13
    # The second pass read the kept corpus and the new rows; pass folders are removed.
    assert not (tmp_path / "dedup_gpu" / "fuzzy" / "pass_002").exists()
    # A broken id range is an error naming the file, not a silent misalignment.
    fake.first_id = 0

    def short(flow, kind):
        fake(flow, kind)
        Path(flow.output_path, "fuzzy_id_generator.json").write_text(
            _json.dumps({"next_id": 3, "batch_registry": {"k": [0, 2]}}))

    idx.runner = short
    with pytest.raises(RuntimeError, match="fuzzy_id_generator.json: id range 0..2 covers 3"):
        idx.add(["Orbit Foods names new chief executive"], ["c0"])


def test_curator_semantic_pass_keeps_embeddings_of_kept_rows(tmp_path, workflows):
    class Table:
        vec: typing.ClassVar = {"x": [1, 0, 0], "x2": [0.99, 0.14, 0], "y": [0, 1, 0], "z": [0, 0, 1],
               "y2": [0.1, 0.995, 0], "z2": [0.6, 0, 0.8]}

        def encode(self, texts):
            e = np.array([self.vec[t] for t in texts], dtype=np.float32).reshape(-1, 3)
            return e / np.linalg.norm(e, axis=1, keepdims=True) if len(e) else e

    fake = FakeCurator()
    idx = CuratorSemanticDedup(Table(), tmp_path, threshold=0.9, n_clusters=50, runner=fake)
    out, emb = idx.add(["x", "y", "x2"], ["i0", "i1", "i2"])
    assert out == [None, None, "i0"] and emb.shape == (3, 3)
    out, _ = idx.add(["y2", "z", "z2"], ["j0", "j1", "j2"])
    assert out == ["i1", None, None]  # z2: cosine 0.8 to z, 0.6 to x: kept
    ids, kept = idx.embeddings_of_kept()
    assert ids == ["i0", "i1", "j1", "j2"]
    np.testing.assert_allclose(kept, Table().encode(["x", "y", "z", "z2"]), atol=1e-6)
    flow = fake.seen[-1][1]
    assert flow.n_clusters == 5  # capped at the pass's row count (2 kept + 3 new)
    assert flow.eps == pytest.approx(0.1)


@pytest.mark.slow
def test_recipe_with_the_curator_gpu_backend_accounts_for_every_row(
        tmp_path, monkeypatch, workflows):
    """`data.dedup_backend=curator_gpu` end to end (the machine and the workflow runs stood
    in for): every row kept or rejected, and each duplicate names a row of the build."""
    from distillscale.cli import main
    from distillscale.data.build import read_jsonl, row_id

    taxonomy = Path(__file__).resolve().parents[2] / "conf/domains/finance.yaml"
    monkeypatch.setattr(gpu_dedup, "gpu_dedup_available", lambda: True)
    fake = FakeCurator(near_threshold=0.8)
    monkeypatch.setattr(gpu_dedup, "run_workflow", fake)
    out = tmp_path / "data"
    assert main(["data", "build", "--domain", str(taxonomy), "--rows", "500", "--out", str(out),
                 "max_rounds=2", "semantic_clusters=8", "embedding=minilm_static",
                 "card_umap_points=0", "dedup_backend=curator_gpu"]) == 0
    man = _json.loads((out / "manifest.json").read_text())
    assert man["metrics"]["dedup_backend"] == "curator_gpu"
    assert man["rows_in"] == man["rows_kept"] + man["rows_rejected"]
    assert {k for k, _ in fake.seen} == {"fuzzy", "semantic"}
    kept = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    rejects = read_jsonl(out / "rejects.jsonl")
    known = {r["id"] for r in kept} | {row_id(r["raw"]["text"]) for r in rejects}
    dups = [r for r in rejects if r["reason"].startswith(("near duplicate", "semantic duplicate"))]
    assert any(r["reason"].startswith("near duplicate") for r in dups)
    for r in dups:
        assert r["reason"].split("of id ")[1].split()[0] in known
