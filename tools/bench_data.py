"""Benchmark of the data recipe at the released dataset's scale (500,000 headlines).

    python tools/bench_data.py --rows 500000

Runs the whole `designer` recipe (Data Designer rounds, Curator cleaning and filters on Ray,
global exact / near / semantic dedup, splits, rejects, dataset card) into `--out`, sampling
the resident memory of the whole process tree (Ray workers included) as summed PSS
(proportional-set resident memory: shared pages split among their sharers, so Ray's object
store and shared libraries are not counted once per process). As a baseline measured
in the same run, it times the minimal `templates` generator (generation only, no curation) and
prints the recipe's cost relative to it. Last line:

    rows=<n> seconds=<s> rows_per_s=<r> peak_rss_gib=<m>

where `peak_rss_gib` is the peak summed PSS (the field keeps its name).

Goal on 2 CPU cores: <= 15 minutes and <= 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakPss:
    """Peak of the summed PSS of this process and all its descendants, sampled in a thread.

    PSS (proportional set size, `/proc/<pid>/smaps_rollup` via psutil's `memory_full_info`)
    charges each shared page to its N sharers 1/N each, so summing it over the driver and
    the Ray workers counts Ray's shared object store and the shared libraries once; summed
    RSS would count them once per process.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.peak = 0
        self.peak_rss_sum = 0  # the double-counting figure, printed for comparison
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> tuple[int, int]:
        """(summed PSS, summed RSS) of this process tree now, in bytes."""
        me = psutil.Process()
        pss = rss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            pss += info.pss
            rss += info.rss
        return pss, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss = self.sample()
            self.peak = max(self.peak, pss)
            self.peak_rss_sum = max(self.peak_rss_sum, rss)
            self._stop.wait(self._every)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--domain", type=Path, required=True, help="the taxonomy file")
    ap.add_argument("--out", type=Path, default=None, help="default: a temp folder, removed")
    ap.add_argument("--embedding", choices=["minilm", "minilm_static"], default="minilm_static",
                    help="semantic-dedup embeddings (full MiniLM runs ~210 rows/s on 2 cores)")
    ap.add_argument("--clusters", type=int, default=500, help="k-means clusters (paper: 500)")
    ap.add_argument("--semantic-threshold", type=float, default=None,
                    help="cosine threshold (default: 0.9 for minilm; 0.97 for minilm_static, "
                         "whose mean-pooled word pieces put same-phrasing headlines about "
                         "different companies at 0.90-0.93)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from distillscale.compat.logs import quiet_known_noise
    from distillscale.config import DataConfig
    from distillscale.data.build import build_dataset
    from distillscale.data.generate import generate_headlines
    from distillscale.domain import load_taxonomy

    quiet_known_noise()  # what `distillscale data build` does first

    taxonomy = load_taxonomy(args.domain)
    base_rows = min(args.rows, 50_000)
    t0 = time.time()
    generate_headlines(taxonomy, base_rows, "natural", 20, args.seed)
    base_rate = base_rows / (time.time() - t0)

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_data-"))
    out.mkdir(parents=True, exist_ok=True)
    threshold = args.semantic_threshold or (0.97 if args.embedding == "minilm_static" else 0.9)
    data = DataConfig(generator="designer", num_examples=args.rows, embedding=args.embedding,
                      semantic_clusters=args.clusters, semantic_threshold=threshold)
    with PeakPss() as pss:
        t0 = time.time()
        metrics = build_dataset(out, taxonomy, data, seed=args.seed)
        seconds = time.time() - t0
    rows = metrics["rows_kept"]
    rate = rows / seconds
    print(json.dumps({k: metrics[k] for k in ("rows_in", "rows_kept", "rows_rejected",
                                               "split_sizes", "cumulative_dedup_rate")}))
    for r in metrics["rounds"]:
        print(f"round {r['round']}: generated {r['generated']} kept {r['kept']} "
              f"({r['seconds']} s)")
    print(f"baseline templates generator (no curation): {base_rate:,.0f} rows/s; "
          f"recipe: {rate:,.0f} rows/s; ratio recipe/baseline = {rate / base_rate:.3f}")
    print(f"peak summed PSS {pss.peak / 2**30:.2f} GiB (summed RSS, which counts shared "
          f"pages once per process: {pss.peak_rss_sum / 2**30:.2f} GiB)")
    print(f"goal: <= 900 s and <= 8 GiB; cpus={os.cpu_count()} "
          f"load_avg_1m={os.getloadavg()[0]:.1f} embedding={args.embedding} "
          f"semantic_threshold={threshold}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(f"rows={rows} seconds={seconds:.1f} rows_per_s={rate:.1f} "
          f"peak_rss_gib={pss.peak / 2**30:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
