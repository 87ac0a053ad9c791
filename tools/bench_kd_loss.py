"""Peak memory and value of the token-chunked KD loss against the naive full-vocabulary loss.

    python tools/bench_kd_loss.py --vocab 128000 [--tokens 512] [--chunk 32] [--kind forward_kl]

Both variants take the same bf16 student / teacher logits [tokens, vocab] and run forward and
backward (gradient into the bf16 student logits), as a training step does. Each variant runs in
its own fresh subprocess; its peak is the growth of the process's peak resident set size
(`resource.getrusage(...).ru_maxrss`, Linux, KiB) from just after the inputs are allocated to
after backward: the loss's own temporaries and the gradient, not the inputs or the torch import.
RSS counts every allocation the process makes, so it is an upper bound on what the loss itself
allocated. Both children run with glibc's `MALLOC_MMAP_THRESHOLD_=1048576`: with the default
*dynamic* threshold, freed blocks of up to 32 MiB stay in the heap and the RSS peak of a loop of
equal-size chunks depends on fragmentation luck (measured 195 / 480 / 824 / 449 MiB for chunks of
8 / 32 / 64 / 128 tokens), which measures glibc, not the loss. A fixed threshold sends every
large block to mmap/munmap, the same for both variants.
max_rel_diff compares the per-token divergences of the two variants.

Last line: naive_peak_mib=<a> ours_peak_mib=<b> ratio=<b/a> max_rel_diff=<d>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(args) -> None:
    import resource

    import torch

    from distillscale.distill.losses import chunked_divergence, token_divergence

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    # Generated directly in bf16 so no fp32 staging copy inflates the baseline peak.
    student = torch.empty(args.tokens, args.vocab, dtype=torch.bfloat16)
    teacher = torch.empty(args.tokens, args.vocab, dtype=torch.bfloat16)
    for t in (student, teacher):
        for i in range(0, args.tokens, 16):
            t[i : i + 16] = (torch.randn(min(16, args.tokens - i), args.vocab, generator=g) * 4)
    student.requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.variant == "naive":
        per_token = token_divergence(student, teacher, args.kind, args.temperature)
    else:
        per_token = chunked_divergence(student, teacher, args.kind, args.temperature, args.chunk)
    per_token.mean().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"per_token": per_token.detach(), "grad_finite": bool(torch.isfinite(
        student.grad.float()).all())}, args.out)
    print(json.dumps({"peak_mib": (after - before) / 1024}))


def _run(variant: str, args, out: Path) -> float:
    cmd = [sys.executable, __file__, "--child", variant, "--out", str(out),
           "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--chunk", str(args.chunk),
           "--kind", args.kind, "--temperature", str(args.temperature)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        sys.exit(f"{variant} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--tokens", type=int, default=512, help="batch x sequence positions")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per chunk (ours)")
    ap.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.variant = args.child
        _child(args)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        peaks, outs = {}, {}
        for variant in ("naive", "ours"):
            outs[variant] = Path(tmp) / f"{variant}.pt"
            peaks[variant] = _run(variant, args, outs[variant])
        a = torch.load(outs["naive"])
        b = torch.load(outs["ours"])
    if not (a["grad_finite"] and b["grad_finite"]):
        sys.exit("non-finite gradient")
    x, y = a["per_token"].double(), b["per_token"].double()
    rel = ((x - y).abs() / x.abs().clamp_min(1e-12)).max().item()
    print(f"tokens={args.tokens} vocab={args.vocab} kind={args.kind} T={args.temperature} "
          f"chunk={args.chunk} loss naive={x.mean().item():.6f} ours={y.mean().item():.6f} "
          "(peak = growth of ru_maxrss over forward+backward, one subprocess per variant)")
    na, ou = peaks["naive"], peaks["ours"]
    print(f"naive_peak_mib={na:.1f} ours_peak_mib={ou:.1f} ratio={ou / na:.4f} "
          f"max_rel_diff={rel:.3g}")


if __name__ == "__main__":
    main()
