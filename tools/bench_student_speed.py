"""Real CPU inference speed of every exported student against its teacher.

    python tools/bench_student_speed.py --run runs/quickstart [--batch 32] [--seq N] [--repeats 25]
                                        [--all-logits]

Loads `<run>/teacher/hf` and every student's `distilled/hf` (intermediate schedule steps
included) with `transformers`, times a prefill over the same random token batch in one process
(`--repeats` rounds, models interleaved, after a warm-up; `torch.inference_mode`, the same thread
count for all), and prints one row per student: params, tokens/s (fastest round), speedup over
the teacher (median of the within-round ratios), and speedup divided by the parameter ratio
(teacher_params / student_params).

What is timed is what serving the task costs: a forward pass over prompts of the model's full
context (`--seq`, default the teacher's `max_position_embeddings`) that returns next-token logits
for the last position only (`logits_to_keep=1`, as `generate`'s prefill and label-constrained
scoring do). `--all-logits` times logits at every position instead (the training-side forward):
its batch x seq x vocab output write is the same size for every student, so it understates the
speedup of narrow students on small models.

A pruned student should be about as much faster as it is smaller: the last line is

    min_speedup_over_param_ratio=<x>

and the rows are also written to `<run>/speed.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _models(run: Path) -> list[tuple[str, Path]]:
    out = []
    for hf in sorted(run.glob("students/*/**/distilled/hf")) + sorted(
        run.glob("students/*/distilled/hf")
    ):
        if (hf / "config.json").is_file():
            name = str(hf.parent.parent.relative_to(run / "students"))
            out.append((name, hf))
    return sorted(set(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished run folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=None,
                    help="prompt length (default: the teacher's max_position_embeddings)")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--all-logits", action="store_true",
                    help="time logits at every position, not only the last")
    args = ap.parse_args()

    from distillscale.distill.speed import (
        load_hf_causal_lm,
        median_speedup,
        random_prompts,
        time_rounds,
    )

    teacher_dir = args.run / "teacher" / "hf"
    if not (teacher_dir / "config.json").is_file():
        sys.exit(f"{teacher_dir}: no HF teacher export; run the pipeline first")
    students = _models(args.run)
    if not students:
        sys.exit(f"{args.run}/students: no exported student (students/*/distilled/hf)")

    models = {"teacher": load_hf_causal_lm(teacher_dir)}
    for name, path in students:
        models[name] = load_hf_causal_lm(path)
    vocab = models["teacher"].config.vocab_size
    seq = args.seq or models["teacher"].config.max_position_embeddings
    tokens = random_prompts(vocab, args.batch, seq)
    n_tok = args.batch * seq
    times = time_rounds(models, tokens, args.repeats, keep=0 if args.all_logits else 1)
    secs = {name: min(ts) for name, ts in times.items()}  # tokens/s from the least disturbed round
    t_params = sum(p.numel() for p in models["teacher"].parameters())
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        speedup = median_speedup(times["teacher"], times[name])
        ratio = t_params / params
        rows.append({"model": name, "params": params, "tokens_per_s": n_tok / secs[name],
                     "speedup": speedup, "param_ratio": ratio,
                     "speedup_over_param_ratio": speedup / ratio})

    print(f"{'model':<24} {'params':>12} {'tokens/s':>12} {'speedup':>8} {'T/S params':>10} "
          f"{'speedup/ratio':>13}")
    for r in rows:
        print(f"{r['model']:<24} {r['params']:>12,} {r['tokens_per_s']:>12,.0f} "
              f"{r['speedup']:>8.2f} {r['param_ratio']:>10.2f} "
              f"{r['speedup_over_param_ratio']:>13.2f}")
    out = args.run / "speed.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"batch": args.batch, "seq": seq,
                               "logits": "all" if args.all_logits else "last", "threads":
                               torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    tmp.replace(out)
    worst = min(r["speedup_over_param_ratio"] for r in rows[1:])
    print(f"min_speedup_over_param_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
