"""Benchmark the top-k teacher logit cache: bytes per token and KL error against full logits.

A small Llama teacher and a smaller student are built from config (transformers) and trained
briefly on the project's offline text (template headlines with their rationales, the general-
knowledge corpus), so the logits are a real model's, not random ones. On held-out `cot_long`
sequences, at the positions a distillation run reads from the cache (trace and answer), the
teacher's top-k cache is written to disk through the teacher stage's own code path
(`HFBackend.topk_logprobs` -> `build_cache`), read back, and KL(teacher || student) computed
from it is compared with the KL from the full logits. The baseline is storing the full logit
vector in bfloat16 (2 bytes x vocabulary per token), measured in the same run.

    python tools/bench_logit_cache.py [--k 64 ...] [--tail-samples 16] [--steps 300]
                                      [--teacher HF_DIR --student HF_DIR]
    python tools/bench_logit_cache.py --budget 60

Last line: `bytes_per_token=<b> kl_rel_error=<e>` for the first --k with --tail-samples draws;
with --budget, for the lowest-error setting of the sweep (encodings `fp16` and `quantized`,
k, tail draws, log-prob bits) within that many bytes per token, after the table of every
setting sorted by size with the frontier (no smaller setting has a lower error) starred.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def corpus(taxonomy: Path, seed: int, n: int) -> list[str]:
    from distillscale.data.generate import generate_headlines
    from distillscale.domain import load_taxonomy
    from distillscale.knowledge.general import build_facts, country_lookup, knowledge_corpus
    from distillscale.teacher.rationale import RationaleBuilder

    tax = load_taxonomy(taxonomy)
    rows = generate_headlines(tax, n, "natural", 5, seed)
    facts = build_facts(seed)
    rb = RationaleBuilder(tax, rows, country_lookup(facts))
    texts = [f"headline : {r['text']} <think_long> {rb.long(r)} </think> event : {r['label']}"
             for r in rows]
    return texts + knowledge_corpus(facts), tax.labels


def train_llama(tok, texts, hidden, layers, steps, seed, desc):
    from rich.progress import Progress
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    ids = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False)[:96] + [tok.eos_token_id]
           for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    with Progress(transient=True) as progress:
        task = progress.add_task(desc, total=steps)
        for _ in range(steps):
            batch = [ids[i] for i in rng.choice(len(ids), 32, replace=False)]
            w = max(map(len, batch))
            x = torch.tensor([b + [tok.pad_token_id] * (w - len(b)) for b in batch])
            labels = x.masked_fill(x == tok.pad_token_id, -100)
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress.advance(task)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domain", type=Path, required=True,
                    help="the taxonomy whose generated rows train the bench teacher")
    ap.add_argument("--k", type=int, nargs="+", default=[64, 16, 128])
    ap.add_argument("--tail-samples", type=int, default=16,
                    help="tokens drawn from the teacher's tail (0: merged tail bucket only)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-sequences", type=int, default=200)
    ap.add_argument("--teacher", type=Path, help="HF checkpoint folder (default: train one)")
    ap.add_argument("--student", type=Path, help="HF checkpoint folder of a student")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float,
                    help="bytes per token: sweep encodings, k, tail draws and log-prob bits, "
                         "print the frontier and, last, the lowest-error setting within it")
    ap.add_argument("--shard-size", type=int, default=64,
                    help="rows per shard (each adds its header's bytes)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillscale.teacher.backends.hf import HFBackend
    from distillscale.teacher.logit_cache import LogitCache, build_cache, kl_full, kl_topk
    from distillscale.tokenizer import build_word_tokenizer

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-logit-cache-"))
    if args.teacher:
        tok = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
        student = AutoModelForCausalLM.from_pretrained(args.student or args.teacher).eval()
        texts, _ = corpus(args.domain, args.seed + 1, args.eval_sequences)
        held_out = texts[: args.eval_sequences]
        teacher_dir = args.teacher
    else:
        texts, labels = corpus(args.domain, args.seed, 1500)
        held, _ = corpus(args.domain, args.seed + 1, args.eval_sequences)
        tok = build_word_tokenizer(texts + held, labels)
        teacher = train_llama(tok, texts, 128, 2, args.steps, args.seed, "train teacher")
        student = train_llama(tok, texts, 64, 1, args.steps // 2, args.seed + 1, "train student")
        teacher_dir = work / "teacher"
        teacher.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        held_out = held[: args.eval_sequences]
    seqs = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False)[:96] for t in held_out]
    # The KD positions: from the one predicting the first trace token to the one predicting
    # the answer (knowledge sentences have no trace and are not distillation targets here).
    think = tok.convert_tokens_to_ids("<think_long>")
    keep = [i for i, s in enumerate(seqs) if think in s]
    seqs = [seqs[i] for i in keep]
    spans = [(s.index(think), len(s) - 1 - s.index(think)) for s in seqs]
    backend = HFBackend(str(teacher_dir), batch_size=64)
    vocab = backend.vocab_size

    # Full-logit reference KL, per token.
    full_kl, s_logps = [], []
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            a = s.index(think)
            t_lp = F.log_softmax(teacher(input_ids=x).logits[0, a:-1].float(), -1)
            s_lp = F.log_softmax(student(input_ids=x).logits[0, a:-1].float(), -1)
            full_kl.append(kl_full(t_lp, s_lp))
            s_logps.append(s_lp)
    full = float(torch.cat(full_kl).sum())
    tokens = sum(n for _, n in spans)
    baseline_bpt = 2 * vocab  # full logits in bfloat16
    print(f"teacher vocab {vocab}, {len(seqs)} held-out sequences, {tokens} tokens, "
          f"full-logit KL(teacher||student) {full / tokens:.4f} nats/token")
    def measure(k, m, encoding, bits):
        name = f"k{k}-m{m}-{encoding}{bits if encoding != 'fp16' else ''}"
        cache = LogitCache(work / "cache", name)
        build_cache(backend, seqs, spans, [str(i) for i in range(len(seqs))], k, cache,
                    shard_size=args.shard_size, tail_samples=m, seed=args.seed,
                    encoding=encoding, logprob_bits=bits)
        rows = cache.load()
        approx = 0.0
        for i, s_lp in enumerate(s_logps):
            r = rows[str(i)]
            sampled = {}
            if r.tail_ids is not None:
                sampled = {"tail_ids": torch.from_numpy(r.tail_ids),
                           "tail_logprobs": torch.from_numpy(r.tail_sample_logprobs)}
            approx += float(kl_topk(torch.from_numpy(r.ids), torch.from_numpy(r.logprobs),
                                    torch.from_numpy(r.tail_logprob), s_lp, **sampled).sum())
        tail_mass = float(np.mean([np.exp(r.tail_logprob).mean() for r in rows.values()]))
        bpt = cache.index()["bytes_per_token"]
        shutil.rmtree(cache.path, ignore_errors=True)
        return {"k": k, "m": m, "encoding": encoding, "bits": bits if encoding != "fp16" else 16,
                "bpt": bpt, "tail": tail_mass, "kl": approx / tokens,
                "err": abs(approx - full) / full}

    if args.budget is None:
        settings = [(k, m, "fp16", 16) for k in args.k
                    for m in dict.fromkeys([args.tail_samples, 0])]
    else:  # the frontier: today's fp16 encoding and the quantized one over k, draws, bits
        settings = [(k, m, "fp16", 16) for k in (16, 64) for m in (0, 16)]
        settings += [(k, m, "quantized", b) for k in (4, 8, 16, 32) for m in (0, 2, 4, 8)
                     for b in (3, 4, 5, 6, 8)]
    results = []
    for st in settings:
        results.append(measure(*st))
    results.sort(key=lambda r: r["bpt"])
    best_err = float("inf")
    print(f"{'encoding':>9} {'k':>4} {'tail draws':>10} {'lp bits':>7} {'bytes/token':>12} "
          f"{'vs bf16 full':>13} {'tail mass':>10} {'KL cache':>10} {'rel error':>10} frontier")
    for r in results:
        front = r["err"] < best_err
        best_err = min(best_err, r["err"])
        r["frontier"] = front
        print(f"{r['encoding']:>9} {r['k']:>4} {r['m']:>10} {r['bits']:>7} {r['bpt']:>12.1f} "
              f"{baseline_bpt / r['bpt']:>12.1f}x {r['tail']:>10.4f} {r['kl']:>10.4f} "
              f"{r['err']:>10.5f} {'*' if front else ''}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"({time.time() - t0:.0f}s)")
    if args.budget is None:
        first = next(r for r in results if (r["k"], r["m"]) == settings[0][:2])
    else:
        within = [r for r in results if r["bpt"] <= args.budget]
        if not within:
            sys.exit(f"no configuration within {args.budget} bytes per token")
        first = min(within, key=lambda r: r["err"])
        print(f"best within {args.budget} B/token: encoding={first['encoding']} k={first['k']} "
              f"tail_samples={first['m']} logprob_bits={first['bits']}")
    print(f"bytes_per_token={first['bpt']:.1f} kl_rel_error={first['err']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
