"""Read a user's own headlines (CSV, JSONL or Parquet) into rows, keeping malformed lines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def read_table_rows(path: Path, text_column: str, label_column: str) -> list[dict]:
    """Rows as dicts with `text` and `label`; unreadable lines become `{"_error": ...}` rows."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open("rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise TypeError("not an object")
                except (UnicodeDecodeError, ValueError, TypeError) as e:
                    rows.append(
                        {
                            "_error": f"malformed line {n}: {e.__class__.__name__}",
                            "_raw": line.decode("utf-8", "replace").rstrip("\n"),
                        }
                    )
                    continue
                rows.append(_map(obj, text_column, label_column))
        return rows
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet)")
    for col in (text_column, label_column):
        if col not in df.columns:
            raise ValueError(f"{path}: column {col!r} not found (columns: {list(df.columns)})")
    return [_map(r, text_column, label_column) for r in df.to_dict(orient="records")]


def _map(obj: dict, text_column: str, label_column: str) -> dict:
    out = dict(obj)
    out["text"] = obj.get(text_column)
    out["label"] = obj.get(label_column)
    return out
