"""Stage outputs: one folder per stage, written atomically, with a `manifest.json`.

A manifest records the config hash of the sections the stage depends on, the hashes of its
inputs (their own manifests, so changes propagate down the pipeline), library versions, wall
time, metrics and the files the stage wrote (name, size, and the hash of each small file). A
stage is skipped on re-run only when its manifest matches and every listed file is still there
unchanged; `stale_reason` says why it is not.

An unfinished stage (`<stage>.tmp/`, which the stage may resume from) carries the fingerprint of
the settings that made it; a rerun with other settings sets it aside instead of resuming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from distillscale.compat.console import stderr_console
from distillscale.runtime import ranks

MANIFEST = "manifest.json"
# Written first into `<stage>.tmp/`: the config hash and input hashes of the run that made it.
FINGERPRINT = ".fingerprint.json"
# Files up to this size are hashed in the manifest (configs, tables, JSON, tokenizers); larger
# ones (weights, caches) are checked by size, so a skip check stays milliseconds.
HASHED_MAX_BYTES = 1 << 20
# A partial file of the atomic writers here and in distillscale/train: `.<name>.tmp<pid>`.
_PARTIAL = re.compile(r"^\..+\.tmp\d+$")
TRACKED_LIBRARIES = (
    "distillscale",
    "torch",
    "megatron-core",
    "nvidia-modelopt",
    "megatron-bridge",
    "transformers",
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def input_hash(path: Path) -> str:
    """Hash of an input: its manifest for a stage folder, else the bytes of the file."""
    path = Path(path)
    if path.is_dir():
        m = path / MANIFEST
        if not m.is_file():
            raise FileNotFoundError(f"{path}: not a finished stage folder (no {MANIFEST})")
        return hashlib.sha256(m.read_bytes()).hexdigest()[:16]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input not found")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(folder: Path) -> dict | None:
    m = Path(folder) / MANIFEST
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError:
        return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def list_outputs(folder: Path) -> dict[str, dict]:
    """Every file under `folder` (but the manifest) by relative path: size, and the hash of
    files up to `HASHED_MAX_BYTES`."""
    folder = Path(folder)
    out: dict[str, dict] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        size = p.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASHED_MAX_BYTES:
            entry["sha256"] = _file_hash(p)
        out[rel] = entry
    return out


def outputs_problem(folder: Path, listed: dict[str, dict]) -> str | None:
    """What is missing or changed among the files a manifest lists, or None."""
    folder = Path(folder)
    for rel, entry in listed.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != entry.get("size"):
            return f"{rel} changed size ({entry.get('size')} -> {size} bytes)"
        if "sha256" in entry and _file_hash(p) != entry["sha256"]:
            return f"{rel} changed (hash differs)"
    return None


def stale_reason(folder: Path, config_hash: str, inputs: dict[str, Path]) -> str | None:
    """Why the stage in `folder` must (re-)run, or None when it is up to date: no manifest,
    other settings, changed inputs, or a file it wrote that is missing or changed."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return "not run yet" if not folder.exists() else f"no {MANIFEST} in {folder}"
    man = read_manifest(folder)
    if man is None:
        return f"{folder / MANIFEST} is unreadable"
    if man.get("config_hash") != config_hash:
        return "its settings changed"
    try:
        want = {k: input_hash(v) for k, v in inputs.items()}
    except FileNotFoundError as e:
        return f"an input is missing ({e})"
    have = man.get("inputs") or {}
    changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if changed:
        return f"its inputs changed ({', '.join(changed)})"
    listed = man.get("outputs")
    if not isinstance(listed, dict):
        return "its manifest lists no outputs to verify"
    problem = outputs_problem(folder, listed)
    return f"{problem} in {folder}" if problem else None


def is_up_to_date(folder: Path, config_hash: str, inputs: dict[str, Path]) -> bool:
    return stale_reason(folder, config_hash, inputs) is None


def remove_partials(folder: Path) -> list[Path]:
    """Delete partial files of interrupted atomic writes (`.<name>.tmp<pid>`) under `folder`:
    a full disk or a kill leaves them, and none of them is ever a valid output."""
    gone = []
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in folder.rglob(".*.tmp*"):
        if p.is_file() and _PARTIAL.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p)
    return gone


def _claim_unfinished(tmp: Path, stage: str, fingerprint: dict) -> None:
    """Keep `tmp` (an unfinished run of this stage) only if the same settings and inputs made
    it; otherwise move it to `<stage>.tmp.stale` with a one-line note. Then mark it as ours."""
    if tmp.exists() and any(tmp.iterdir()):
        fp = tmp / FINGERPRINT
        try:
            theirs = json.loads(fp.read_text()) if fp.is_file() else None
        except (OSError, json.JSONDecodeError):
            theirs = None
        if theirs != fingerprint:
            stale = tmp.with_name(tmp.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, stale)
            why = ("was made with other settings or inputs" if theirs is not None
                   else "carries no fingerprint of its settings")
            stderr_console().print(
                f"{stage}: the unfinished run in {tmp} {why}; moved to {stale.name}, "
                "starting afresh")
    tmp.mkdir(parents=True, exist_ok=True)
    remove_partials(tmp)
    write_json_atomic(tmp / FINGERPRINT, fingerprint)


@dataclass
class StageOutput:
    """The temp folder a stage writes into; `metrics` end up in the manifest."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""  # the stage's identity (results tables carry it)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a part of the stage body: seconds accumulate in `metrics["phase_s"][name]`
        (the manifest's profile of where a stage spends its wall time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            phases = self.metrics.setdefault("phase_s", {})
            phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - start, 3)


@contextlib.contextmanager
def atomic_stage(
    folder: Path, stage: str, config_hash: str, inputs: dict[str, Path], collective: bool = True
) -> Iterator[StageOutput]:
    """Write a stage into `<folder>.tmp`, then swap it into place with its manifest.

    A killed stage leaves only the temp folder (whose `checkpoints/` the stage may resume
    from); the previous finished output, if any, stays intact until the new one is complete.

    Under several ranks (srun), rank 0 alone writes the stage folder and its manifest. The other
    ranks compute the same stage into a private `.rank<N>/` scratch folder inside the temp
    folder (their own checkpoints live there, so a requeued job resumes every rank), which is
    dropped when the stage completes. `collective` stages meet at a barrier before the swap and
    after it, so no rank reads a half-written folder; a stage only rank 0 computes passes False.
    """
    folder = Path(folder)
    hashes = {k: input_hash(v) for k, v in inputs.items()}
    tmp = folder.with_name(folder.name + ".tmp")
    writer = ranks.is_rank_zero()
    sync = collective and ranks.world_size() > 1
    if writer:
        _claim_unfinished(tmp, stage, {"stage": stage, "config_hash": config_hash,
                                       "inputs": hashes})
    if sync:
        ranks.barrier()  # no rank writes into an unfinished folder rank 0 is setting aside
    out = StageOutput(tmp if writer else tmp / f".rank{ranks.rank()}", config_hash=config_hash)
    out.path.mkdir(parents=True, exist_ok=True)
    start = time.time()
    yield out
    if sync:
        ranks.barrier()  # every rank has finished writing
    if not writer:
        if sync:
            ranks.barrier()  # rank 0 has swapped the finished folder into place
        return
    for scratch in tmp.glob(".rank*"):
        shutil.rmtree(scratch)
    remove_partials(tmp)
    (tmp / FINGERPRINT).unlink(missing_ok=True)
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "inputs": hashes,
        "input_paths": {k: str(v) for k, v in inputs.items()},
        "versions": library_versions(),
        "wall_time_s": round(time.time() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": out.metrics,
        **out.extra,
        "outputs": list_outputs(tmp),
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    if sync:
        ranks.barrier()


def writer_path(path: Path) -> Path:
    """The rank-0 counterpart of a path inside a stage output: a rank's private `.rank<N>/`
    scratch folder (see `atomic_stage`) maps to rank 0's folder, where files every rank writes
    together (distributed checkpoint shards) belong. Other paths are returned unchanged."""
    path = Path(path)
    parts = path.parts
    for i, part in enumerate(parts):
        if part.startswith(".rank") and part[5:].isdigit():
            return Path(*parts[:i], *parts[i + 1:])
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp file name next to `path` for writers that take a name (torch.save, parquet,
    safetensors): moved onto `path` when the block ends, removed if it raises. The temp name
    (`.<name>.tmp<pid>`) is one `remove_partials` recognises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`; an existing `dst` is replaced, never
    half-written (it is set aside as `.<name>.old` until `src` is in place)."""
    src, dst = Path(src), Path(dst)
    old = dst.parent / f".{dst.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


class DiskSpaceError(OSError):
    """Not enough free space for a write; says how much is needed and where."""


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise DiskSpaceError unless `folder`'s file system has `needed_bytes` free (plus 5%).
    Checked before large writes, so a full disk fails before the write, not half-way."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.05:
        raise DiskSpaceError(
            f"{folder}: not enough free disk space for {what}: needs "
            f"{_size(needed_bytes * 1.05)}, {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
