"""Read a user's own headlines (CSV, JSONL or Parquet) into rows, keeping malformed lines.

CSV and JSONL are read row by row: a line that does not parse (bad JSON, an unterminated quote,
a ragged row) becomes an `{"_error": ..., "_line": N}` row, which
the import rejects with that reason, and the other rows are kept. A byte-order mark is dropped.
The CSV delimiter is the one (of `, ; tab |`) that makes the header name the text and label
columns. Parquet is read whole (its pages are checksummed; a damaged file is one error).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

CSV_DELIMITERS = (",", ";", "\t", "|")


def row_id(text: str) -> str:
    """The id every row carries: the same headline (case and outer spaces aside) has one id,
    whichever generator or import produced it."""
    return hashlib.sha1(text.strip().lower().encode()).hexdigest()[:12]


def read_table_rows(path: Path, text_column: str, label_column: str) -> list[dict]:
    """Rows as dicts with `text` and `label` (values as read: only strings will be accepted as
    text); unreadable lines become `{"_error": ...}` rows."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "input file not found"
        raise FileNotFoundError(f"{path}: {what}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text_column, label_column)
    if suffix == ".csv":
        return _read_csv(path, text_column, label_column)
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as e:  # a damaged or foreign file
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        raise ValueError(f"{path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet)")
    for col in (text_column, label_column):
        if col not in df.columns:
            raise ValueError(f"{path}: column {col!r} not found (columns: {list(df.columns)})")
    return [_map(r, text_column, label_column) | {"_line": n}
            for n, r in enumerate(df.to_dict(orient="records"), start=1)]


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[dict]:
    rows = []
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if n == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise TypeError("not an object")
            except (UnicodeDecodeError, ValueError, TypeError) as e:
                rows.append({
                    "_error": f"malformed line {n}: {e.__class__.__name__}",
                    "_raw": line.decode("utf-8", "replace").rstrip("\r\n"),
                    "_line": n,
                })
                continue
            rows.append(_map(obj, text_column, label_column) | {"_line": n})
    return rows


def _read_csv(path: Path, text_column: str, label_column: str) -> list[dict]:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    # Line by line, so bytes that are not UTF-8 spoil only their own row: they become U+FFFD,
    # which the import rejects as "invalid UTF-8 in text".
    lines = [raw.decode("utf-8", "replace") for raw in data.splitlines(keepends=True)]
    head = next((i for i, line in enumerate(lines) if line.strip()), None)
    if head is None:
        raise ValueError(f"{path}: empty file (no header line)")
    if "\ufffd" in lines[head] or "\x00" in lines[head]:
        raise ValueError(f"{path}: line {head + 1}: the header is not UTF-8 text")
    delimiter, header = _find_delimiter(path, lines[head], head + 1, text_column, label_column)
    rows: list[dict] = []
    i = head + 1
    line_by_line = False  # after an unterminated quote: each line is its own record
    while i < len(lines):
        source = lines[i:i + 1] if line_by_line else lines[i:]
        reader = csv.reader(source, delimiter=delimiter, strict=True)
        consumed = 0
        try:
            for fields in reader:
                start, consumed = i + consumed, reader.line_num
                span = range(start, i + consumed)
                _csv_record(rows, fields, header, span, lines, text_column, label_column)
            i += max(consumed, 1) if line_by_line else len(source)
        except csv.Error as e:
            start = i + consumed
            rows.append({"_error": f"malformed CSV line {start + 1}: {e}",
                         "_raw": lines[start].rstrip("\r\n"), "_line": start + 1})
            # The reader ran on past the bad record (to the end of the file for an
            # unterminated quote): go on from the line after the one where it began.
            line_by_line = line_by_line or "end of data" in str(e)
            i = start + 1
    return rows


def _find_delimiter(path: Path, line: str, number: int, text_column: str,
                    label_column: str) -> tuple[str, list[str]]:
    for delimiter in CSV_DELIMITERS:
        try:
            header = [h.strip() for h in next(csv.reader([line], delimiter=delimiter))]
        except (csv.Error, StopIteration):
            continue
        if text_column in header and label_column in header:
            if len(set(header)) != len(header):
                dup = sorted({h for h in header if header.count(h) > 1})
                raise ValueError(f"{path}: line {number}: column names given twice: {dup}")
            return delimiter, header
    shown = line.rstrip("\r\n")[:200]
    raise ValueError(
        f"{path}: line {number}: the header names no columns {text_column!r} and "
        f"{label_column!r} with any delimiter of {' '.join(map(repr, CSV_DELIMITERS))} (header: "
        f"{shown!r}); name them with --text-column / --label-column")


def _csv_record(rows: list[dict], fields: list[str], header: list[str], span: range,
                lines: list[str], text_column: str, label_column: str) -> None:
    if not fields or (len(fields) == 1 and not fields[0].strip() and len(header) > 1):
        return  # a blank line
    first = span.start + 1
    raw = "".join(lines[span.start:span.stop]).rstrip("\r\n")
    if len(fields) != len(header):
        rows.append({"_error": f"ragged CSV line {first}: {len(fields)} fields, the header has "
                               f"{len(header)}", "_raw": raw, "_line": first})
        return
    rows.append(_map(dict(zip(header, fields)), text_column, label_column) | {"_line": first})


def _map(obj: dict, text_column: str, label_column: str) -> dict:
    out = dict(obj)
    out["text"] = obj.get(text_column)
    out["label"] = obj.get(label_column)
    return out
