"""Peak memory and value of the memory-safe KD losses against the naive full-vocabulary loss.

    python tools/bench_kd_loss.py --vocab 128000 [--tokens 512] [--chunk 32] [--kind forward_kl]
    python tools/bench_kd_loss.py --vocab 128000 --fused [--tokens 1024] [--hidden 256] ...

Default (chunked): both variants take the same bf16 student / teacher logits [tokens, vocab] and
run forward and backward (gradient into the bf16 student logits), as a training step does.
`--fused`: both take last hidden states [tokens, hidden] and LM-head weights [vocab, hidden]
(student's and teacher's, `--dtype`); naive = hidden -> full logits -> `token_divergence`,
ours = `fused_kd.fused_head_divergence` (the head inside the loss, `--chunk` tokens at a time);
forward and backward with gradients into the student's hidden states and head weight.

Each variant runs in its own fresh subprocess; its peak is the growth of the process's peak
resident set size (`resource.getrusage(...).ru_maxrss`, Linux, KiB) from just after the inputs
are allocated to after backward: the loss's own temporaries and the gradients, not the inputs
or the torch import. RSS counts every allocation the process makes, so it is an upper bound on
what the loss itself allocated. Both children run with glibc's `MALLOC_MMAP_THRESHOLD_=1048576`:
with the default *dynamic* threshold, freed blocks of up to 32 MiB stay in the heap and the RSS
peak of a loop of equal-size chunks depends on fragmentation luck (measured 195 / 480 / 824 /
449 MiB for chunks of 8 / 32 / 64 / 128 tokens), which measures glibc, not the loss. A fixed
threshold sends every large block to mmap/munmap, the same for both variants.
max_rel_diff compares the per-token divergences of the two variants (elementwise relative); with
`--fused` also each gradient, as max |a - b| / max |a| over the tensor (elementwise relative
error is meaningless where a gradient entry is ~0), and is the largest of the three. Wall time
is the best of `--repeat` further forward + backward runs in the same process, after the one
the peak is measured on.

Last line: naive_peak_mib=<a> ours_peak_mib=<b> ratio=<b/a> max_rel_diff=<d>
           (with --fused, followed by naive_wall_s=<s> ours_wall_s=<s> wall_ratio=<ours/naive>)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _randn_into(t, generator, scale):
    # Filled in row blocks so no full-size fp32 staging copy inflates the baseline peak.
    import torch

    for i in range(0, t.shape[0], 16):
        t[i : i + 16] = torch.randn(min(16, t.shape[0] - i), t.shape[1], generator=generator) * scale


def _child(args) -> None:
    import resource

    import torch

    from distillscale.distill.losses import chunked_divergence, token_divergence

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    student = torch.empty(args.tokens, args.vocab, dtype=torch.bfloat16)
    teacher = torch.empty(args.tokens, args.vocab, dtype=torch.bfloat16)
    for t in (student, teacher):
        _randn_into(t, g, 4.0)
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


def _fused_child(args) -> None:
    import resource

    import torch

    from distillscale.distill.fused_kd import fused_head_divergence
    from distillscale.distill.losses import token_divergence

    dtype = getattr(torch, args.dtype)
    n, v = args.tokens, args.vocab
    g = torch.Generator().manual_seed(0)
    hs = torch.empty(n, args.hidden, dtype=dtype)
    ht = torch.empty(n, args.teacher_hidden, dtype=dtype)
    ws = torch.empty(v, args.hidden, dtype=dtype)
    wt = torch.empty(v, args.teacher_hidden, dtype=dtype)
    # Logits of std ~4 whatever the hidden size, like a trained head's.
    for t in (hs, ht):
        _randn_into(t, g, 1.0)
    _randn_into(ws, g, 4.0 / args.hidden**0.5)
    _randn_into(wt, g, 4.0 / args.teacher_hidden**0.5)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    weights = torch.full((n,), 1.0 / n)

    def step():
        if args.variant == "naive":
            per_token = token_divergence(hs @ ws.T, ht @ wt.T, args.kind, args.temperature)
            loss = per_token.mean()
        else:
            loss, per_token = fused_head_divergence(hs, ws, ht, wt, weights, args.kind,
                                                    args.temperature, args.chunk)
        loss.backward()
        return per_token.detach()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_token = step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"per_token": per_token, "grad_h": hs.grad.clone(), "grad_w": ws.grad.clone()}
    walls = []
    for _ in range(args.repeat):
        hs.grad = ws.grad = None
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    torch.save(out, args.out)
    print(json.dumps({"peak_mib": (after - before) / 1024, "wall_s": min(walls)}))


def _run(variant: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--out", str(out),
           "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--chunk", str(args.chunk),
           "--kind", args.kind, "--temperature", str(args.temperature),
           "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
           "--dtype", args.dtype, "--repeat", str(args.repeat)] + (["--fused"] if args.fused else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        sys.exit(f"{variant} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _grad_diff(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--tokens", type=int, default=None,
                    help="batch x sequence positions (default 512; 1024 with --fused)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="tokens per chunk (ours; default 32, 64 with --fused)")
    ap.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--fused", action="store_true",
                    help="hidden states + LM-head weights in, the head fused into the loss")
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size (--fused)")
    ap.add_argument("--teacher-hidden", type=int, default=384,
                    help="teacher hidden size (--fused)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="hidden states and head weights (--fused; the CPU path trains in fp32)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs after the measured one")
    ap.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 1024 if args.fused else 512
    if args.chunk is None:
        args.chunk = 64 if args.fused else 32
    if args.child:
        args.variant = args.child
        (_fused_child if args.fused else _child)(args)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        res, outs = {}, {}
        for variant in ("naive", "ours"):
            outs[variant] = Path(tmp) / f"{variant}.pt"
            res[variant] = _run(variant, args, outs[variant])
        a = torch.load(outs["naive"])
        b = torch.load(outs["ours"])
    x, y = a["per_token"].double(), b["per_token"].double()
    rel = ((x - y).abs() / x.abs().clamp_min(1e-12)).max().item()
    na, ou = res["naive"]["peak_mib"], res["ours"]["peak_mib"]
    if not args.fused:
        if not (a["grad_finite"] and b["grad_finite"]):
            sys.exit("non-finite gradient")
        print(f"tokens={args.tokens} vocab={args.vocab} kind={args.kind} T={args.temperature} "
              f"chunk={args.chunk} loss naive={x.mean().item():.6f} ours={y.mean().item():.6f} "
              "(peak = growth of ru_maxrss over forward+backward, one subprocess per variant)")
        print(f"naive_peak_mib={na:.1f} ours_peak_mib={ou:.1f} ratio={ou / na:.4f} "
              f"max_rel_diff={rel:.3g}")
        return
    for key in ("grad_h", "grad_w"):
        if not (torch.isfinite(a[key]).all() and torch.isfinite(b[key]).all()):
            sys.exit(f"non-finite {key}")
    dh, dw = _grad_diff(a["grad_h"], b["grad_h"]), _grad_diff(a["grad_w"], b["grad_w"])
    nw, ow = res["naive"]["wall_s"], res["ours"]["wall_s"]
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} "
          f"teacher_hidden={args.teacher_hidden} dtype={args.dtype} kind={args.kind} "
          f"T={args.temperature} chunk={args.chunk} threads={torch.get_num_threads()} "
          f"loss naive={x.mean().item():.6f} ours={y.mean().item():.6f}")
    print(f"value rel diff {rel:.3g}, grad hidden {dh:.3g}, grad head weight {dw:.3g} "
          "(peak = growth of ru_maxrss over forward+backward, one subprocess per variant; "
          f"wall = best of {args.repeat} forward+backward)")
    print(f"naive_peak_mib={na:.1f} ours_peak_mib={ou:.1f} ratio={ou / na:.4f} "
          f"max_rel_diff={max(rel, dh, dw):.3g} naive_wall_s={nw:.3f} ours_wall_s={ow:.3f} "
          f"wall_ratio={ow / nw:.3f}")


if __name__ == "__main__":
    main()
