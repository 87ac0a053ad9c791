"""Top-k teacher logit cache for offline distillation: sharded safetensors, tail mass kept.

Per supervised token the cache keeps the teacher's k most likely next tokens and their
log-probabilities, plus the log of the remaining ("tail") probability mass, so a student's KL to
the teacher can be computed over k + 1 outcomes (the top-k tokens and one tail bucket):

    KL_cache = sum_{i in top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
    q_tail = 1 - sum_{i in top-k} q_i

which is the exact KL of the two distributions with the tail merged into one outcome (a lower
bound of the full KL, equal to it when the tails are proportional). The bound misses
p_tail * KL(teacher tail || student tail), which is not small for a teacher whose tail is heavy
(a tiny, briefly trained one). Optionally (`tail_samples=m`, HF backend) the cache also keeps m
tokens drawn from the teacher's tail with their log-probabilities, and the tail term becomes
p_tail * mean_j (log p_j - log q_j) over the draws: an unbiased estimate of the full tail sum,
as in random-sampling KD ("Sparse Logit Sampling", Anshumann et al., 2025).

Layout of one token: token ids bit-packed at ceil(log2 vocab) bits (11 bits for the tiny
teacher, 18 for Qwen3's 151,936), log-probabilities and the tail log-mass as float16: k*bits/8
+ 2k + 2 bytes, at k=64 218 bytes for the tiny teacher and 274 for Qwen3; m tail draws add
m * (bits/8 + 2) bytes (m=16: 54 and 68); each row adds its id, start and offset (~24 bytes).
DistillKit's cache, the best public one, is about 300 bytes per token. Bit packing is written
here: no maintained library packs integers of arbitrary width into a byte array that
safetensors can hold.

Shards are `shard-00000.safetensors` (written atomically, so a killed run keeps whole shards and
resumes at the next one); `index.json` appears last and marks the cache complete. The folder is
named by `cache_key(...)`, a content hash of what the logits depend on (teacher weights,
tokenizer, chat template, prompt template, the token sequences themselves, k, format), so a
second run or another student with the same inputs reuses it, and any change misses it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.numpy import save_file

from distillscale.manifest import atomic_path, write_json_atomic

INDEX = "index.json"
# How a shard stores ids and log-probabilities (`LogitCache.write_shard`).
ENCODINGS = ("fp16", "quantized")


# ------------------------------------------------------------------------------- keys


def cache_key(**parts) -> str:
    """Content hash of the named parts (any JSON-serialisable values)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def fingerprint_path(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (name + bytes; large files by size and
    their first and last MiB, so a 64 GB checkpoint is fingerprinted in milliseconds)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:24]


def sequences_hash(sequences: list[list[int]], positions: list[tuple[int, int]]) -> str:
    h = hashlib.sha256()
    for seq, (start, n) in zip(sequences, positions):
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(f"{start}:{n};".encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------- packing


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(max(vocab_size, 2))))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ints < 2**bits -> a uint8 array of ceil(len * bits / 8) bytes."""
    flat = np.asarray(ids, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"token ids outside [0, 2**{bits})")
    # Big-endian bits of each id, `bits` wide, concatenated.
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitmat = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel())


def unpack_ids(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    bitmat = np.unpackbits(np.asarray(buf, dtype=np.uint8))[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return bitmat.astype(np.int64) @ weights


def pack_gaps(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Non-negative ints -> (r, low bits, unary stream): a Rice code (value = high * 2^r + low)
    kept as two streams so both decode without a per-value loop: the low r bits of each value
    bit-packed, then each high part as that many 1 bits and a 0. r minimises the total."""
    v = np.asarray(values, dtype=np.int64).ravel()
    best = min(range(25), key=lambda r: v.size * (r + 1) + int((v >> r).sum()))
    high = v >> best
    stream = np.ones(int(high.sum()) + v.size, dtype=np.uint8)
    stream[np.cumsum(high + 1) - 1] = 0
    low = pack_ids(v & ((1 << best) - 1), best) if best else np.zeros(0, dtype=np.uint8)
    return best, low, np.packbits(stream)


def unpack_gaps(r: int, low: np.ndarray, stream: np.ndarray, count: int) -> np.ndarray:
    zeros = np.flatnonzero(np.unpackbits(np.asarray(stream, dtype=np.uint8)) == 0)[:count]
    high = np.diff(zeros, prepend=-1) - 1
    return (high << r) | (unpack_ids(low, r, count) if r else 0)


def quantize_logprobs(lps: np.ndarray, ref: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Log-probabilities [n, j] as b-bit steps below each position's reference `ref` [n] (the
    top-1 log-probability as stored): lp ~ ref - q * step, one step per shard (its widest
    range / (2^b - 1)), so the top-1 is exact and every ratio p_i / p_1 is kept to within a
    factor exp(step / 2)."""
    delta = np.clip(ref[:, None].astype(np.float64) - lps, 0.0, None)
    step = max(float(delta.max(initial=0.0)) / ((1 << bits) - 1), 1e-6)
    q = np.clip(np.rint(delta / step), 0, (1 << bits) - 1).astype(np.int64)
    return q, step


# ------------------------------------------------------------------------------ rows


@dataclass
class CachedRow:
    row_id: str
    start: int  # first position (index into the row's token sequence) the cache covers
    ids: np.ndarray  # [n, k] int64
    logprobs: np.ndarray  # [n, k] float32
    tail_logprob: np.ndarray  # [n] float32 (log of 1 - sum of the top-k probabilities)
    tail_ids: np.ndarray | None = None  # [n, m] tokens drawn from the teacher's tail
    tail_sample_logprobs: np.ndarray | None = None  # [n, m] their teacher log-probabilities


def tail_logprob(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(top-k logprobs)), computed in float64 (the complement is tiny when the
    top-k hold almost all the mass)."""
    mass = np.exp(np.asarray(logprobs, dtype=np.float64)).sum(-1)
    rest = np.clip(1.0 - mass, 1e-30, 1.0)
    return np.log(rest).astype(np.float32)


# ------------------------------------------------------------------------------ cache


class LogitCache:
    """One cache folder `<root>/<key>/`."""

    def __init__(self, root: str | Path, key: str):
        self.path = Path(root) / key
        self.key = key

    @property
    def complete(self) -> bool:
        return (self.path / INDEX).is_file()

    def shard_path(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.safetensors"

    def write_shard(self, i: int, rows: list[CachedRow], vocab_size: int,
                    encoding: str = "fp16", logprob_bits: int = 6) -> Path:
        """`fp16`: ids bit-packed, log-probabilities float16 (module doc). `quantized`: each
        position's top-k ids sorted and delta-coded (`pack_gaps`), its log-probabilities
        `logprob_bits`-bit steps below its top-1 (`quantize_logprobs`, the top-1 and the tail
        log-mass float16), tail draws' ids bit-packed and their log-probabilities quantized
        the same way below the top-1 on their own step."""
        if not rows:
            raise ValueError("empty shard")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown logit cache encoding {encoding!r} (one of {ENCODINGS})")
        k = rows[0].ids.shape[1]
        bits = id_bits(vocab_size)
        ids = np.concatenate([r.ids for r in rows])
        lps = np.concatenate([r.logprobs for r in rows])
        tail = np.concatenate([r.tail_logprob for r in rows]).astype(np.float16)
        offsets = np.cumsum([0] + [len(r.ids) for r in rows]).astype(np.int32)
        tensors = {"tail_logprob": tail, "offsets": offsets,
                   "starts": np.array([r.start for r in rows], dtype=np.int32)}
        meta = {}
        m = 0 if rows[0].tail_ids is None else rows[0].tail_ids.shape[1]
        if encoding == "fp16":
            tensors["ids_packed"] = pack_ids(ids, bits)
            tensors["logprobs"] = lps.astype(np.float16)
        else:
            order = np.argsort(ids, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, 1)
            lps = np.take_along_axis(lps, order, 1)
            gaps = np.diff(ids, axis=1, prepend=-1) - 1  # distinct sorted ids: gaps >= 0
            r, low, stream = pack_gaps(gaps)
            ref = lps.max(-1).astype(np.float16)
            q, step = quantize_logprobs(lps, ref.astype(np.float32), logprob_bits)
            tensors.update({"id_gaps_low": low, "id_gaps_unary": stream, "top1_logprob": ref,
                            "logprobs_q": pack_ids(q, logprob_bits)})
            meta.update({"rice_r": str(r), "logprob_bits": str(logprob_bits),
                         "logprob_step": repr(step)})
        if m:
            tensors["tail_ids_packed"] = pack_ids(np.concatenate([r.tail_ids for r in rows]), bits)
            t_lps = np.concatenate([r.tail_sample_logprobs for r in rows])
            if encoding == "fp16":
                tensors["tail_sample_logprobs"] = t_lps.astype(np.float16)
            else:
                tq, t_step = quantize_logprobs(t_lps, ref.astype(np.float32), logprob_bits)
                tensors["tail_sample_logprobs_q"] = pack_ids(tq, logprob_bits)
                meta["tail_logprob_step"] = repr(t_step)
        meta.update({"k": str(k), "m": str(m), "id_bits": str(bits),
                     "vocab_size": str(vocab_size), "encoding": encoding,
                     "row_ids": json.dumps([r.row_id for r in rows])})
        self.path.mkdir(parents=True, exist_ok=True)
        dst = self.shard_path(i)
        with atomic_path(dst) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return dst

    def finalize(self, meta: dict) -> None:
        shards = sorted(p.name for p in self.path.glob("shard-*.safetensors"))
        tokens = sum(int(self._read_shard(self.path / s)[0]["offsets"][-1]) for s in shards)
        size = sum((self.path / s).stat().st_size for s in shards)
        write_json_atomic(self.path / INDEX, {
            **meta, "key": self.key, "shards": shards, "tokens": tokens, "bytes": size,
            "bytes_per_token": size / max(tokens, 1),
        })

    def index(self) -> dict:
        return json.loads((self.path / INDEX).read_text())

    @staticmethod
    def _read_shard(path: Path):
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return tensors, meta

    def load(self) -> dict[str, CachedRow]:
        """Every cached row by id (shards in order)."""
        out: dict[str, CachedRow] = {}
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            t, meta = self._read_shard(shard)
            # Shards written before encodings were recorded are fp16 ones.
            encoding = meta.get("encoding", "fp16")
            if encoding not in ENCODINGS:
                raise ValueError(
                    f"{shard}: logit cache encoding {encoding!r} is not one this version reads "
                    f"({', '.join(ENCODINGS)}): delete {self.path} and rerun the teacher stage "
                    "to rebuild it")
            k, bits = int(meta["k"]), int(meta["id_bits"])
            off = t["offsets"]
            n = int(off[-1])
            m = int(meta.get("m", 0))
            if encoding == "fp16":
                ids = unpack_ids(t["ids_packed"], bits, n * k).reshape(-1, k)
                lps = t["logprobs"].astype(np.float32)
            else:
                gaps = unpack_gaps(int(meta["rice_r"]), t["id_gaps_low"], t["id_gaps_unary"],
                                   n * k).reshape(-1, k)
                ids = np.cumsum(gaps + 1, axis=1) - 1
                lb = int(meta["logprob_bits"])
                ref = t["top1_logprob"].astype(np.float32)[:, None]
                q = unpack_ids(t["logprobs_q"], lb, n * k).reshape(-1, k)
                lps = (ref - q * float(meta["logprob_step"])).astype(np.float32)
            tail = t["tail_logprob"].astype(np.float32)
            if m:
                t_ids = unpack_ids(t["tail_ids_packed"], bits, n * m).reshape(-1, m)
                if encoding == "fp16":
                    t_lps = t["tail_sample_logprobs"].astype(np.float32)
                else:
                    tq = unpack_ids(t["tail_sample_logprobs_q"], lb, n * m).reshape(-1, m)
                    t_lps = (ref - tq * float(meta["tail_logprob_step"])).astype(np.float32)
            for j, rid in enumerate(json.loads(meta["row_ids"])):
                a, b = int(off[j]), int(off[j + 1])
                out[rid] = CachedRow(rid, int(t["starts"][j]), ids[a:b], lps[a:b], tail[a:b],
                                     t_ids[a:b] if m else None, t_lps[a:b] if m else None)
        return out


# ------------------------------------------------------------------------------ KL


def kl_full(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) from full log-distributions [..., V]."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def kl_topk(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
            student_logp: torch.Tensor, tail_ids: torch.Tensor | None = None,
            tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL over the k cached tokens plus the tail (module doc): the merged tail
    bucket, or with `tail_ids` / `tail_logprobs` ([..., m]) the sampled-tail estimate.

    ids / logprobs: [..., k] from the cache, tail: [...], student_logp: [..., V] log-softmax.
    """
    s_top = student_logp.gather(-1, ids)
    p_top = logprobs.exp()
    p_tail = tail.exp()
    head = (p_top * (logprobs - s_top)).sum(-1)
    if tail_ids is not None:
        s_draw = student_logp.gather(-1, tail_ids)
        return head + p_tail * (tail_logprobs - s_draw).mean(-1)
    q_tail = (1.0 - s_top.exp().sum(-1)).clamp_min(1e-30)
    return head + p_tail * (tail - q_tail.log())


# ---------------------------------------------------------------------------- building


def kd_sequences(sup) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """From a `SupervisionBatch`: each row's full token sequence and the (start, count) of the
    positions the KD loss covers (`kd_mask`; contiguous: trace then answer)."""
    seqs, spans = [], []
    valid = (sup.prompt_mask + sup.kd_mask) > 0
    for i in range(sup.tokens.shape[0]):
        cols = torch.nonzero(sup.kd_mask[i] > 0).flatten()
        n_in = int(torch.nonzero(valid[i]).flatten().max()) + 1 if valid[i].any() else 0
        last = int(cols.max()) + 1
        n_in = max(n_in, last)
        seqs.append(sup.tokens[i, :n_in].tolist() + [int(sup.targets[i, n_in - 1])])
        start = int(cols.min())
        if last - start != len(cols):
            raise ValueError(f"row {i}: supervised positions are not contiguous")
        spans.append((start, len(cols)))
    return seqs, spans


def build_cache(backend, sequences: list[list[int]], spans: list[tuple[int, int]],
                row_ids: list[str], k: int, cache: LogitCache, shard_size: int = 512,
                meta: dict | None = None, desc: str = "logit cache",
                tail_samples: int = 0, seed: int = 0, encoding: str = "fp16",
                logprob_bits: int = 6) -> LogitCache:
    """Fill `cache` with the teacher's top-k at the given spans, shard by shard (resumable)."""
    if cache.complete:
        return cache
    n_shards = max(1, -(-len(sequences) // shard_size))
    with Progress(console=None, transient=True) as progress:
        task = progress.add_task(desc, total=n_shards)
        for i in range(n_shards):
            if cache.shard_path(i).is_file():
                progress.advance(task)
                continue
            sl = slice(i * shard_size, (i + 1) * shard_size)
            if tail_samples:
                tops = backend.topk_logprobs(sequences[sl], k, tail_samples, seed + i)
            else:
                tops = backend.topk_logprobs(sequences[sl], k)
            rows = []
            for rid, (start, n), top in zip(row_ids[sl], spans[sl], tops):
                lps = top.logprobs[start : start + n]
                span = slice(start, start + n)
                rows.append(CachedRow(
                    rid, start, top.ids[span], lps, tail_logprob(lps),
                    None if top.tail_ids is None else top.tail_ids[span],
                    None if top.tail_logprobs is None else top.tail_logprobs[span]))
            cache.write_shard(i, rows, backend.vocab_size, encoding, logprob_bits)
            progress.advance(task)
    cache.finalize({"k": k, "tail_samples": tail_samples, "rows": len(sequences),
                    "encoding": encoding, **({"logprob_bits": logprob_bits}
                                             if encoding != "fp16" else {}), **(meta or {})})
    return cache
