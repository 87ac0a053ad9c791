"""Dataset loaders for the shipped lm-eval tasks: local copies, never the hub.

lm-eval resolves a task's relative `data_files` against the current directory, so a task
folder that points at files through `dataset_path: parquet` breaks as soon as lm-eval runs from
elsewhere. These `custom_dataset` loaders take absolute or caller-relative paths from the task
metadata instead (`TaskManager(metadata=...)` / `lm_eval --metadata '{...}'`), with environment
variables as a fallback:

    mmlu_path      / DISTILLSCALE_MMLU_PATH      cais/mmlu schema, test + dev splits
    mmlu_pro_path  / DISTILLSCALE_MMLU_PRO_PATH  TIGER-Lab/MMLU-Pro schema, test (+ validation)
    probe_path     / DISTILLSCALE_PROBE_PATH     the knowledge probe (synthetic; cais/mmlu schema)
    indomain_path  / DISTILLSCALE_INDOMAIN_PATH  a distillscale data folder (test.jsonl)
    taxonomy       / DISTILLSCALE_TAXONOMY       its taxonomy file (the class list)
    prompt_prefix  text before every prompt (e.g. "<bos> " for the tiny word-level models)

A directory may hold one Parquet (or JSONL) file per split (`test.parquet`, `dev.parquet`), or
the hub layout (`all/test-00000-of-00001.parquet`, `<split>/*.parquet`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distillscale.domain import load_taxonomy

MMLU_COLUMNS = ("question", "subject", "choices", "answer")
MMLU_PRO_COLUMNS = ("question", "options", "answer", "answer_index", "category")
LETTERS = "ABCDEFGHIJ"


class LocalBenchmarkError(ValueError):
    """A local benchmark copy that cannot be used, phrased as `<file>: <what is wrong>`."""


def _path(kwargs: dict, key: str, env: str) -> Path:
    value = kwargs.get(key) or os.environ.get(env)
    if not value:
        raise LocalBenchmarkError(
            f"no local copy configured: pass metadata {{'{key}': DIR}} or set {env}")
    path = Path(value).expanduser()
    if not path.exists():
        raise LocalBenchmarkError(f"{path}: {key} does not exist")
    return path


def split_files(root: Path, split: str) -> list[Path]:
    """Files of one split under `root` (flat, hub-style shards, or a split folder)."""
    if root.is_file():
        return [root] if split == "test" else []
    found: list[Path] = []
    for ext in ("parquet", "jsonl"):
        found += sorted(root.glob(f"{split}.{ext}"))
        found += sorted(root.glob(f"*/{split}-*.{ext}")) + sorted(root.glob(f"{split}-*.{ext}"))
        found += sorted(root.glob(f"{split}/*.{ext}"))
    return list(dict.fromkeys(found))


def _read(files: list[Path]):
    # heavy: pandas, only where a table is read or written
    import pandas as pd

    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f) if f.suffix == ".parquet"
                          else pd.read_json(f, lines=True))
        except Exception as e:  # noqa: BLE001 - any reader error becomes one line naming the file
            raise LocalBenchmarkError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
        frames[-1].attrs["file"] = str(f)
    return frames


def _check_columns(df, columns, source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LocalBenchmarkError(f"{source}: missing column(s) {missing}; expected {list(columns)}")


def validate_mmlu(df, source: str) -> None:
    _check_columns(df, MMLU_COLUMNS, source)
    for i, (choices, answer) in enumerate(zip(df["choices"], df["answer"])):
        if len(choices) != 4:
            raise LocalBenchmarkError(f"{source}: row {i}: choices has {len(choices)} entries, not 4")
        if not 0 <= int(answer) < 4:
            raise LocalBenchmarkError(f"{source}: row {i}: answer {answer} is not in 0..3")


def validate_mmlu_pro(df, source: str) -> None:
    _check_columns(df, MMLU_PRO_COLUMNS, source)
    for i, (opts, letter, idx) in enumerate(zip(df["options"], df["answer"], df["answer_index"])):
        if not 2 <= len(opts) <= 10:
            raise LocalBenchmarkError(f"{source}: row {i}: {len(opts)} options (need 2..10)")
        if not 0 <= int(idx) < len(opts) or LETTERS[int(idx)] != str(letter).strip().upper():
            raise LocalBenchmarkError(
                f"{source}: row {i}: answer {letter!r} does not match answer_index {idx}")


def _dataset(frames, validate, columns, prefix: str):
    # optional: HF datasets (with lm-eval) and pandas, only when a task's documents load
    import datasets
    import pandas as pd

    for f in frames:
        validate(f, f.attrs.get("file", "?"))
    if frames:
        df = pd.concat(frames, ignore_index=True)
    else:
        df = pd.DataFrame({c: [] for c in columns})
    df = df.assign(prefix=prefix)
    for c in ("choices", "options"):
        if c in df.columns:
            df[c] = df[c].map(lambda v: [str(x) for x in v])
    return datasets.Dataset.from_pandas(df, preserve_index=False)


def load_mmlu(**kwargs):
    """`cais/mmlu`-schema copy -> DatasetDict(test, dev)."""
    return _cais_schema(_path(kwargs, "mmlu_path", "DISTILLSCALE_MMLU_PATH"), kwargs)


def load_probe(**kwargs):
    """The knowledge probe the teacher stage writes (`cais/mmlu` schema, synthetic questions)
    -> DatasetDict(test, dev); its own task, so that it is never reported as MMLU."""
    return _cais_schema(_path(kwargs, "probe_path", "DISTILLSCALE_PROBE_PATH"), kwargs)


def _cais_schema(root: Path, kwargs: dict):
    # optional: HF datasets (with lm-eval), only when a task's documents are loaded
    import datasets

    test = _read(split_files(root, "test"))
    if not test:
        raise LocalBenchmarkError(f"{root}: no test split (test.parquet or */test-*.parquet)")
    prefix = kwargs.get("prompt_prefix", "")
    return datasets.DatasetDict({
        "test": _dataset(test, validate_mmlu, MMLU_COLUMNS, prefix),
        "dev": _dataset(_read(split_files(root, "dev")), validate_mmlu, MMLU_COLUMNS, prefix),
    })


def load_mmlu_pro(**kwargs):
    """`TIGER-Lab/MMLU-Pro`-schema copy -> DatasetDict(test, validation)."""
    # optional: HF datasets (with lm-eval), only when a task's documents are loaded
    import datasets

    root = _path(kwargs, "mmlu_pro_path", "DISTILLSCALE_MMLU_PRO_PATH")
    test = _read(split_files(root, "test"))
    if not test:
        raise LocalBenchmarkError(f"{root}: no test split (test.parquet or */test-*.parquet)")
    prefix = kwargs.get("prompt_prefix", "")
    return datasets.DatasetDict({
        "test": _dataset(test, validate_mmlu_pro, MMLU_PRO_COLUMNS, prefix),
        "validation": _dataset(_read(split_files(root, "validation")), validate_mmlu_pro,
                               MMLU_PRO_COLUMNS, prefix),
    })


def load_indomain(**kwargs):
    """A distillscale data folder's test split -> DatasetDict(test), each doc with its classes."""
    # optional: HF datasets (with lm-eval), only when a task's documents are loaded
    import datasets

    root = _path(kwargs, "indomain_path", "DISTILLSCALE_INDOMAIN_PATH")
    split = kwargs.get("split", "test")
    path = root / f"{split}.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise LocalBenchmarkError(f"{path}: no {split} split")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise LocalBenchmarkError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if "text" not in r or "label" not in r:
                raise LocalBenchmarkError(f"{path}:{n}: needs 'text' and 'label'")
            rows.append(r)
    tax = kwargs.get("taxonomy") or os.environ.get("DISTILLSCALE_TAXONOMY")
    if tax:
        classes = list(load_taxonomy(tax).labels)
    else:
        classes = sorted({r["label"] for r in rows})
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise LocalBenchmarkError(f"{path}: labels not in the taxonomy: {unknown[:5]}")
    prefix = kwargs.get("prompt_prefix", "")
    docs = [{"text": r["text"], "label": r["label"],
             "gold_label": r.get("gold_label", r["label"]),
             "label_index": classes.index(r["label"]), "classes": classes,
             "prompt": f"{prefix}headline : {r['text']} event :"} for r in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
