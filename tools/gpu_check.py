"""The GPU path at small scale, in one process: build -> Minitron prune -> bf16 KD -> HF export.

    python tools/gpu_check.py [--size small|tiny] [--cpu] [--distill-steps N] [--out DIR]
    (normally through tools/gpu_check.sh, which installs the NVIDIA wheels first)

1. A Qwen3-shaped teacher (QK layernorm, GQA) is built from a `ModelArch` (no weights travel)
   with `distillscale.models.megatron_gpt.build_gpt` and trained briefly on a synthetic
   low-entropy token stream (a fixed random bigram chain), so it has something to teach and
   Minitron's activation scores mean something.
2. ModelOpt Minitron (`distillscale.prune.minitron.prune_minitron`) prunes its width on the
   device (hidden, FFN and attention heads), calibrated on that stream.
3. The student is distilled from the teacher through ModelOpt's Megatron distillation
   (`distillscale.distill.logit_kd.make_kd_model`: forward KL on the output layers) in bf16 on
   GPU (fp32 on CPU), with AdamW.
4. The student is exported with `distillscale.models.hf_io.save_hf` (Megatron-Bridge's weight
   mapping), loaded back with transformers, and its logits compared with Megatron's in fp32.

Layer spec: transformer-engine's when the real TE imports, else megatron-core's local spec (the
first line says which). The last line is the figures:

    tokens_per_s=<distill tokens/s> mfu=<model FLOPs utilisation> peak_mem_gib=<GiB>
    kd_loss_drop=<(first - last) / first of the KD loss> hf_logit_diff=<max |logit diff|>

tokens_per_s counts student training tokens per second over the distillation steps after the
first few (warm-up); mfu divides the model FLOPs of those steps (6 x student + 2 x teacher
matmul parameters per token, plus attention) by the device's dense bf16 peak (H100 / H200:
989 TFLOP/s; `GPU_CHECK_PEAK_TFLOPS` overrides; nan on CPU or an unknown device); peak_mem_gib
is `torch.cuda.max_memory_allocated` (on CPU the process's peak resident set); kd_loss_drop is
the relative fall of the mean KD loss from the first to the last tenth of the steps;
hf_logit_diff is over the full vocabulary of a held-out batch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    teacher: dict  # ModelArch fields
    target: dict  # Minitron export_config
    vocab: int
    batch: int
    teacher_steps: int
    distill_steps: int
    calib_batches: int


SIZES = {
    # ~0.9B teacher -> ~0.5B student, 16 x 1024 tokens per step: minutes on one H100 / H200.
    "small": Size(
        teacher={"num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 5632,
                 "num_attention_heads": 16, "num_query_groups": 8, "kv_channels": 128,
                 "seq_length": 1024, "rotary_base": 1e6, "norm_epsilon": 1e-6,
                 "qk_layernorm": True},
        target={"hidden_size": 1536, "ffn_hidden_size": 4096, "num_attention_heads": 8},
        vocab=32768, batch=16, teacher_steps=200, distill_steps=300, calib_batches=4),
    # The CPU proof of the script: seconds per stage on one core.
    "tiny": Size(
        teacher={"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 256,
                 "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
                 "seq_length": 64, "rotary_base": 1e6, "norm_epsilon": 1e-6,
                 "qk_layernorm": True},
        target={"hidden_size": 48, "ffn_hidden_size": 128, "num_attention_heads": 2},
        vocab=256, batch=8, teacher_steps=80, distill_steps=60, calib_batches=2),
}

# Dense bf16 peak (no sparsity), TFLOP/s, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0}


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", flush=True)


def bigram_stream(vocab: int, n_seq: int, seq: int, seed: int, device):
    """[n_seq, seq] token ids from a fixed random bigram chain (4 successors per token), so a
    model can learn it in a few hundred steps and its next-token distributions are peaked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    prob = torch.softmax(torch.randn(vocab, 4, generator=g) * 1.5, -1)
    out = torch.empty(n_seq, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n_seq,), generator=g)
    for t in range(1, seq):
        pick = torch.multinomial(prob[out[:, t - 1]], 1, generator=g).squeeze(1)
        out[:, t] = succ[out[:, t - 1], pick]
    return out.to(device)


def matmul_params(arch, vocab: int) -> int:
    """Parameters that take part in a matmul per token (the input embedding is a lookup)."""
    from distillscale.models.megatron_gpt import arch_params

    return arch_params(arch, vocab) - vocab * arch.hidden_size * (0 if arch.tie_word_embeddings
                                                                   else 1)


def attention_flops_per_token(arch, seq: int) -> int:
    """Forward QK^T and AV per token (unmasked, as the unfused local spec computes them)."""
    return 4 * arch.num_layers * seq * arch.num_attention_heads * arch.head_dim


def peak_tflops(device) -> float:
    import torch

    if os.environ.get("GPU_CHECK_PEAK_TFLOPS"):
        return float(os.environ["GPU_CHECK_PEAK_TFLOPS"])
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), math.nan)


def peak_mem_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), help="default: small on GPU, tiny on CPU")
    ap.add_argument("--cpu", action="store_true",
                    help="run on CPU even where CUDA exists (also GPU_CHECK_CPU=1)")
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--distill-steps", type=int)
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S",
                                                                           "300")),
                    help="stop distilling after this many seconds (the figures use the steps "
                         "done)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cpu or os.environ.get("GPU_CHECK_CPU") == "1":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NEMO_TELEMETRY_ENABLED", "false")

    import torch

    from distillscale.compat.cpu import cuda_available
    from distillscale.config import DistillConfig, LossConfig, ModelArch
    from distillscale.distill.logit_kd import make_kd_model, unwrap_student
    from distillscale.models.hf_io import save_hf
    from distillscale.models.megatron_gpt import (
        build_gpt,
        count_params,
        forward_logits,
        init_distributed,
        spec_name,
    )
    from distillscale.prune.minitron import prune_minitron

    on_gpu = cuda_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu \
        else torch.device("cpu")
    size = SIZES[args.size or ("small" if on_gpu else "tiny")]
    teacher_steps = args.teacher_steps if args.teacher_steps is not None else size.teacher_steps
    distill_steps = args.distill_steps if args.distill_steps is not None else size.distill_steps
    if distill_steps < 10:
        raise SystemExit("gpu_check: --distill-steps must be at least 10 (first and last tenth)")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    init_distributed(1, 1, seed=args.seed + 1)
    spec = spec_name()
    dtype = "bf16" if on_gpu else "fp32"
    log(f"device={device} ({torch.cuda.get_device_name(device) if on_gpu else 'cpu'}) "
        f"torch={torch.__version__} spec={spec} "
        f"({'transformer-engine' if spec == 'te' else 'megatron-core local spec: transformer-engine absent'}) "
        f"dtype={dtype}")
    import megatron.core
    import modelopt

    log(f"megatron-core={megatron.core.__version__} modelopt={modelopt.__version__}")

    arch = ModelArch(**size.teacher)
    seq, vocab, b = arch.seq_length, size.vocab, size.batch
    n_train = b * 16
    data = bigram_stream(vocab, n_train + b, seq, args.seed, device)
    train, held_out = data[:n_train], data[n_train:]

    def batch(step: int):
        i = (step * b) % n_train
        return train[i:i + b]

    # 1. Teacher: built from the config, trained on the chain (CE).
    teacher = build_gpt(arch, vocab)
    log(f"teacher: {count_params(teacher) / 1e6:.1f}M params, {arch.num_layers} layers, "
        f"hidden {arch.hidden_size}, heads {arch.num_attention_heads}/{arch.num_query_groups}")
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(teacher_steps):
        tokens = batch(step)
        logits = forward_logits(teacher, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 or step == teacher_steps - 1:
            log(f"teacher step {step + 1}/{teacher_steps}: CE {loss.item():.3f}")
    del opt
    sync(device)
    log(f"teacher trained in {time.perf_counter() - t0:.1f} s")

    # 2. Minitron width pruning on the device, calibrated on the chain.
    teacher.eval()

    def forward_loop(model):
        with torch.no_grad():
            for k in range(size.calib_batches):
                forward_logits(model, batch(k))

    t0 = time.perf_counter()
    info: dict = {}
    student, student_arch = prune_minitron(teacher, arch, size.target, forward_loop, info=info)
    sync(device)
    log(f"pruned to {size.target} in {time.perf_counter() - t0:.1f} s: "
        f"{count_params(student) / 1e6:.1f}M params")

    # 3. KD in bf16 through ModelOpt's Megatron distillation (teacher co-located, frozen).
    dcfg = DistillConfig(loss=LossConfig(kind="forward_kl", temperature=1.0))
    kd = make_kd_model(student, teacher, dcfg)
    kd.train()
    params = [p for p in kd.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    mask = None
    kd_losses: list[float] = []
    warm = max(2, distill_steps // 10)
    timed_tokens, timed_s = 0, 0.0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(b, seq)
    from distillscale.models.megatron_gpt import causal_mask

    mask = causal_mask(seq, device)
    t_loop = time.perf_counter()
    steps_done = 0
    for step in range(distill_steps):
        sync(device)
        t_step = time.perf_counter()
        kd(batch(step), pos, mask)  # student logits; the teacher runs inside

        def reduce(loss_tuple):
            per_token = loss_tuple[0]  # ModelOpt's (loss [b, s], tp_reduce, sp)
            return per_token.float().mean()

        loss = sum(kd.compute_kd_loss(loss_reduction_fn=reduce, skip_balancer=True).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        kd_losses.append(loss.item())  # .item() synchronises
        steps_done = step + 1
        if step >= warm:
            timed_s += time.perf_counter() - t_step
            timed_tokens += b * seq
        if step == 0 or steps_done % max(1, distill_steps // 5) == 0:
            log(f"distill step {steps_done}/{distill_steps}: KD loss {kd_losses[-1]:.4f}")
        if time.perf_counter() - t_loop > args.budget_s and steps_done >= 2 * warm:
            log(f"distill stopped at step {steps_done}: --budget-s {args.budget_s:.0f} reached")
            break
    mem = peak_mem_gib(device)
    tenth = max(1, steps_done // 10)
    first, last = (sum(v) / len(v) for v in (kd_losses[:tenth], kd_losses[-tenth:]))
    kd_drop = (first - last) / first if first > 0 else math.nan
    tps = timed_tokens / timed_s if timed_s > 0 else math.nan
    flops_per_token = (6 * matmul_params(student_arch, vocab) + 2 * matmul_params(arch, vocab)
                       + 3 * attention_flops_per_token(student_arch, seq)
                       + attention_flops_per_token(arch, seq))
    mfu = tps * flops_per_token / (peak_tflops(device) * 1e12)
    log(f"distilled {steps_done} steps: KD loss {first:.4f} -> {last:.4f}, "
        f"{tps:.0f} tokens/s, {flops_per_token / 1e9:.2f} GFLOP/token")
    del opt
    student = unwrap_student(kd)
    student.eval()

    # 4. HF export and the logit comparison, both sides in fp32 (the export is what is checked,
    # not bf16 rounding).
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = save_hf(student, student_arch, vocab, out / "student_hf")
    import json

    family = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    from transformers import AutoModelForCausalLM

    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    student = student.float()
    with torch.no_grad():
        ours = forward_logits(student, held_out).float()
        theirs = hf(held_out).logits.float()
    diff = (ours - theirs).abs().max().item()
    log(f"exported {hf_dir} as {family}; max |logit| {theirs.abs().max().item():.2f}")
    log(f"wall {time.perf_counter() - start:.1f} s")
    print(f"tokens_per_s={tps:.1f} mfu={mfu:.4f} peak_mem_gib={mem:.3f} "
          f"kd_loss_drop={kd_drop:.4f} hf_logit_diff={diff:.3g}", flush=True)
    return 0 if family == "qwen3" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
