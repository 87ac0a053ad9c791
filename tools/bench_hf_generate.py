"""Teacher supervision by transformers' generate on a real teacher: the HF backend with its
shared-prefix KV cache against the same backend generating every prompt in full, on the same
rows in one process.

    python tools/bench_hf_generate.py conf/experiments/smollm2_cpu.yaml [OVERRIDES ...] \
        [--rows 32] [--depth label]

Reads the experiment's run folder: its teacher (`<run>/teacher/hf`), its supervision family (the chat prompts the
supervision stage renders) and the first `--rows` train rows, and times one depth's requests
as the supervision stage makes them (`answer_at_depth`: the trace, then the answer), full
prompts first, then with the cache, then full again (the baseline is the mean of the two full
runs, so drifting machine load is shared). The last line is

    rows=<n> depth=<d> full_s=<x> cached_s=<y> speedup=<x/y> same_answers=<fraction>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="the experiment config of a run with a teacher")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (name=...)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--depth", default="label")
    ap.add_argument("--batch", type=int, default=None, help="default: the run's batch_size")
    args = ap.parse_args()

    from distillscale.config import load_config
    from distillscale.domain import load_taxonomy
    from distillscale.runner import Context, Paths
    from distillscale.stages.rows import load_split
    from distillscale.teacher.adapters import load_adapter
    from distillscale.teacher.backends.hf import HFBackend
    from distillscale.teacher.generate import GenerationSettings, answer_at_depth
    from distillscale.teacher.parse import LabelParser
    from distillscale.teacher.stage import supervision_family

    cfg = load_config(args.config, args.overrides)
    ctx = Context(cfg, Paths(cfg))
    tax = load_taxonomy(cfg.domain.taxonomy)
    sc = cfg.teacher.supervision
    adapter = load_adapter(supervision_family(cfg))
    backend = HFBackend(str(ctx.paths.teacher / "hf"), batch_size=args.batch or sc.batch_size)
    parser = LabelParser(tax)
    texts = [r["text"] for r in load_split(ctx.paths.data, "train")[: args.rows]]
    settings = GenerationSettings(depths=[args.depth], max_retries=0)

    def timed(use_cache: bool):
        backend.MIN_SHARED_PREFIX = HFBackend.MIN_SHARED_PREFIX if use_cache else 10**9
        t0 = time.perf_counter()
        res = answer_at_depth(backend, adapter, parser, tax, texts, args.depth, settings)
        return time.perf_counter() - t0, res

    full1, ref = timed(False)
    cached, res = timed(True)
    full2, _ = timed(False)
    full = (full1 + full2) / 2
    same = sum((a["answer"], a["trace"]) == (b["answer"], b["trace"])
               for a, b in zip(ref, res)) / len(ref)
    print(f"full runs {full1:.1f} s and {full2:.1f} s")
    print(f"rows={len(texts)} depth={args.depth} full_s={full:.1f} cached_s={cached:.1f} "
          f"speedup={full / cached:.2f} same_answers={same:.3f}")


if __name__ == "__main__":
    main()
