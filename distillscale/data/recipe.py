"""The data recipe: iterative Data Designer rounds with global curation (any taxonomy).

Each round, as in the paper's data build:

1. **generate** with Data Designer (`synth.py`), class weights set by the reweighting below;
2. **clean and filter** with a NeMo-Curator pipeline (`curate.py`);
3. **validate labels** (known class, non-empty text, a model reply that is a headline);
4. **dedup against the whole corpus so far** - exact, then MinHash/LSH near-duplicates, then
   semantic (MiniLM embeddings, k-means clusters, cosine threshold) - see `dedup.py`;
5. **pick few-shot examples** per class: the kept headlines farthest from their class
   centroid (the most unusual ones), which the next round's LLM prompts show; offline, the
   next round's phrasing weights follow each phrasing's survival rate instead (phrasings that
   keep producing duplicates are asked for less);
6. **reweight** classes toward the target distribution (`natural` = the taxonomy's long-tail
   prior, `balanced` = uniform): next round's weight of a class is its remaining deficit
   divided by its observed survival rate, so rare or dedup-heavy classes catch up;

and it stops once every class has reached its target (or after `max_rounds`). A class that
overshoots is trimmed deterministically; trimmed rows are rejected with their reason, so
`rows_in = rows_kept + rows_rejected` holds for the whole build.

A finished round is checkpointed in `<work>/recipe_checkpoint/` (its kept rows and rejects,
the dedup indexes, the reweighting state). A killed or preempted build (SIGUSR1 / SIGTERM:
it stops after the current round and exits with the requeue code) resumes after the last
finished round; every round draws from its own seed, so the resumed build is the one an
uninterrupted run makes. A checkpoint of other settings is set aside, not resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from distillscale.compat.console import stderr_console
from distillscale.config import DataConfig
from distillscale.data.curate import FilterSettings, ray_session, run_curation
from distillscale.data.dedup import ExactIndex, NearDupIndex, SemanticIndex, make_embedder
from distillscale.data.generate import class_counts
from distillscale.data.gpu_dedup import CuratorNearDup, CuratorSemanticDedup, dedup_backend
from distillscale.data.io import row_id
from distillscale.data.synth import LLMSettings, RoundSpec, synthesize
from distillscale.domain import Taxonomy
from distillscale.manifest import write_json_atomic
from distillscale.train import preemption

console = stderr_console()

DEDUP_STAGES = ("filters", "labels", "exact", "near", "semantic")


# First-round oversampling, and the floor on later rounds' request (rows).
OVERSAMPLE = 1.05
MIN_ROUND_ROWS = 200
# The `data` settings a round's output depends on: a checkpoint made with others is set aside.
RECIPE_FIELDS = (
    "num_examples", "target_distribution", "min_per_class", "max_rounds", "near_dup_threshold",
    "semantic_dedup", "semantic_threshold", "semantic_clusters", "dedup_backend", "embedding",
    "fewshot_k", "cross_class_duplicates",
)


def embedding_precision(data: DataConfig) -> str:
    """`data.embedding_precision`, or int8 where a config still sets `quantize_embeddings`."""
    return "int8" if data.quantize_embeddings else data.embedding_precision


def filter_settings(data: DataConfig) -> FilterSettings:
    return FilterSettings(min_words=data.min_words, max_words=data.max_words,
                          max_non_alnum_ratio=data.max_non_alnum_ratio, language=data.language)


@dataclass
class RecipeResult:
    kept: pd.DataFrame                      # id, text, label, gold_label, round
    rejects: list[dict]                     # row, reason, raw
    rounds: list[dict]                      # per-round counts by stage
    fewshot: dict[str, list[str]]           # last round's picks per class
    embeddings: np.ndarray | None           # aligned with `kept` (None without semantic)
    embedder: str | None
    dedup_backend: str
    targets: dict[str, int]
    rows_in: int
    # Near / semantic matches across classes: stage, policy applied, both rows and labels.
    cross_class: list[dict] = field(default_factory=list)


def farthest_from_centroid(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows least similar to the (normalised) mean of `emb`."""
    if len(emb) <= k:
        return np.arange(len(emb))
    c = emb.mean(axis=0)
    c /= max(float(np.linalg.norm(c)), 1e-12)
    return np.argsort(emb @ c, kind="stable")[:k]


def next_class_weights(
    targets: dict[str, int], have: dict[str, int], survival: dict[str, float]
) -> tuple[dict[str, float], int]:
    """Weights for the next round (deficit / survival) and the number of rows to ask for."""
    weights, ask = {}, 0.0
    for name, want in targets.items():
        deficit = want - have.get(name, 0)
        if deficit <= 0:
            continue
        s = min(max(survival.get(name, 1.0), 0.05), 1.0)
        weights[name] = deficit / s
        ask += deficit / s
    return weights, math.ceil(ask)


def run_recipe(
    taxonomy: Taxonomy, data: DataConfig, work_dir: Path, seed: int,
    llm_endpoint: str | None = None,
) -> RecipeResult:
    """Build `data.num_examples` rows of `taxonomy` (see the module doc). `llm_endpoint`
    replaces `data.llm.endpoint` (the URL of a server started for the build)."""
    work_dir = Path(work_dir)
    llm = LLMSettings.from_config(data.llm, llm_endpoint) if data.llm is not None else None
    filters = filter_settings(data)
    slot_values = taxonomy.slot_values(seed)
    targets = class_counts(taxonomy, data.num_examples, data.target_distribution,
                           data.min_per_class)
    backend = dedup_backend(data.dedup_backend)
    # Exact duplicates: the CPU hash index on both backends (see gpu_dedup.py).
    exact = ExactIndex()
    if backend == "curator_gpu":
        near = CuratorNearDup(work_dir, data.near_dup_threshold, seed=seed + 1)
    else:
        near = NearDupIndex(data.near_dup_threshold, seed=seed + 1,
                            cross_class=data.cross_class_duplicates)
    semantic = None
    if data.semantic_dedup:
        embedder = make_embedder(data.embedding, embedding_precision(data),
                                 show_progress=True)
        if backend == "curator_gpu":
            semantic = CuratorSemanticDedup(embedder, work_dir, data.semantic_threshold,
                                            data.semantic_clusters, seed)
        else:
            semantic = SemanticIndex(embedder, data.semantic_threshold,
                                     data.semantic_clusters, seed,
                                     cross_class=data.cross_class_duplicates)
    known = set(taxonomy.labels)
    kept_parts: list[pd.DataFrame] = []
    rejects: list[dict] = []
    rounds: list[dict] = []
    have: dict[str, int] = {}
    survival: dict[str, float] = {}
    pattern_weights: dict[str, list[float]] | None = None
    fewshot: dict[str, list[str]] = {}
    rows_in = 0
    cross: list[dict] = []
    weights, ask = next_class_weights(targets, have, survival)
    ask = math.ceil(ask * OVERSAMPLE)
    ckpt = RoundCheckpoint(work_dir / CHECKPOINT, _fingerprint(taxonomy, data, filters, llm, seed))
    first = 1
    saved = ckpt.load()
    if saved is not None:
        state, kept_parts, round_rejects = saved
        for part in round_rejects:
            rejects.extend(part)
        exact, near = state["exact"], state["near"]
        if semantic is not None:
            state["semantic"].embedder = semantic.embedder
            semantic = state["semantic"]
        rounds, have, survival = state["rounds"], state["have"], state["survival"]
        pattern_weights, fewshot = state["pattern_weights"], state["fewshot"]
        cross = state.get("cross_class", [])
        rows_in, weights, ask = state["rows_in"], state["weights"], state["ask"]
        first = state["round"] + 1
        console.print(f"data: resuming after round {state['round']} from {ckpt.path} "
                      f"({sum(have.values()):,} rows kept so far)")
    # SIGUSR1 / SIGTERM (Slurm's warning, a preemption): finish the round, checkpoint, exit 75.
    preemption.install()
    # One Ray session for the whole build (its start costs seconds and its workers hold
    # memory); the context manager shuts it down and removes its temp folder on success
    # and on error alike.
    with ray_session(work_dir):
        for r in range(first, data.max_rounds + 1):
            if not weights:
                break
            rejects_before = len(rejects)
            t0 = time.time()
            spec = RoundSpec(max(ask, MIN_ROUND_ROWS), weights, pattern_weights, fewshot)
            gen = synthesize(taxonomy, slot_values, spec, work_dir, name=f"round_{r:03d}",
                             seed=seed * 1000 + r, llm=llm)
            # The filled phrasing is only an input of the text column: at 525k rows it is
            # a second copy of every headline held for the whole round.
            gen = gen.drop(columns="draft")
            gen["gold_label"] = gen["label"]
            gen["round"] = r
            gen["gid"] = [f"r{r}-{i}" for i in range(len(gen))]
            rows_in += len(gen)
            counts = {"round": r, "generated": len(gen)}

            def reject(df: pd.DataFrame, reasons, stage: str, counts=counts, r=r) -> None:
                counts[stage] = len(df)
                for row, why in zip(df.itertuples(index=False), reasons):
                    rejects.append({"row": row.gid, "reason": why, "stage": stage, "raw": {
                        "text": row.text, "label": row.label, "round": r,
                    }})

            # 2. Curator cleaning and filters.
            cur_in = gen[["gid", "text", "label", "gold_label", "round", "pattern"]].rename(
                columns={"gid": "id"})
            kept, bad = run_curation(cur_in, filters, work_dir)
            kept = kept.rename(columns={"id": "gid"})
            bad = bad.rename(columns={"id": "gid"})
            reject(bad, bad["reason"], "filters")
            # 3. Label validation.
            ok = kept["label"].isin(known) & kept["text"].astype(str).str.strip().ne("")
            if llm is not None:
                # A reply that repeats the prompt or refuses is not a headline of the class.
                ok &= ~kept["text"].str.contains(r"^Class:|Event class:|Facts to use|as an ai|I can(?:no|')t", case=False,
                                                 regex=True)
            bad = kept[~ok]
            reject(bad, [("unknown label " + repr(lb)) if lb not in known else "not a headline"
                         for lb in bad["label"]], "labels")
            kept = kept[ok].reset_index(drop=True)
            kept["id"] = [row_id(t) for t in kept["text"]]
            # 4. Global dedup: exact, near, semantic.
            # Which class a row a duplicate points to has: the kept corpus or this batch.
            label_of = _LabelOf(kept_parts, kept)
            dup = exact.add(kept["text"].tolist(), kept["id"].tolist())
            mask = np.array([d is None for d in dup], dtype=bool)
            reject(kept[~mask], [
                _dup_reason(d, lb, label_of)
                for d, lb in zip(dup, kept["label"]) if d is not None], "exact")
            kept = kept[mask].reset_index(drop=True)
            kept, _ = _label_aware_pass(near, "near", "near duplicate", kept, label_of, reject,
                                        cross, data.cross_class_duplicates, r)
            if semantic is not None:
                # The index holds the kept rows' embeddings (gathered from it when needed);
                # the round's own matrix is not kept.
                kept, _ = _label_aware_pass(
                    semantic, "semantic", "semantic duplicate", kept, label_of, reject, cross,
                    data.cross_class_duplicates, r,
                    suffix=f" (cosine >= {data.semantic_threshold})")
            else:
                counts["semantic"] = 0
            counts["kept"] = len(kept)
            kept_parts.append(kept)
            # 5. Survival by class and phrasing; few-shot picks.
            gen_by = gen.groupby("label").size()
            kept_by = kept.groupby("label").size()
            for name, n in gen_by.items():
                survival[name] = float(kept_by.get(name, 0)) / float(n)
                have[name] = have.get(name, 0) + int(kept_by.get(name, 0))
            pattern_weights = _pattern_survival(taxonomy, gen, kept)
            fewshot = _fewshot(pd.concat(kept_parts, ignore_index=True), semantic,
                               data.fewshot_k, seed)
            counts["cumulative_kept"] = sum(have.values())
            counts["dedup_rate"] = 1 - len(kept) / max(len(gen), 1)
            counts["seconds"] = round(time.time() - t0, 1)
            rounds.append(counts)
            console.print(
                f"data round {r}: generated {len(gen):,}, kept {len(kept):,} "
                f"(filters {counts['filters']}, labels {counts['labels']}, exact {counts['exact']}, "
                f"near {counts['near']}, semantic {counts['semantic']}), corpus "
                f"{counts['cumulative_kept']:,}/{data.num_examples:,}, {counts['seconds']}s"
            )
            # 6. Reweight toward the target distribution.
            weights, ask = next_class_weights(targets, have, survival)
            # This round's frames are summarised above; free them before the next round
            # generates (rejects and the kept parts hold what is needed).
            del gen, cur_in, kept, bad
            ckpt.save(r, kept_parts[-1], rejects[rejects_before:], {
                "exact": exact, "near": near, "semantic": semantic, "rounds": rounds,
                "have": have, "survival": survival, "pattern_weights": pattern_weights,
                "fewshot": fewshot, "rows_in": rows_in, "weights": weights, "ask": ask,
                "cross_class": cross,
            })
            preemption.check(f"data round {r} (checkpoint {ckpt.path})")
    corpus = pd.concat(kept_parts, ignore_index=True) if kept_parts else pd.DataFrame(
        columns=["id", "text", "label", "gold_label", "round"])
    corpus, keep_idx, surplus = _trim_to_targets(corpus, targets)
    # The corpus is the semantic index's kept rows in the same order.
    embeddings = semantic.embeddings_at(keep_idx) if semantic is not None else None
    for row in surplus.itertuples(index=False):
        rejects.append({"row": row.gid, "reason": f"surplus over class target ({row.label})",
                        "stage": "trim", "raw": {"text": row.text, "label": row.label,
                                                 "round": int(row.round)}})
    _print_rounds(rounds)
    return RecipeResult(
        kept=corpus[["id", "text", "label", "gold_label", "round"]].reset_index(drop=True),
        rejects=rejects, rounds=rounds, fewshot=fewshot, embeddings=embeddings,
        embedder=semantic.embedder.name if semantic is not None else None,
        dedup_backend=backend, targets=targets, rows_in=rows_in, cross_class=cross,
    )


CHECKPOINT = "recipe_checkpoint"


class _LabelOf:
    """Label of a row id among the kept corpus and the current batch (built on first use:
    most rounds' duplicates are looked up, but a round without any needs no map)."""

    def __init__(self, parts: list[pd.DataFrame], batch: pd.DataFrame) -> None:
        self._sources = [*parts, batch]
        self._map: dict[str, str] | None = None

    def __call__(self, rid: str) -> str | None:
        if self._map is None:
            self._map = {}
            for df in self._sources:
                self._map.update(zip(df["id"].tolist(), df["label"].tolist()))
        return self._map.get(rid)


def _dup_reason(dup: str, label: str, label_of) -> str:
    other = label_of(dup)
    if other is not None and other != label:
        return f"conflicting label (same text as id {dup}, labelled {other}; this row {label})"
    return f"exact duplicate of id {dup}"


def _label_aware_pass(index, stage: str, kind: str, kept: pd.DataFrame, label_of, reject,
                      cross: list[dict], policy: str, r: int, suffix: str = ""):
    """One dedup pass that never drops a row for resembling another class's row silently.

    The CPU indexes take the labels and apply `policy` themselves (a kept cross-class match
    is in their `cross_pairs`). NeMo-Curator's GPU workflows compare texts regardless of
    labels, so there a cross-class match is rejected whatever the policy, naming both rows.
    """
    texts, ids, labels = kept["text"].tolist(), kept["id"].tolist(), kept["label"].tolist()
    aware = "labels" in inspect.signature(index.add).parameters
    seen = len(index.cross_pairs) if aware else 0
    res = index.add(texts, ids, labels=labels) if aware else index.add(texts, ids)
    dup = res[0] if isinstance(res, tuple) else res
    mask = np.array([d is None for d in dup], dtype=bool)
    reasons = []
    for d, rid, lb, text in zip(dup, ids, labels, texts):
        if d is None:
            continue
        other = label_of(d)
        if other is not None and other != lb:
            reasons.append(f"cross-class {kind} of id {d} ({other}); this row {rid} is {lb}"
                           + suffix)
            cross.append({"stage": stage, "round": r, "policy": "reject", "id": rid,
                          "label": lb, "text": text, "other_id": d, "other_label": other})
        else:
            reasons.append(f"{kind} of id {d}{suffix}")
    reject(kept[~mask], reasons, stage)
    if aware:
        by_id = dict(zip(ids, zip(labels, texts)))
        for rid, other_id in index.cross_pairs[seen:]:
            lb, text = by_id.get(rid, (None, None))
            cross.append({"stage": stage, "round": r, "policy": "keep", "id": rid,
                          "label": lb, "text": text, "other_id": other_id,
                          "other_label": label_of(other_id)})
    return kept[mask].reset_index(drop=True), dup


def _fingerprint(taxonomy: Taxonomy, data: DataConfig, filters: FilterSettings,
                 llm: LLMSettings | None, seed: int) -> str:
    """What a checkpoint must have been made with to be resumed."""
    given = {k: getattr(data, k) for k in RECIPE_FIELDS}
    given |= {"embedding_precision": embedding_precision(data),
              "filters": dataclasses.asdict(filters), "llm": None}
    if llm is not None:
        # A served model gets a new port when the build restarts: not a different build.
        given["llm"] = {k: v for k, v in dataclasses.asdict(llm).items() if k != "endpoint"}
    text = json.dumps({"taxonomy": taxonomy.model_dump(mode="json"), "settings": given,
                       "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RoundCheckpoint:
    """The recipe's state after each finished round, in one folder.

    Per round, its kept rows (`round_NNN.kept.parquet`) and rejects (`round_NNN.rejects.pkl`)
    are written once; the state - dedup indexes (pickled: they are this library's objects,
    the embedding model is left out and given back on load), reweighting, counts - is
    rewritten each round. `state.json`, written last and atomically, names the last complete
    round: a build killed while writing a round resumes from the round before it.
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def save(self, r: int, kept: pd.DataFrame, rejects: list[dict], state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        kept.to_parquet(self.path / f"round_{r:03d}.kept.parquet", index=False)
        with open(self.path / f"round_{r:03d}.rejects.pkl", "wb") as f:
            pickle.dump(rejects, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp = self.path / f"state_{r:03d}.pkl"
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        write_json_atomic(self.path / "state.json", {
            "round": r, "fingerprint": self.fingerprint, "state": tmp.name})
        for old in self.path.glob("state_*.pkl"):
            if old != tmp:
                old.unlink()

    def load(self) -> tuple[dict, list[pd.DataFrame], list[list[dict]]] | None:
        head = self.path / "state.json"
        if not head.exists():
            return None
        meta = json.loads(head.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            stale = self.path.with_name(self.path.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            self.path.rename(stale)
            console.print(f"data: the checkpoint in {self.path} was made with other settings; "
                          f"moved to {stale.name}, starting from round 1")
            return None
        with open(self.path / meta["state"], "rb") as f:
            state = pickle.load(f)
        r = int(meta["round"])
        state["round"] = r
        kept, rejects = [], []
        for i in range(1, r + 1):
            rows, rej = (self.path / f"round_{i:03d}.kept.parquet",
                         self.path / f"round_{i:03d}.rejects.pkl")
            for path in (rows, rej):
                if not path.exists():
                    raise FileNotFoundError(f"{path}: missing from the checkpoint of round {r}; "
                                            f"remove {self.path} to build from round 1")
            kept.append(pd.read_parquet(rows))
            with open(rej, "rb") as f:
                rejects.append(pickle.load(f))
        return state, kept, rejects


def _pattern_survival(taxonomy: Taxonomy, gen: pd.DataFrame, kept: pd.DataFrame) -> dict:
    g = gen.groupby(["label", gen["pattern"].astype(int)]).size()
    k = kept.groupby(["label", kept["pattern"].astype(int)]).size()
    out = {}
    for c in taxonomy.classes:
        if c.name not in g.index.get_level_values(0):
            continue
        out[c.name] = [
            (float(k.get((c.name, i), 0)) + 1.0) / (float(g.get((c.name, i), 0)) + 1.0)
            for i in range(len(c.templates))
        ]
    return out


def _fewshot(corpus: pd.DataFrame, semantic: SemanticIndex | None, k: int, seed: int) -> dict:
    """Per class, the k kept headlines farthest from the class centroid (random without
    embeddings). `corpus` is in the semantic index's kept order."""
    out = {}
    rng = np.random.default_rng(seed)
    for name, idx in corpus.groupby("label").indices.items():
        if semantic is not None:
            pick = idx[farthest_from_centroid(semantic.embeddings_at(idx), k)]
        else:
            pick = rng.choice(idx, size=min(k, len(idx)), replace=False)
        out[name] = corpus["text"].iloc[pick].tolist()
    return out


def _trim_to_targets(corpus: pd.DataFrame, targets: dict[str, int]):
    """(kept rows, their positions in `corpus`, surplus rows)."""
    if corpus.empty:
        return corpus, np.zeros(0, dtype=np.int64), corpus
    order = corpus.sort_values(["label", "round", "id"], kind="stable")
    rank = order.groupby("label").cumcount()
    limit = order["label"].map(targets).fillna(0).astype(int)
    keep_idx = order.index[rank < limit]
    drop_idx = order.index[rank >= limit]
    keep_idx = np.sort(keep_idx.to_numpy())
    kept = corpus.loc[keep_idx].reset_index(drop=True)
    return kept, keep_idx, corpus.loc[drop_idx]


def _print_rounds(rounds: list[dict]) -> None:
    t = Table(title="data rounds")
    for col in ("round", "generated", *DEDUP_STAGES, "kept", "cumulative_kept", "dedup_rate"):
        t.add_column(col, justify="right")
    for r in rounds:
        t.add_row(*[f"{r[c]:.3f}" if c == "dedup_rate" else f"{r[c]:,}" for c in
                    ("round", "generated", *DEDUP_STAGES, "kept", "cumulative_kept", "dedup_rate")])
    console.print(t)
