"""The `data` stage: make (or import) labelled headlines and split them.

Output folder: `train.jsonl`, `val.jsonl`, `test.jsonl` (`id`, `text`, `label`, `gold_label`),
`rejects.jsonl` (`row`, `reason`, `raw`), `dataset_card.md` with its PNGs, and
`manifest.json` with `rows_in`, `rows_kept`, `rows_rejected`. Every input row ends up either
kept or rejected with a reason; the build fails if `rows_in != rows_kept + rows_rejected`.

Generators: `templates` (minimal, fast), `designer` (the data recipe, `recipe.py`), `file`
(a user's own CSV / JSONL / Parquet, `io.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from distillscale.compat.console import stderr_console
from distillscale.config import ConfigError, DataConfig
from distillscale.data.card import write_card
from distillscale.data.curate import _english_filter_cls
from distillscale.data.generate import generate_headlines
from distillscale.data.io import read_table_rows, row_id
from distillscale.data.recipe import DEDUP_STAGES, run_recipe
from distillscale.data.serve import llm_endpoint
from distillscale.domain import Taxonomy
from distillscale.manifest import atomic_path

console = stderr_console()

SPLITS = ("train", "val", "test")


# Longer than any headline: a bound keeps one pasted article (or a 10 MB line) out of the data
# set and its card.
MAX_TEXT_CHARS = 2000


def _kind(value) -> str:
    """What a non-string value is, in JSON's words, for a reject reason."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing (null)"
    if isinstance(value, (bool, np.bool_)):
        return f"a boolean ({str(bool(value)).lower()})"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"a number ({value})"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _absent(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _label_problem(name: str, value, known: set, match) -> tuple[str | None, str | None]:
    """(canonical label, None) or (None, reason); `match` maps a label as written (name or
    alias, any case) to its class (`Taxonomy.match_label`)."""
    if not isinstance(value, str):
        return None, f"{name} is {_kind(value)}, not a string"
    value = value.strip()
    value = match(value) or value
    if value not in known:
        return None, f"unknown {name} {value!r}"
    return value, None


def _user_id(value) -> tuple[str | None, str | None]:
    """A given id as a string, or a reason it is not usable."""
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value)), None
    what = _kind(value) if not isinstance(value, str) else "empty"
    return None, f"id is {what}, not a string or an integer"


def _text_problem(text: str) -> str | None:
    if not text:
        return "empty text"
    if "\ufffd" in text:
        # The reader replaces undecodable bytes: the original text is lost.
        return "invalid UTF-8 in text"
    if len(text) > MAX_TEXT_CHARS:
        return f"text longer than {MAX_TEXT_CHARS} characters ({len(text):,})"
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return "control characters in text"
    return None


def json_safe(value):
    """`value` as strict JSON can hold it: NaN / inf become null, numpy scalars and arrays
    become Python numbers and lists (a reject's raw row must stay readable JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, int)) or value is None:
        return value
    return str(value)


def _reject_entry(i: int, raw: dict, reason: str, shown) -> dict:
    """A rejects.jsonl record: input row, its line in the file when known, reason, raw value."""
    entry = {"row": i, "reason": reason, "raw": json_safe(
        {k: v for k, v in shown.items() if not str(k).startswith("_")}
        if isinstance(shown, dict) else shown)}
    if raw.get("_line") is not None:
        entry["line"] = raw["_line"]
    return entry


def validate_rows(
    raw_rows: list[dict], taxonomy: Taxonomy, language: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Keep rows whose text is a non-empty string of at most `MAX_TEXT_CHARS` and whose label
    (and `gold_label`, when given) is a known class; every other row is rejected with its
    reason. A given `id` (a string or an integer) is kept, and a second row with the same id
    is rejected; rows without one get the hash of their text. Exact duplicate texts are
    rejected.

    With `language`, rows that cld2 identifies as another language are rejected too (the
    Curator filter of the recipe, applied row by row: an import is not worth a Ray start).
    """
    language_ok = _language_check(language) if language else None
    known = set(taxonomy.labels)
    match = taxonomy.match_label
    kept, rejects = [], []
    by_text: dict[str, tuple[str, str]] = {}  # text hash -> (id, label) of the row kept with it
    by_id: dict[str, int] = {}  # id -> input row that holds it
    for i, raw in enumerate(raw_rows):
        def reject(reason: str, shown=None, i=i, raw=raw) -> None:
            rejects.append(_reject_entry(i, raw, reason, raw if shown is None else shown))

        if "_error" in raw:
            reject(raw["_error"], raw.get("_raw"))
            continue
        text = raw.get("text")
        if not isinstance(text, str):
            reject(f"text is {_kind(text)}, not a string")
            continue
        text = text.strip()
        problem = _text_problem(text)
        if problem:
            reject(problem)
            continue
        label, problem = _label_problem("label", raw.get("label"), known, match)
        if problem:
            reject(problem)
            continue
        gold = raw.get("gold_label")
        if _absent(gold):
            gold = label
        else:
            gold, problem = _label_problem("gold_label", gold, known, match)
            if problem:
                reject(problem)
                continue
        if language_ok is not None and not language_ok(text):
            reject(_language_reason(language))
            continue
        th = row_id(text)
        if th in by_text:
            first_id, first_label = by_text[th]
            reject(_duplicate_reason(first_id, label, first_label))
            continue
        rid = th
        if not _absent(raw.get("id")):
            rid, problem = _user_id(raw.get("id"))
            if problem:
                reject(problem)
                continue
        if rid in by_id:
            reject(f"id already used (id {rid}, first on row {by_id[rid]})")
            continue
        by_text[th], by_id[rid] = (rid, label), i
        kept.append({"id": rid, "text": text, "label": label, "gold_label": gold})
    return kept, rejects


def _duplicate_reason(rid: str, label: str, first_label: str) -> str:
    # The same text under two labels is a conflict in the data, not a harmless repeat.
    if first_label != label:
        return f"conflicting label (same text as id {rid}, labelled {first_label}; this row {label})"
    return f"duplicate of id {rid}"


def _language_check(language: str):
    flt = _english_filter_cls()(min_percent=50, language=language)
    return lambda text: flt.keep_document(flt.score_document(text))


def _language_reason(language: str) -> str:
    return "non-English (cld2)" if language == "en" else f"language is not {language} (cld2)"


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
    # scikit-learn's own message ("test_size = 9 should be greater or equal to the number of
    # classes = 16") names neither the data set nor the setting to change.
    k, n = len(set(y)), len(idx)
    n_test = math.ceil(test_fraction * n)
    n_val = math.ceil(val_fraction / (1 - test_fraction) * (n - n_test))
    if k and min(n_test, n_val, n - n_test - n_val) < k:
        raise ValueError(
            f"{len(rows)} rows are too few for a stratified split over {k} classes: the test "
            f"split (data.test_fraction={test_fraction}) would get {n_test} rows and the val "
            f"split (data.val_fraction={val_fraction}) {n_val}, and each needs at least one row "
            f"per class; make more rows (--rows / data.num_examples, data.min_per_class) or "
            f"raise the fractions")
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
    """One strict-JSON object per line (no bare NaN), written atomically."""
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_dataset(
    out: Path,
    taxonomy: Taxonomy,
    data: DataConfig,
    *,
    seed: int,
    text_column: str | None = None,
    label_column: str | None = None,
) -> dict:
    """Write the dataset, its rejects and its card into `out`; returns the manifest metrics."""
    out = Path(out)
    card_extra: dict = {}
    second_events = 0  # template rows that name a second event
    if taxonomy.for_import_only and data.generator != "file":
        raise ConfigError(f"taxonomy {taxonomy.name}: for_import_only, so it has no templates "
                          f"for data.generator={data.generator}; use data.generator=file "
                          "(or `data import`)")
    if data.generator == "designer":
        # `data.llm.endpoint: serve` starts the LLM server for the build and stops it after.
        with contextlib.ExitStack() as stack:
            endpoint = (stack.enter_context(llm_endpoint(data.llm, out / "work"))
                        if data.llm is not None else None)
            result = run_recipe(taxonomy, data, out / "work", seed, llm_endpoint=endpoint)
        # Data Designer's per-round artifacts are intermediate: the splits and rejects hold
        # every row, so they do not ship with the data set.
        shutil.rmtree(out / "work", ignore_errors=True)
        kept = result.kept.to_dict(orient="records")
        rejects = result.rejects
        rows_in = result.rows_in
        emb_index = {rid: i for i, rid in enumerate(result.kept["id"])}
        card_extra = {"rounds": result.rounds, "stages": DEDUP_STAGES, "embedder": result.embedder,
                      "dedup_backend": result.dedup_backend,
                      "cross_class": cross_class_summary(result.cross_class, result.kept,
                                                         data.cross_class_duplicates)}
        source = "designer"
    else:
        if data.generator == "templates":
            raw = generate_headlines(
                taxonomy, data.num_examples, data.target_distribution, data.min_per_class, seed,
                second_event_rate=data.second_event_rate,
            )
            source = "templates"
            second_events = sum("second_event" in r for r in raw)
        else:
            raw = read_table_rows(Path(data.source_path), text_column or data.text_column,
                                  label_column or data.label_column)
            source = str(data.source_path)
        kept, rejects = validate_rows(
            raw, taxonomy, language=data.language if data.generator == "file" else None
        )
        rows_in = len(raw)
    # The rejects are written whatever happens next: they are what explains a failed import.
    write_jsonl(out / "rejects.jsonl", rejects)
    if len(kept) + len(rejects) != rows_in:
        raise RuntimeError(
            f"row accounting broken: in={rows_in} kept={len(kept)} rejected={len(rejects)}"
        )
    if not kept:
        top = Counter(_reason_kind(r["reason"]) for r in rejects).most_common(3)
        why = "; ".join(f"{k}: {n}" for k, n in top) or "the input has no rows"
        raise ValueError(f"{source}: no valid rows of {rows_in} ({why}); every row with its "
                         f"reason: {out / 'rejects.jsonl'}")
    console.print(f"data: in={rows_in:,} = kept {len(kept):,} + rejected {len(rejects):,}")
    splits = stratified_split(kept, data.val_fraction, data.test_fraction, seed)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", splits[name])
    hist = Counter(r["label"] for r in kept)
    metrics = {
        "rows_in": rows_in,
        "rows_kept": len(kept),
        "rows_rejected": len(rejects),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "classes_present": len(hist),
        "label_histogram": dict(sorted(hist.items())),
        "generator": data.generator,
    }
    reasons = Counter(_reason_kind(r["reason"]) for r in rejects)
    metrics["reject_reasons"] = dict(reasons.most_common())
    if card_extra:
        metrics["rounds"] = card_extra["rounds"]
        metrics["dedup_backend"] = card_extra.get("dedup_backend")
        metrics["cross_class_near_pairs"] = {
            k: card_extra["cross_class"][k] for k in ("kept", "rejected")}
        gen = sum(r["generated"] for r in card_extra["rounds"])
        metrics["cumulative_dedup_rate"] = 1 - sum(r["kept"] for r in card_extra["rounds"]) / max(
            gen, 1)
        emb = result.embeddings
        if emb is not None:
            train_idx = [emb_index[r["id"]] for r in splits["train"]]
            card_extra["embeddings"] = emb[train_idx]
            card_extra["embedding_labels"] = [r["label"] for r in splits["train"]]
            # The card reads the train rows' copy; the whole corpus' matrix can go.
            result.embeddings = emb = None
    settings = {
        "generator": data.generator, "target_distribution": data.target_distribution,
        "seed": seed, "taxonomy": taxonomy.name,
    }
    if data.second_event_rate > 0:
        metrics["second_events"] = second_events
        settings["second_event_rate"] = (f"{data.second_event_rate:g} "
                                         f"({second_events:,} of {rows_in:,} rows)")
    if data.generator == "designer":
        settings.update({
            "synthesis": f"Data Designer, {'LLM ' + data.llm.model if data.llm else 'offline'}",
            "max_rounds": data.max_rounds, "near_dup_threshold": data.near_dup_threshold,
            "semantic_threshold": data.semantic_threshold if data.semantic_dedup else "off",
            "dedup_backend": card_extra["dedup_backend"],
        })
    metrics["card_figures"] = write_card(
        out, taxonomy, splits, metrics, reject_reasons=reasons, settings=settings,
        umap_points=data.card_umap_points, seed=seed,
        rounds=card_extra.get("rounds"), stages=card_extra.get("stages", ()),
        embeddings=card_extra.get("embeddings"),
        embedding_labels=card_extra.get("embedding_labels"), embedder=card_extra.get("embedder"),
        cross_class=card_extra.get("cross_class"),
    )
    return metrics


def cross_class_summary(pairs: list[dict], kept, policy: str, examples: int = 8) -> dict:
    """Counts and a few example pairs (both texts, both labels) for the dataset card."""
    text_of = dict(zip(kept["id"], kept["text"]))
    shown = []
    for p in pairs[:examples]:
        shown.append({**p, "text": p.get("text") or text_of.get(p["id"]),
                      "other_text": text_of.get(p["other_id"])})
    by = Counter((p["label"], p["other_label"]) for p in pairs)
    return {"policy": policy, "kept": sum(p["policy"] == "keep" for p in pairs),
            "rejected": sum(p["policy"] == "reject" for p in pairs),
            "by_stage": dict(Counter(p["stage"] for p in pairs)),
            "top_class_pairs": [[a, b, n] for (a, b), n in by.most_common(5)],
            "examples": shown}


def _reason_kind(reason: str) -> str:
    """A reason without its row-specific part (`duplicate of id X` -> `duplicate`)."""
    for cut in (" of id ", " line ", " ("):
        if cut in reason:
            return reason.split(cut)[0] + (" line" if cut == " line " else "")
    return reason
