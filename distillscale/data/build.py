"""The `data` stage: make (or import) labelled headlines and split them.

Output folder: `train.jsonl`, `val.jsonl`, `test.jsonl` (`id`, `text`, `label`, `gold_label`),
`rejects.jsonl` (`row`, `reason`, `raw`) and `manifest.json` with `rows_in`, `rows_kept`,
`rows_rejected`. Every input row ends up either kept or rejected with a reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from distillscale.data.generate import generate_headlines
from distillscale.data.io import read_table_rows
from distillscale.domain import Taxonomy

SPLITS = ("train", "val", "test")


def row_id(text: str) -> str:
    return hashlib.sha1(text.strip().lower().encode()).hexdigest()[:12]


def validate_rows(
    raw_rows: list[dict], taxonomy: Taxonomy
) -> tuple[list[dict], list[dict]]:
    """Keep rows with a non-empty text and a known label; exact duplicates are rejected."""
    known = set(taxonomy.labels)
    alias = {a.lower(): c.name for c in taxonomy.classes for a in c.aliases}
    kept, rejects, seen = [], [], {}
    for i, raw in enumerate(raw_rows):
        if "_error" in raw:
            rejects.append({"row": i, "reason": raw["_error"], "raw": raw.get("_raw")})
            continue
        text = str(raw.get("text") or "").strip()
        label = str(raw.get("label") or "").strip()
        label = label if label in known else alias.get(label.lower(), label)
        if not text:
            rejects.append({"row": i, "reason": "empty text", "raw": raw})
            continue
        if label not in known:
            rejects.append({"row": i, "reason": f"unknown label {label!r}", "raw": raw})
            continue
        rid = row_id(text)
        if rid in seen:
            rejects.append({"row": i, "reason": f"duplicate of id {rid}", "raw": raw})
            continue
        seen[rid] = i
        kept.append(
            {"id": rid, "text": text, "label": label, "gold_label": raw.get("gold_label", label)}
        )
    return kept, rejects


def stratified_split(
    rows: list[dict], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """Deterministic stratified split; classes too small to stratify go to train."""
    labels = [r["label"] for r in rows]
    counts = Counter(labels)
    strat_ok = [i for i, r in enumerate(rows) if counts[r["label"]] >= 3]
    tiny = [i for i, r in enumerate(rows) if counts[r["label"]] < 3]
    idx = np.array(sorted(strat_ok, key=lambda i: rows[i]["id"]))
    y = [labels[i] for i in idx]
    rest, test = train_test_split(
        idx, test_size=test_fraction, stratify=y, random_state=seed
    )
    y_rest = [labels[i] for i in rest]
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest, random_state=seed
    )
    out = {
        "train": sorted(list(train) + tiny, key=lambda i: rows[i]["id"]),
        "val": sorted(val, key=lambda i: rows[i]["id"]),
        "test": sorted(test, key=lambda i: rows[i]["id"]),
    }
    return {k: [rows[i] for i in v] for k, v in out.items()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_dataset(
    out: Path,
    taxonomy: Taxonomy,
    *,
    generator: str,
    num_examples: int,
    target_distribution: str,
    min_per_class: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source_path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> dict:
    """Write the dataset into `out`; returns the manifest metrics."""
    if generator == "templates":
        raw = generate_headlines(
            taxonomy, num_examples, target_distribution, min_per_class, seed
        )
    else:
        raw = read_table_rows(Path(source_path), text_column, label_column)
    kept, rejects = validate_rows(raw, taxonomy)
    if len(kept) + len(rejects) != len(raw):
        raise RuntimeError(
            f"row accounting broken: in={len(raw)} kept={len(kept)} rejected={len(rejects)}"
        )
    if not kept:
        raise ValueError(f"{source_path or 'generator'}: no valid rows (see rejects.jsonl)")
    splits = stratified_split(kept, val_fraction, test_fraction, seed)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", splits[name])
    write_jsonl(out / "rejects.jsonl", rejects)
    hist = Counter(r["label"] for r in kept)
    return {
        "rows_in": len(raw),
        "rows_kept": len(kept),
        "rows_rejected": len(rejects),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "classes_present": len(hist),
        "label_histogram": dict(sorted(hist.items())),
    }
