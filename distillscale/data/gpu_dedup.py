"""NeMo-Curator 1.4's own GPU dedup workflows (exact / fuzzy / semantic) and the choice of
dedup backend.

Curator's `ExactDeduplicationWorkflow`, `FuzzyDeduplicationWorkflow` (MinHash + LSH +
connected components) and `SemanticDeduplicationWorkflow` (k-means + pairwise cosine) run on
cuDF / cuML, so they need a GPU; on CPU the recipe uses the indexes of `dedup.py`. This module
is the GPU side: which backend applies (`dedup_backend`), the recipe's dedup settings mapped
onto each workflow's arguments (`curator_dedup_workflows`), and the two global passes the
recipe uses with `data.dedup_backend=curator_gpu` (`CuratorNearDup`, `CuratorSemanticDedup`),
which keep the interface of the CPU indexes.

How the iterative recipe uses workflows that dedup a whole directory: each round, one Parquet
file holds every row kept so far followed by the round's new rows (its row number is the
row's order); the workflow runs over it, and its outputs are read back as *verdicts* for the
new rows only. A row already kept is never dropped afterwards, so a round cannot undo an
earlier one, and among duplicates the earliest row is kept, as on CPU:

- near duplicates: Curator's connected components of the LSH candidate graph
  (`<cache>/ConnectedComponentsStage/*.parquet`: `_curator_dedup_id`, `_duplicate_group_id`);
  Curator's own integer ids are mapped back to rows through the id generator it writes
  (`<output>/fuzzy_id_generator.json`: the file's id range, ids in row order). In each group
  the earliest row is kept and every later new row is a "near duplicate of id <kept>".
- semantic duplicates: Curator's pairwise stage with a ranking by our row order
  (`RankingStrategy` on an `order` column) writes, per row, its most similar *earlier* row
  (`<cache>/pairwise_results/cluster_*.parquet`: `id`, `max_id`, `cosine_sim_score`);
  a new row at or above the threshold is a duplicate of `max_id`.
- exact duplicates stay with the CPU `ExactIndex` on both backends: hashing is linear and
  cheap, and Curator's exact workflow writes only the ids it removes (an arbitrary member
  of each group kept, after its shuffle), so it could not name the row a duplicate copies.

These passes have not been run on a GPU (none on the machines this project is developed on).
Their plumbing - the input written, the outputs read in the format Curator 1.4's sources
write, the verdicts - is tested on CPU with a stand-in for the workflow run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from distillscale.data.curate import _session_kept_open
from distillscale.data.dedup import SemanticIndex

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
    # heavy: torch, only on the path that needs it; the rest of this module stays light
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


def exact_workflow(input_path: Path, output_path: Path):
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow

    # The CPU exact index folds case and whitespace too.
    return ExactDeduplicationWorkflow(
        input_path=str(input_path), output_path=str(output_path),
        input_filetype="parquet", text_field="text", assign_id=True, normalize_text=True,
    )


def fuzzy_workflow(input_path: Path, output_path: Path, cache_path: Path, *,
                   near_threshold: float, seed: int):
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow

    # Character 5-grams as in the CPU MinHash (Curator's default of 24 suits documents,
    # not 10-word headlines).
    return FuzzyDeduplicationWorkflow(
        input_path=str(input_path), output_path=str(output_path),
        cache_path=str(cache_path), input_filetype="parquet", text_field="text",
        seed=seed, char_ngrams=5, num_bands=FUZZY_BANDS,
        minhashes_per_band=minhashes_per_band(near_threshold), normalize_text=True,
    )


def semantic_workflow(input_path: Path, output_path: Path, cache_path: Path, *,
                      semantic_threshold: float, semantic_clusters: int, seed: int):
    """Over Parquet with `id`, `order` and `embeddings`: each cluster is ranked by `order`, so
    a row is compared with the rows before it in the corpus (the CPU index's rule)."""
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.stages.deduplication.semantic.ranking import RankingStrategy
    from nemo_curator.stages.deduplication.semantic.workflow import (
        SemanticDeduplicationWorkflow,
    )

    # Curator's `eps` is a cosine *distance*: duplicates are pairs within 1 - threshold.
    return SemanticDeduplicationWorkflow(
        input_path=str(input_path), output_path=str(output_path),
        cache_path=str(cache_path), n_clusters=semantic_clusters,
        id_field="id", embedding_field="embeddings", metadata_fields=["order"],
        input_filetype="parquet", random_state=seed, distance_metric="cosine",
        ranking_strategy=RankingStrategy(metadata_cols=["order"], ascending=True),
        eps=1.0 - semantic_threshold,
    )


def curator_dedup_workflows(
    *, input_path: Path, output_path: Path, cache_path: Path, near_threshold: float,
    semantic_threshold: float, semantic_clusters: int, seed: int, semantic: bool = True,
) -> dict:
    """The three Curator workflows configured like the CPU recipe, over the Parquet files in
    `input_path` (columns `id`, `text`, and `embeddings` with `order` for the semantic pass),
    each writing under its own subfolder of `output_path` / `cache_path`."""
    output_path, cache_path = Path(output_path), Path(cache_path)
    flows = {
        "exact": exact_workflow(input_path, output_path / "exact"),
        "fuzzy": fuzzy_workflow(input_path, output_path / "fuzzy", cache_path / "fuzzy",
                                near_threshold=near_threshold, seed=seed),
    }
    if semantic:
        flows["semantic"] = semantic_workflow(
            input_path, output_path / "semantic", cache_path / "semantic",
            semantic_threshold=semantic_threshold, semantic_clusters=semantic_clusters,
            seed=seed)
    return flows


# ---------------------------------------------------------------------------------------
# Reading Curator's outputs back (formats as written by NeMo-Curator 1.4's stages).

CURATOR_ID = "_curator_dedup_id"
CURATOR_GROUP = "_duplicate_group_id"
ID_GENERATOR_FILE = "fuzzy_id_generator.json"


def curator_row_ids(id_generator_json: Path, n_rows: int) -> int:
    """The first Curator id of the pass's single input file (row i has id first + i).

    Curator's id generator registers each file group it reads as one id range, in row order;
    a pass writes exactly one file, so there must be exactly one range, of `n_rows` ids."""
    path = Path(id_generator_json)
    if not path.exists():
        raise FileNotFoundError(f"{path}: Curator's fuzzy dedup wrote no id generator state")
    registry = json.loads(path.read_text())["batch_registry"]
    if len(registry) != 1:
        raise RuntimeError(f"{path}: {len(registry)} id ranges for one input file; cannot map "
                           "Curator's ids back to rows")
    lo, hi = next(iter(registry.values()))
    if hi - lo + 1 != n_rows:
        raise RuntimeError(f"{path}: id range {lo}..{hi} covers {hi - lo + 1} rows, the input "
                           f"had {n_rows}")
    return int(lo)


def _read_parquet_dir(folder: Path, columns: list[str]) -> pd.DataFrame:
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


def near_verdicts(components: pd.DataFrame, first_id: int, n_old: int,
                  row_ids: list[str]) -> list[str | None]:
    """Verdicts for the new rows (rows n_old.. of the pass) from Curator's connected
    components: a new row that is not the earliest of its group duplicates the earliest."""
    n = len(row_ids)
    out: list[str | None] = [None] * (n - n_old)
    if components.empty:
        return out
    rows = components[CURATOR_ID].to_numpy(dtype=np.int64) - first_id
    if rows.min() < 0 or rows.max() >= n:
        raise RuntimeError(f"Curator's components name ids outside {first_id}..{first_id + n - 1}")
    groups = components[CURATOR_GROUP].to_numpy()
    frame = pd.DataFrame({"row": rows, "group": groups})
    keeper = frame.groupby("group")["row"].transform("min").to_numpy()
    for r, k in zip(rows.tolist(), keeper.tolist()):
        if r >= n_old and r != k:
            out[r - n_old] = row_ids[k]
    return out


def semantic_verdicts(pairs: pd.DataFrame, new_ids: list[str],
                      threshold: float) -> list[str | None]:
    """Verdicts for the new rows from Curator's pairwise output (`id`, `max_id`,
    `cosine_sim_score`: each row's most similar earlier row in the pass's order)."""
    hits = pairs[(pairs["cosine_sim_score"] >= threshold) & (pairs["id"] != pairs["max_id"])]
    match = dict(zip(hits["id"].tolist(), hits["max_id"].tolist()))
    return [match.get(i) for i in new_ids]


def run_workflow(flow, kind: str) -> None:
    """Run a Curator dedup workflow on Ray actors, inside the recipe's Ray session when one
    is open (Curator's id generator calls `ray.shutdown()` when it is created)."""
    # optional: Ray (with NeMo Curator), only when the data recipe runs
    import ray
    from nemo_curator.backends.ray_actor_pool import RayActorPoolExecutor

    keep = _session_kept_open(ray) if ray.is_initialized() else contextlib.nullcontext()
    with keep:
        if kind == "semantic":
            flow.run(kmeans_executor=RayActorPoolExecutor(),
                     pairwise_executor=RayActorPoolExecutor())
        else:
            flow.run(executor=RayActorPoolExecutor())


Runner = Callable[[object, str], None]


class _Pass:
    """One pass folder: input Parquet, Curator's output and cache, removed afterwards."""

    def __init__(self, root: Path, kind: str, number: int, keep_files: bool) -> None:
        self.dir = Path(root) / "dedup_gpu" / kind / f"pass_{number:03d}"
        self.input = self.dir / "input"
        self.output = self.dir / "output"
        self.cache = self.dir / "cache"
        self.keep_files = keep_files

    @contextlib.contextmanager
    def open(self) -> Iterator[_Pass]:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.input.mkdir(parents=True)
        try:
            yield self
        finally:
            if not self.keep_files:
                shutil.rmtree(self.dir, ignore_errors=True)


class CuratorNearDup:
    """Global near-duplicate removal with Curator's `FuzzyDeduplicationWorkflow` (GPU);
    the interface of `dedup.NearDupIndex`."""

    def __init__(self, work_dir: Path, threshold: float = 0.8, seed: int = 1,
                 runner: Runner | None = None, keep_files: bool = False) -> None:
        self.work_dir, self.threshold, self.seed = Path(work_dir), threshold, seed
        self.runner, self.keep_files = runner, keep_files
        self._texts: list[str] = []
        self._ids: list[str] = []
        self.passes = 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, texts: list[str], ids: list[str]) -> list[str | None]:
        if not texts:
            return []
        self.passes += 1
        n_old = len(self._ids)
        all_ids = self._ids + list(ids)
        with _Pass(self.work_dir, "fuzzy", self.passes, self.keep_files).open() as p:
            pd.DataFrame({"text": self._texts + list(texts)}).to_parquet(
                p.input / "part.0.parquet", index=False)
            flow = fuzzy_workflow(p.input, p.output, p.cache, near_threshold=self.threshold,
                                  seed=self.seed)
            (self.runner or run_workflow)(flow, "fuzzy")
            first = curator_row_ids(Path(flow.output_path) / ID_GENERATOR_FILE, len(all_ids))
            comps = _read_parquet_dir(Path(flow.cache_path) / "ConnectedComponentsStage",
                                      [CURATOR_ID, CURATOR_GROUP])
        out = near_verdicts(comps, first, n_old, all_ids)
        for t, i, d in zip(texts, ids, out):
            if d is None:
                self._texts.append(t)
                self._ids.append(i)
        return out


class CuratorSemanticDedup(SemanticIndex):
    """Global semantic dedup with Curator's `SemanticDeduplicationWorkflow` (GPU k-means and
    pairwise cosine); the interface of `dedup.SemanticIndex`. Curator clusters each pass
    itself, so the kept rows' embeddings are one matrix in kept order (`_members[0]`)."""

    def __init__(self, embedder, work_dir: Path, threshold: float = 0.9,
                 n_clusters: int = 100, seed: int = 0, runner: Runner | None = None,
                 keep_files: bool = False) -> None:
        super().__init__(embedder, threshold, n_clusters, seed)
        self.work_dir, self.runner, self.keep_files = Path(work_dir), runner, keep_files
        self.passes = 0

    def add(self, texts: list[str], ids: list[str]) -> tuple[list[str | None], np.ndarray]:
        emb = self.embedder.encode(list(texts))
        if not len(texts):
            return [], emb
        self.passes += 1
        held = self._members.get(0)
        both = emb if held is None else np.vstack([held, emb])
        all_ids = self.kept_ids + list(ids)
        # heavy: pyarrow, only where a table is read or written
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _Pass(self.work_dir, "semantic", self.passes, self.keep_files).open() as p:
            pq.write_table(pa.table({
                "id": all_ids,
                "order": np.arange(len(all_ids), dtype=np.int64),
                "embeddings": pa.FixedSizeListArray.from_arrays(
                    pa.array(both.astype(np.float32, copy=False).ravel()), both.shape[1]),
            }), p.input / "part.0.parquet")
            flow = semantic_workflow(
                p.input, p.output, p.cache, semantic_threshold=self.threshold,
                # k-means needs at least as many rows as clusters.
                semantic_clusters=max(1, min(self.n_clusters, len(all_ids))), seed=self.seed)
            (self.runner or run_workflow)(flow, "semantic")
            pairs = _read_parquet_dir(Path(flow.cache_path) / "pairwise_results",
                                      ["id", "max_id", "cosine_sim_score"])
        out = semantic_verdicts(pairs, list(ids), self.threshold)
        keep = np.array([d is None for d in out])
        add = emb[keep]
        self._members[0] = add if held is None else np.vstack([held, add])
        self.kept_ids.extend(i for i, k in zip(ids, keep) if k)
        return out, emb

    def embeddings_at(self, positions) -> np.ndarray:
        held = self._members.get(0)
        if held is None:
            return super().embeddings_at(positions)
        return held[np.asarray(positions, dtype=np.int64)]
