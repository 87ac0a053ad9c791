"""Real CPU inference speed of every exported student against its teacher.

    python tools/bench_student_speed.py --run runs/quickstart [--stage distilled|pruned]
        [--mode both|prefill|generate] [--batch 32] [--seq N] [--repeats 25]
        [--gen-prompt 64] [--new-tokens 32] [--gen-repeats 5] [--all-logits]
        [--cache dynamic|static] [--compile] [--students NAME ...]

Loads `<run>/teacher/hf` and every student's `<stage>/hf` (intermediate schedule steps included;
`pruned` and `distilled` exports of a student have the same shape, so the same speed) with
`transformers`, and times, in one process with the models interleaved round by round after a
warm-up (`torch.inference_mode`, the same thread count for all):

- **prefill**: a forward over the same random `--batch` x `--seq` token batch (default seq: the
  teacher's `max_position_embeddings`) that returns next-token logits for the last position only
  (`logits_to_keep=1`, as `generate`'s prefill and label-constrained scoring do);
  `--all-logits` times logits at every position instead (the training-side forward);
- **generate**: batch 1, greedy generation of exactly `--new-tokens` tokens with the KV cache
  after a `--gen-prompt`-token prompt (one user's request; decoding is memory-bound where
  prefill is compute-bound, so the two can differ); `--cache static` preallocates the KV
  cache, `--compile` runs every model's forward through `torch.compile` (inductor, static
  shapes; with the static cache), both for teacher and students alike.

Per mode and student: params, tokens/s (fastest round), speedup over the teacher (median of the
within-round ratios), and that speedup divided by the parameter ratio (teacher / student), by
all parameters and by non-embedding parameters (a tied embedding and the LM head are the same
size in every width-pruned student of a real model: 28M of SmolLM2-135M's parameters). A
pruned student should be about as much faster as it is smaller: the last line is

    prefill_min_speedup_over_param_ratio=<x> prefill_min_speedup_over_nonemb_ratio=<x> \
    generate_min_speedup_over_param_ratio=<x> generate_min_speedup_over_nonemb_ratio=<x>

(the modes run), and the rows are also written to `<run>/speed.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _models(run: Path, stage: str) -> list[tuple[str, Path]]:
    out = []
    for hf in sorted(run.glob(f"students/*/**/{stage}/hf")) + sorted(
        run.glob(f"students/*/{stage}/hf")
    ):
        if (hf / "config.json").is_file():
            name = str(hf.parent.parent.relative_to(run / "students"))
            out.append((name, hf))
    return sorted(set(out))


def _rows(models: dict, times: dict, n_tok: int) -> list[dict]:
    from distillscale.distill.speed import median_speedup, non_embedding_params

    secs = {name: min(ts) for name, ts in times.items()}  # tokens/s from the least disturbed round
    t_params = sum(p.numel() for p in models["teacher"].parameters())
    t_core = non_embedding_params(models["teacher"])
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        core = non_embedding_params(model)
        speedup = median_speedup(times["teacher"], times[name])
        rows.append({"model": name, "params": params, "non_embedding_params": core,
                     "tokens_per_s": n_tok / secs[name], "speedup": speedup,
                     "param_ratio": t_params / params,
                     "speedup_over_param_ratio": speedup / (t_params / params),
                     "speedup_over_nonemb_ratio": speedup / (t_core / core)})
    return rows


def _print(mode: str, rows: list[dict]) -> None:
    print(f"\n{mode}")
    print(f"{'model':<24} {'params':>12} {'tokens/s':>12} {'speedup':>8} {'T/S params':>10} "
          f"{'speedup/ratio':>13} {'.../non-emb':>11}")
    for r in rows:
        print(f"{r['model']:<24} {r['params']:>12,} {r['tokens_per_s']:>12,.1f} "
              f"{r['speedup']:>8.2f} {r['param_ratio']:>10.2f} "
              f"{r['speedup_over_param_ratio']:>13.2f} {r['speedup_over_nonemb_ratio']:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished run folder")
    ap.add_argument("--stage", choices=("distilled", "pruned"), default="distilled",
                    help="which export of each student (same shape, same speed)")
    ap.add_argument("--mode", choices=("both", "prefill", "generate"), default="both")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=None,
                    help="prefill prompt length (default: the teacher's max_position_embeddings)")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--all-logits", action="store_true",
                    help="prefill: time logits at every position, not only the last")
    ap.add_argument("--gen-prompt", type=int, default=64, help="generate: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="generate: tokens generated")
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="generate: transformers' KV cache implementation")
    ap.add_argument("--students", nargs="+", default=None,
                    help="only these students (names as in the table, e.g. width_0.37)")
    ap.add_argument("--compile", action="store_true",
                    help="generate: torch.compile every model's forward (needs --cache static)")
    args = ap.parse_args()

    if args.compile and args.cache != "static":
        sys.exit("--compile needs --cache static (fixed shapes)")
    from distillscale.distill.speed import (
        compile_for_decoding,
        load_hf_causal_lm,
        random_prompts,
        time_generation_rounds,
        time_rounds,
    )

    teacher_dir = args.run / "teacher" / "hf"
    if not (teacher_dir / "config.json").is_file():
        sys.exit(f"{teacher_dir}: no HF teacher export; run the pipeline first")
    students = _models(args.run, args.stage)
    if args.students is not None:
        unknown = sorted(set(args.students) - {n for n, _ in students})
        if unknown:
            sys.exit(f"--students: no {args.stage} export of {unknown} in {args.run}/students")
        students = [(n, p) for n, p in students if n in args.students]
    if not students:
        sys.exit(f"{args.run}/students: no exported student (students/*/{args.stage}/hf)")

    models = {"teacher": load_hf_causal_lm(teacher_dir)}
    for name, path in students:
        models[name] = load_hf_causal_lm(path)
    vocab = models["teacher"].config.vocab_size
    report = {"stage": args.stage, "threads": torch.get_num_threads()}
    last = []
    if args.mode in ("both", "prefill"):
        seq = args.seq or models["teacher"].config.max_position_embeddings
        times = time_rounds(models, random_prompts(vocab, args.batch, seq), args.repeats,
                            keep=0 if args.all_logits else 1)
        rows = _rows(models, times, args.batch * seq)
        _print(f"prefill: batch {args.batch} x {seq} tokens, "
               f"{'all' if args.all_logits else 'last'}-position logits", rows)
        report["prefill"] = {"batch": args.batch, "seq": seq,
                             "logits": "all" if args.all_logits else "last", "rows": rows}
        last += [f"prefill_min_speedup_over_{k}_ratio="
                 f"{min(r[f'speedup_over_{k}_ratio'] for r in rows[1:]):.3f}"
                 for k in ("param", "nonemb")]
    if args.mode in ("both", "generate"):
        prompt = random_prompts(vocab, 1, args.gen_prompt, seed=1)
        if args.compile:  # after prefill: the prefill rounds time the eager models
            models = {n: compile_for_decoding(m) for n, m in models.items()}
        times = time_generation_rounds(models, prompt, args.new_tokens, args.gen_repeats,
                                       cache=args.cache)
        rows = _rows(models, times, args.new_tokens)
        _print(f"generate: batch 1, {args.gen_prompt}-token prompt, {args.new_tokens} new "
               f"tokens, {args.cache} cache{', compiled' if args.compile else ''} "
               "(tokens/s counts generated tokens)", rows)
        report["generate"] = {"batch": 1, "prompt": args.gen_prompt,
                              "new_tokens": args.new_tokens, "cache": args.cache,
                              "compiled": args.compile, "rows": rows}
        last += [f"generate_min_speedup_over_{k}_ratio="
                 f"{min(r[f'speedup_over_{k}_ratio'] for r in rows[1:]):.3f}"
                 for k in ("param", "nonemb")]
    out = args.run / "speed.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(" ".join(last))


if __name__ == "__main__":
    main()
