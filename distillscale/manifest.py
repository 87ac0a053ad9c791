"""Stage outputs: one folder per stage, written atomically, with a `manifest.json`.

A manifest records the config hash of the sections the stage depends on, the hashes of its
inputs (their own manifests, so changes propagate down the pipeline), library versions, wall
time and metrics. A stage whose manifest matches is skipped on re-run (resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
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


def is_up_to_date(folder: Path, config_hash: str, inputs: dict[str, Path]) -> bool:
    man = read_manifest(folder)
    if man is None or man.get("config_hash") != config_hash:
        return False
    try:
        want = {k: input_hash(v) for k, v in inputs.items()}
    except FileNotFoundError:
        return False
    return man.get("inputs") == want


@dataclass
class StageOutput:
    """The temp folder a stage writes into; `metrics` end up in the manifest."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


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
    from distillscale.launch import ranks

    folder = Path(folder)
    hashes = {k: input_hash(v) for k, v in inputs.items()}
    tmp = folder.with_name(folder.name + ".tmp")
    writer = ranks.is_rank_zero()
    sync = collective and ranks.world_size() > 1
    out = StageOutput(tmp if writer else tmp / f".rank{ranks.rank()}")
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


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
