"""NeMo-Curator 1.4's own GPU dedup workflows (exact / fuzzy / semantic) and the choice of
dedup backend.

Curator's `ExactDeduplicationWorkflow`, `FuzzyDeduplicationWorkflow` (MinHash + LSH +
connected components) and `SemanticDeduplicationWorkflow` (k-means + pairwise cosine) run on
cuDF / cuML, so they need a GPU; on CPU the recipe uses the indexes of `dedup.py`. This module
is the thin GPU side: which backend applies (`dedup_backend`) and the recipe's dedup settings
mapped onto each workflow's arguments (`curator_dedup_workflows`). It has not been run on a
GPU (none on the machines this project is developed on); the mapping is unit-tested.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Literal

Backend = Literal["curator_gpu", "cpu"]
BACKENDS = ("auto", "curator_gpu", "cpu")

# Curator's fuzzy dedup detects pairs through LSH bands only (no Jaccard check afterwards),
# so the Jaccard threshold is set through the band shape: a pair with Jaccard s shares a
# band with probability 1 - (1 - s^r)^b, whose steepest point is s* = (1/b)^(1/r).
FUZZY_BANDS = 20


def gpu_dedup_available() -> bool:
    """A CUDA device and cuDF (Curator's GPU dedup needs both)."""
    if importlib.util.find_spec("cudf") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def dedup_backend(requested: str = "auto") -> Backend:
    """`auto`: Curator's GPU workflows when a GPU and cuDF are present, else the CPU indexes;
    `cpu` / `curator_gpu` force one (forcing the GPU without one is an error)."""
    if requested not in BACKENDS:
        raise ValueError(f"data.dedup_backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "cpu":
        return "cpu"
    available = gpu_dedup_available()
    if requested == "curator_gpu" and not available:
        raise RuntimeError("data.dedup_backend=curator_gpu needs a CUDA GPU and cuDF "
                           "(NeMo-Curator's text_cuda12 extra); use auto or cpu")
    return "curator_gpu" if available else "cpu"


def minhashes_per_band(threshold: float, num_bands: int = FUZZY_BANDS) -> int:
    """Rows per LSH band that put the band curve's threshold (1/b)^(1/r) nearest `threshold`."""
    if not 0 < threshold < 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1), got {threshold}")
    return max(1, round(math.log(1 / num_bands) / math.log(threshold)))


def curator_dedup_workflows(
    *, input_path: Path, output_path: Path, cache_path: Path, near_threshold: float,
    semantic_threshold: float, semantic_clusters: int, seed: int, semantic: bool = True,
) -> dict:
    """The three Curator workflows configured like the CPU recipe, over the Parquet files in
    `input_path` (columns `id`, `text`, and `embeddings` for the semantic pass)."""
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow
    from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow
    from nemo_curator.stages.deduplication.semantic.workflow import (
        SemanticDeduplicationWorkflow,
    )

    output_path, cache_path = Path(output_path), Path(cache_path)
    flows = {
        # The CPU exact index folds case and whitespace too.
        "exact": ExactDeduplicationWorkflow(
            input_path=str(input_path), output_path=str(output_path / "exact"),
            input_filetype="parquet", text_field="text", assign_id=True, normalize_text=True,
        ),
        # Character 5-grams as in the CPU MinHash (Curator's default of 24 suits documents,
        # not 10-word headlines).
        "fuzzy": FuzzyDeduplicationWorkflow(
            input_path=str(input_path), output_path=str(output_path / "fuzzy"),
            cache_path=str(cache_path / "fuzzy"), input_filetype="parquet", text_field="text",
            seed=seed, char_ngrams=5, num_bands=FUZZY_BANDS,
            minhashes_per_band=minhashes_per_band(near_threshold), normalize_text=True,
        ),
    }
    if semantic:
        # Curator's `eps` is a cosine *distance*: duplicates are pairs within 1 - threshold.
        flows["semantic"] = SemanticDeduplicationWorkflow(
            input_path=str(input_path), output_path=str(output_path / "semantic"),
            cache_path=str(cache_path / "semantic"), n_clusters=semantic_clusters,
            id_field="id", embedding_field="embeddings", input_filetype="parquet",
            random_state=seed, distance_metric="cosine", eps=1.0 - semantic_threshold,
        )
    return flows
