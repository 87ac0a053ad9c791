"""Cleaning and heuristic filtering with a NeMo-Curator 1.4 `Pipeline` on `RayDataExecutor`.

Stages (each one a Curator stage; the pipeline is readable in `curation_stages`):

1. `Modify(UnicodeReformatter())` - ftfy unicode repair (mojibake, odd quotes, control chars);
2. `Score(WordCountFilter)` - headline length in words;
3. `Score(NonAlphaNumericFilter)` - share of symbols / spaces;
4. `Score(Cld2EnglishFilter)` - English by cld2 (fastText's lid model cannot be downloaded
   here; pycld2 ships with Curator's CPU text extra).

The stages *score* rather than drop, so the driver can record which filter rejected each row
(`rejects.jsonl` keeps every rejected row with its reason); the keep decision is the filter's
own `keep_document`. Ray's temp folder lives inside the run folder; Ray is started once per
build (`ray_session`, held by the recipe across its rounds) and shut down at its end, on error
too, so no worker or temp file outlives the stage. The default Xenna streaming executor
refuses 2-core machines; `RayDataExecutor` does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# Ray keeps unix sockets under its temp folder; their path must stay below ~107 bytes.
_RAY_TMP_MAX = 40


@dataclass
class FilterSettings:
    min_words: int = 4
    max_words: int = 40
    max_non_alnum_ratio: float = 0.35
    min_english_percent: int = 50
    language: str = "en"


def _english_filter_cls():
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.stages.text.filters.doc_filter import DocumentFilter

    class Cld2EnglishFilter(DocumentFilter):
        """Percent of the text pycld2 assigns to the expected language.

        Without a hint, cld2 calls many short English headlines "reliably" Danish or
        Indonesian (measured: names such as "Mizuho" or "Snyder-Lopez" tip it). With the
        expected language as a hint, those come back undetermined ('un') while real French,
        German, Spanish or Italian headlines are still identified. Undetermined scores -1 and
        is kept: a headline too short to identify is not evidence of another language.
        """

        def __init__(self, min_percent: int = 50, language: str = "en"):
            super().__init__()
            self._min = min_percent
            self._lang = language
            self._name = "cld2_language"

        def score_document(self, text: str) -> float:
            # optional: cld2 (with NeMo Curator), only when the language filter runs
            import pycld2

            try:
                _reliable, _bytes, details = pycld2.detect(text, hintLanguage=self._lang)
            except pycld2.error:
                return 0.0
            if details[0][1] == "un":
                return -1.0
            return float(sum(d[2] for d in details if d[1] == self._lang))

        def keep_document(self, score: float) -> bool:
            return score < 0 or score >= self._min

    return Cld2EnglishFilter


def curation_stages(settings: FilterSettings) -> tuple[list, dict]:
    """The Curator stages and, per score column, the filter that decides and its reason."""
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.stages.text.filters import Score
    from nemo_curator.stages.text.filters.heuristic.string import (
        NonAlphaNumericFilter,
        WordCountFilter,
    )
    from nemo_curator.stages.text.modifiers import Modify
    from nemo_curator.stages.text.modifiers.unicode import UnicodeReformatter

    words = WordCountFilter(min_words=settings.min_words, max_words=settings.max_words)
    alnum = NonAlphaNumericFilter(max_non_alpha_numeric_to_text_ratio=settings.max_non_alnum_ratio)
    english = _english_filter_cls()(min_percent=settings.min_english_percent,
                                    language=settings.language)
    stages = [
        Modify(UnicodeReformatter(), input_fields="text"),
        Score(words, text_field="text", score_field="word_count"),
        Score(alnum, text_field="text", score_field="non_alnum_ratio"),
        Score(english, text_field="text", score_field="english_percent"),
    ]
    deciders = {
        "word_count": (words, f"length outside {settings.min_words}-{settings.max_words} words"),
        "non_alnum_ratio": (alnum, f"non-alphanumeric share above {settings.max_non_alnum_ratio}"),
        "english_percent": (english, (
            "non-English (cld2)" if settings.language == "en"
            else f"language is not {settings.language} (cld2)"
        )),
    }
    return stages, deciders


@contextlib.contextmanager
def ray_session(run_dir: Path, num_cpus: int | None = None) -> Iterator[Path]:
    """Ray started with its temp folder inside the run folder (or a short one if that path is
    too long for Ray's sockets), shut down and cleaned on exit."""
    # optional: Ray (with NeMo Curator), only when the data recipe runs
    import ray

    run_dir = Path(run_dir).resolve()
    wanted = run_dir / "ray"
    if len(str(wanted)) <= _RAY_TMP_MAX:
        wanted.mkdir(parents=True, exist_ok=True)
        tmp = wanted
    else:
        tmp = Path(tempfile.mkdtemp(prefix="dsray-"))
    os.environ["RAY_TMPDIR"] = str(tmp)
    # Curator's executor calls ray.init again; with a running session that is a no-op.
    ray.init(
        _temp_dir=str(tmp), num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
        ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=False,
        configure_logging=True,
    )
    try:
        yield tmp
    finally:
        ray.shutdown()
        # Ray's log monitor can still be writing into the session folder for a moment
        # after shutdown; retry so no temp folder is left behind.
        for _ in range(5):
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                break
            time.sleep(1)


@contextlib.contextmanager
def _session_kept_open(ray) -> Iterator[None]:
    real = ray.shutdown
    ray.shutdown = lambda *a, **k: None
    try:
        yield
    finally:
        ray.shutdown = real


def run_curation(
    df: pd.DataFrame, settings: FilterSettings, run_dir: Path, *, batch_rows: int = 50_000
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clean and filter `df` (`id`, `text`, ...). Returns (kept, rejected with `reason`)."""
    # optional: NeMo Curator (the `data` extra), only when the data recipe runs
    from nemo_curator.backends.ray_data import RayDataExecutor
    from nemo_curator.pipeline import Pipeline
    from nemo_curator.tasks import DocumentBatch

    if df.empty:
        return df.assign(reason=pd.Series(dtype=str)), df.assign(reason=pd.Series(dtype=str))
    stages, deciders = curation_stages(settings)
    pipeline = Pipeline(name="headline_curation", stages=stages)
    tasks = [
        DocumentBatch(dataset_name="headlines",
                      data=df.iloc[i : i + batch_rows].reset_index(drop=True))
        for i in range(0, len(df), batch_rows)
    ]
    # optional: Ray (with NeMo Curator), only when the data recipe runs
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    if ray.is_initialized():
        # A caller that runs several curations (the recipe's rounds) holds one Ray session
        # for all of them. Curator 1.4's `RayDataExecutor.execute` ends every run with
        # `ray.shutdown()`, which would restart Ray (seconds, and a fresh set of workers)
        # each round; that shutdown is deferred to the end of the caller's session.
        with _session_kept_open(ray):
            results = pipeline.run(RayDataExecutor(), initial_tasks=tasks)
    else:
        with ray_session(run_dir, num_cpus=min(os.cpu_count() or 1, len(tasks) + 1)):
            results = pipeline.run(RayDataExecutor(), initial_tasks=tasks)
    out = pd.concat([t.to_pandas() for t in results or []], ignore_index=True)
    if len(out) != len(df):
        raise RuntimeError(f"curation returned {len(out)} rows for {len(df)} (rows lost)")
    out = out.set_index("id").loc[df["id"]].reset_index()
    reason = pd.Series([None] * len(out), index=out.index, dtype=object)
    for column, (flt, why) in deciders.items():
        failed = ~out[column].map(flt.keep_document).astype(bool)
        reason = reason.mask(reason.isna() & failed, why)
    out["reason"] = reason
    rejected = out[out["reason"].notna()]
    kept = out[out["reason"].isna()].drop(columns="reason")
    return kept.reset_index(drop=True), rejected.reset_index(drop=True)
