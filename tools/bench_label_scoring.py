"""Label-constrained scoring of multi-token class names on a real teacher: the packed scorer
(`class_scores_cached`) against brute force (a full transformers forward of prompt + name per
class), on the same rows in one process.

    python tools/bench_label_scoring.py --run runs/smollm2_cpu [--rows 8] [--split test]

Reads the run's teacher (`<run>/teacher/hf`, its tokenizer and the run's prompt format) and the
first `--rows` rows of `--split`. Brute force is what scoring costs without a KV cache or
packing: one forward per (row, class). The last line is

    brute_s_per_row=<x> packed_s_per_row=<y> speedup=<x/y> max_abs_diff=<d> argmax_agree=<a>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a run folder with a teacher stage")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    from distillscale.compat import cpu
    from distillscale.config import load_config
    from distillscale.eval.indomain import class_scores_cached, hf_causal_lm
    from distillscale.runner import Context, Paths
    from distillscale.stages.rows import encoder, load_split

    cpu.activate()
    cfg = load_config(args.run / "config.yaml")
    ctx = Context(cfg, Paths(cfg))
    enc, _ = encoder(ctx, None)
    rows = load_split(ctx.paths.data, args.split)[: args.rows]
    hf = hf_causal_lm(ctx.paths.teacher / "hf")
    torch.set_grad_enabled(False)
    class_scores_cached(hf, enc, rows[:1], args.batch)  # warm-up
    t0 = time.perf_counter()
    packed = class_scores_cached(hf, enc, rows, args.batch)
    packed_s = (time.perf_counter() - t0) / len(rows)

    t0 = time.perf_counter()
    brute = torch.zeros_like(packed)
    for i, r in enumerate(rows):
        p = enc.prompt_ids(r["text"])
        for c, s in enumerate(enc.label_seqs):
            logits = hf(torch.tensor([p + s]), logits_to_keep=len(s) + 1).logits[0, :-1]
            lp = torch.log_softmax(logits.float(), -1)
            brute[i, c] = lp[torch.arange(len(s)), torch.tensor(s)].sum()
    brute_s = (time.perf_counter() - t0) / len(rows)
    diff = float((packed - brute).abs().max())
    agree = float((packed.argmax(-1) == brute.argmax(-1)).float().mean())
    print(f"rows={len(rows)} classes={len(enc.labels)} "
          f"prompt_tokens={sum(len(enc.prompt_ids(r['text'])) for r in rows) / len(rows):.0f} "
          f"name_tokens={sum(len(s) for s in enc.label_seqs)} threads={torch.get_num_threads()}")
    print(f"brute_s_per_row={brute_s:.3f} packed_s_per_row={packed_s:.3f} "
          f"speedup={brute_s / packed_s:.1f} max_abs_diff={diff:.2e} argmax_agree={agree:.3f}")


if __name__ == "__main__":
    main()
