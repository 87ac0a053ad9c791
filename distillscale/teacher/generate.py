"""Teacher supervision generation: labels and reasoning traces at each thinking depth.

For every row and depth the teacher is prompted through its family adapter (its own chat
template), thinks within the depth's token budget, answers, and the answer is parsed against
the taxonomy. Work is split into shards of rows; each finished shard is one JSONL file written
atomically, so a killed run resumes at the first missing shard with no example lost or
duplicated. Malformed answers are retried (sampling, bounded attempts), backend errors
(timeouts, dropped connections) too, with back-off; what still fails is kept with its reason.

Output row: the input row plus
    teacher: {depth: {label, answer, trace, trace_tokens, budget_cut, attempts, error}}
    traces:  {depth: trace}  for the thinking depths whose answer parsed (what
             `supervision.supervision_batch` reads)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillscale.compat.console import stderr_console
from distillscale.domain import Taxonomy
from distillscale.manifest import atomic_path, write_json_atomic
from distillscale.teacher.adapters import FamilyAdapter
from distillscale.teacher.parse import LabelParser

console = stderr_console()


@dataclass
class GenerationSettings:
    depths: list[str]
    shard_size: int = 256
    max_retries: int = 2
    retry_temperature: float = 0.7
    seed: int = 0
    backoff_s: float = 1.0
    # Extra identity of the run (teacher fingerprint, adapter) - a change restarts the shards.
    identity: dict = field(default_factory=dict)


def _retriable() -> tuple[type[BaseException], ...]:
    """Errors worth another try: timeouts and dropped connections (builtin or the openai
    client's); anything else is a bug and propagates."""
    kinds: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        # optional: the openai client, only for an OpenAI-compatible server
        import openai

        kinds += [openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                  openai.InternalServerError]
    except ImportError:  # pragma: no cover - openai comes with the data extra
        pass
    return tuple(kinds)


def _call_with_retries(fn, settings: GenerationSettings, what: str):
    """fn() with up to `max_retries` retries on backend errors; (result, None) or (None, reason)."""
    last = None
    for attempt in range(settings.max_retries + 1):
        try:
            return fn(), None
        except _retriable() as e:
            last = f"backend error after {attempt + 1} attempts ({what}): {type(e).__name__}: {e}"
            if attempt < settings.max_retries:
                time.sleep(settings.backoff_s * 2**attempt)
    return None, last


def answer_at_depth(backend, adapter: FamilyAdapter, parser: LabelParser, taxonomy: Taxonomy,
                    texts: list[str], depth: str, settings: GenerationSettings,
                    temperature: float = 0.0, seed: int = 0) -> list[dict]:
    """One attempt for every text at one depth: [{label, answer, trace, ..., error}]."""
    setting = adapter.depth(depth)
    prompts = [adapter.render(backend.tokenizer, t, depth, taxonomy.task, taxonomy.labels)
               for t in texts]
    results = [{"label": None, "answer": None, "trace": None, "trace_tokens": 0,
                "budget_cut": False, "error": None} for _ in texts]
    conts = prompts
    if setting.max_trace_tokens > 0:
        stop = [adapter.trace_end] if adapter.trace_end else []
        traces, err = _call_with_retries(
            lambda: backend.complete(prompts, setting.max_trace_tokens, stop, temperature, seed),
            settings, f"{depth} trace")
        if err:
            for r in results:
                r["error"] = err
            return results
        conts = []
        for r, p, c in zip(results, prompts, traces):
            text = c.text
            if adapter.trace_start and text.lstrip().startswith(adapter.trace_start):
                text = text.lstrip()[len(adapter.trace_start):]
            r["trace"] = text.strip()
            r["trace_tokens"] = (c.n_tokens if c.n_tokens >= 0 else
                                 len(backend.tokenizer.encode(text, add_special_tokens=False)))
            r["budget_cut"] = c.finish == "length"
            closer = adapter.budget_cut_text if r["budget_cut"] else (adapter.trace_end or "")
            conts.append(p + c.text + closer)
    answers, err = _call_with_retries(
        lambda: backend.complete(conts, adapter.max_answer_tokens, None, temperature, seed),
        settings, f"{depth} answer")
    for i, r in enumerate(results):
        if err:
            r["error"] = err
            continue
        text = answers[i].text.strip()
        if adapter.answer_prefix and text.lower().startswith(adapter.answer_prefix.lower()):
            text = text[len(adapter.answer_prefix):].strip()
        r["answer"] = text
        r["label"], r["error"] = parser(text)
    return results


def answer_with_retries(backend, adapter, parser, taxonomy, texts, depth,
                        settings: GenerationSettings) -> list[dict]:
    """Greedy first; rows whose answer does not parse are re-asked with sampling."""
    results = answer_at_depth(backend, adapter, parser, taxonomy, texts, depth, settings)
    for r in results:
        r["attempts"] = 1
    for attempt in range(1, settings.max_retries + 1):
        todo = [i for i, r in enumerate(results)
                if r["error"] and not r["error"].startswith("backend error")]
        if not todo:
            break
        again = answer_at_depth(backend, adapter, parser, taxonomy, [texts[i] for i in todo],
                                depth, settings, settings.retry_temperature,
                                settings.seed * 1000 + attempt)
        for i, r in zip(todo, again):
            r["attempts"] = attempt + 1
            if r["error"] is None or results[i]["error"] is not None:
                results[i] = r
    return results


def _plan_hash(rows: list[dict], settings: GenerationSettings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"depths": settings.depths, "shard_size": settings.shard_size,
                         "identity": settings.identity}, sort_keys=True).encode())
    for r in rows:
        h.update(f"{r['id']}\t{r['text']}\n".encode())
    return h.hexdigest()[:16]


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def generate_supervision(backend, adapter: FamilyAdapter, taxonomy: Taxonomy, rows: list[dict],
                         work_dir: Path, settings: GenerationSettings, desc: str) -> list[dict]:
    """Rows with teacher answers and traces, generated shard by shard under `work_dir`
    (resumable); returns them in input order."""
    work_dir = Path(work_dir)
    plan = {"hash": _plan_hash(rows, settings), "rows": len(rows)}
    plan_path = work_dir / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        shutil.rmtree(work_dir)  # other rows or settings: earlier shards do not apply
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)
    parser = LabelParser(taxonomy)
    n_shards = max(1, -(-len(rows) // settings.shard_size))
    done = [i for i in range(n_shards) if (work_dir / f"shard-{i:05d}.jsonl").is_file()]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task(desc, total=len(rows), rate="",
                                 completed=sum(len(rows[i * settings.shard_size:
                                                        (i + 1) * settings.shard_size])
                                               for i in done))
        t0, n_new = time.time(), 0
        for i in range(n_shards):
            path = work_dir / f"shard-{i:05d}.jsonl"
            if path.is_file():
                continue
            chunk = rows[i * settings.shard_size : (i + 1) * settings.shard_size]
            texts = [r["text"] for r in chunk]
            per_depth = {d: answer_with_retries(backend, adapter, parser, taxonomy, texts, d,
                                                settings) for d in settings.depths}
            out = []
            for j, row in enumerate(chunk):
                teacher = {d: per_depth[d][j] for d in settings.depths}
                traces = {d: t["trace"] for d, t in teacher.items()
                          if t["trace"] is not None and t["error"] is None}
                out.append({**row, "teacher": teacher, "traces": traces})
            _write_jsonl_atomic(path, out)
            n_new += len(chunk)
            progress.update(task, advance=len(chunk),
                            rate=f"{n_new / max(time.time() - t0, 1e-9):.1f} ex/s")
    merged: list[dict] = []
    for i in range(n_shards):
        with (work_dir / f"shard-{i:05d}.jsonl").open() as f:
            merged.extend(json.loads(line) for line in f)
    ids = [r["id"] for r in merged]
    if ids != [r["id"] for r in rows]:
        raise RuntimeError(f"{work_dir}: shards do not cover the rows exactly once")
    return merged


def supervision_stats(rows: list[dict], depths: list[str], labels: list[str]) -> dict:
    """Per depth: teacher accuracy and macro F1 against the dataset label, agreement with the
    gold label, rejections by reason, trace-length statistics (tokens) and budget cuts."""
    # heavy: scikit-learn (about a second to import), only where it fits or scores
    from sklearn.metrics import f1_score

    index = {n: i for i, n in enumerate(labels)}
    y = np.array([index[r["label"]] for r in rows])
    gold = np.array([index.get(r.get("gold_label", r["label"]), -1) for r in rows])
    out: dict = {}
    for d in depths:
        t = [r["teacher"][d] for r in rows]
        pred = np.array([index[x["label"]] if x["label"] else -1 for x in t])
        ok = pred >= 0
        reasons = Counter(x["error"].split(":")[0] for x in t if x["error"])
        lengths = np.array([x["trace_tokens"] for x in t if x["trace"] is not None])
        s = {
            "examples": len(t), "parsed": int(ok.sum()), "rejected": int((~ok).sum()),
            "rejected_by_reason": dict(reasons),
            "retried": int(sum(x.get("attempts", 1) > 1 for x in t)),
            "accuracy": float((pred == y).mean()) if len(t) else 0.0,
            # Unparsed answers count as wrong (a class of their own, outside the average).
            "macro_f1": float(f1_score(y, pred, labels=sorted(set(y)), average="macro",
                                       zero_division=0)) if len(t) else 0.0,
            "gold_agreement": float((pred == gold).mean()) if len(t) else 0.0,
        }
        if len(lengths):
            s["trace_tokens"] = {
                "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
                "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max()),
            }
            s["budget_cut_rate"] = float(np.mean([x["budget_cut"] for x in t]))
        out[d] = s
    return out
