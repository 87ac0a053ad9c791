"""Choice of dedup backend and the recipe's settings mapped onto NeMo-Curator's GPU dedup
workflows. The workflows import cuDF, which a CPU machine lacks: they are replaced by
recorders, so what is checked is the arguments each one is built with."""

import sys
import types

import pytest

from distillscale.data import gpu_dedup
from distillscale.data.gpu_dedup import curator_dedup_workflows, dedup_backend, minhashes_per_band

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
