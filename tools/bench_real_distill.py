"""The distill stage's two big costs on a real teacher, each against its baseline in one process:
training steps with the head over every position (`distill.loss.implementation: logits`)
against the head fused into the divergence on the supervised positions only (`fused_head`),
and the val answer log-probabilities with the full head against `logits_at` (the head at the
answer position only).

    python tools/bench_real_distill.py --run DIR [--config conf/experiments/smollm2_cpu.yaml]
        [--student width_0.37] [--step 1] [--steps 2] [--repeats 2] [--val-rows 64]

DIR holds a run's data, teacher and the student's pruned step (for instance the prune stage of
`conf/experiments/smollm2_cpu.yaml`, run with `output_dir=DIR`). The variants alternate
`--repeats` times, each training run from the same pruned weights with a fresh checkpoint, so
machine load falls on both. Per-step time excludes the first step of each training run (the
warm-up). The last line is

    logits_step_s=<a> fused_step_s=<b> train_speedup=<a/b> loss_max_rel_diff=<d>
    val_full_s=<c> val_at_answer_s=<e> val_speedup=<c/e> val_max_abs_diff=<f>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--config", type=Path, default=Path("conf/experiments/smollm2_cpu.yaml"))
    ap.add_argument("--student", default="width_0.37")
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="training steps per variant and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--val-rows", type=int, default=64)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step of each run is the warm-up)")

    from distillscale.compat import cpu
    from distillscale.config import load_config
    from distillscale.distill.logit_kd import aligned_vocab, distill
    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import forward_logits, logits_at
    from distillscale.runner import Context, Paths, setup_process
    from distillscale.stages.rows import encoder, load_split, train_rows

    cpu.activate()
    cfg = load_config(args.config, [f"output_dir={args.run}"])
    ctx = Context(cfg, Paths(cfg))
    setup_process(cfg)  # the process group and Megatron's model-parallel state, as a stage has
    pruned = args.run / "students" / args.student / f"step{args.step}" / "pruned"
    if not (pruned / "checkpoint").is_dir():
        raise SystemExit(f"{pruned}: no pruned checkpoint (run the prune stage first)")
    teacher, t_arch, vocab = load_model(ctx.paths.teacher)
    enc, tok = encoder(ctx, t_arch.seq_length)
    _, _, s_vocab = load_model(pruned)
    real_vocab = aligned_vocab(tok, pruned, vocab, s_vocab)
    rows = train_rows(ctx)
    times: dict[str, list[float]] = {"logits": [], "fused_head": []}
    first_loss: dict[str, float] = {}
    for rep in range(args.repeats):
        for impl in times:
            dcfg = cfg.distill.model_copy(deep=True)
            dcfg.loss.implementation = impl
            dcfg.train.steps = args.steps
            dcfg.train.log_every = 1
            model, _, _ = load_model(pruned)
            stamps: list[float] = []

            def tick(step: int, _stamps=stamps) -> dict:
                _stamps.append(time.perf_counter())
                return {}

            dcfg.train.eval_every = 1
            with tempfile.TemporaryDirectory() as tmp:
                _, history = distill(model, teacher, enc, rows, dcfg, cfg.seed,
                                     Path(tmp) / "last.pt", f"bench {impl} {rep + 1}",
                                     eval_fn=tick, real_vocab=real_vocab)
            times[impl] += [b - a for a, b in pairwise(stamps)]
            first_loss.setdefault(impl, float(history[0]["loss"]))
            print(f"{impl} repeat {rep + 1}: steps 2..{args.steps} "
                  f"{[round(b - a, 1) for a, b in pairwise(stamps)]} s", flush=True)
    step_s = {k: statistics.median(v) for k, v in times.items()}
    loss_diff = abs(first_loss["fused_head"] - first_loss["logits"]) / abs(first_loss["logits"])

    val = load_split(ctx.paths.data, "val")[: args.val_rows]
    b = enc.encode(val)
    torch.set_grad_enabled(False)
    teacher.eval()
    val_s: dict[str, list[float]] = {"full": [], "at_answer": []}
    outs = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs["full"] = forward_logits(teacher, b.tokens)[torch.arange(len(val)), b.answer_pos]
        val_s["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs["at_answer"] = logits_at(teacher, b.tokens, b.answer_pos)
        val_s["at_answer"].append(time.perf_counter() - t0)
    val_med = {k: statistics.median(v) for k, v in val_s.items()}
    val_diff = float((outs["full"] - outs["at_answer"]).abs().max())
    print(f"student={args.student} step={args.step} train_rows={len(rows)} "
          f"batch={cfg.distill.train.batch_size} seq={b.tokens.shape[1]} val_rows={len(val)}")
    print(f"logits_step_s={step_s['logits']:.2f} fused_step_s={step_s['fused_head']:.2f} "
          f"train_speedup={step_s['logits'] / step_s['fused_head']:.2f} "
          f"loss_max_rel_diff={loss_diff:.2e} val_full_s={val_med['full']:.2f} "
          f"val_at_answer_s={val_med['at_answer']:.2f} "
          f"val_speedup={val_med['full'] / val_med['at_answer']:.2f} val_max_abs_diff={val_diff:.2e}")


if __name__ == "__main__":
    main()
