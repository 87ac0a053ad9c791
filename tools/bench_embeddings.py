"""Throughput of all-MiniLM-L6-v2 on CPU for the semantic dedup: fp32 vs bf16 vs int8.

    python tools/bench_embeddings.py --sentences 20000

Encodes the same recipe headlines (the `templates` generator, so the lengths are the data
set's) with the full model in fp32, in bf16 (weights and activations) and with int8 dynamic
quantization of its linear layers (`data.embedding_precision`), with the static word-piece
stand-in as a last point, and reports sentences/s, the cosine agreement of bf16 and int8 with
fp32 and how long 500,000 headlines would take. sentence-transformers already encodes length-sorted batches under
`torch.inference_mode`; the embedder caps sequences at 48 word pieces and uses every core.
Last line:

    sentences=<n> fp32_per_s=<a> int8_per_s=<b> ratio_int8_fp32=<r> cosine_mean=<c> cosine_min=<m> bf16_per_s=<f> ratio_bf16_fp32=<q> bf16_cosine_min=<k>

(`cosine_*` are int8's, kept first for comparisons with earlier runs.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=20_000)
    ap.add_argument("--domain", type=Path, required=True, help="the taxonomy file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from distillscale.data.dedup import MiniLMEmbedder, StaticMiniLMEmbedder
    from distillscale.data.generate import generate_headlines
    from distillscale.domain import load_taxonomy

    rows = generate_headlines(load_taxonomy(args.domain), args.sentences, "natural", 20,
                              args.seed)
    texts = [r["text"] for r in rows][: args.sentences]
    rates, embs = {}, {}
    for name, make in (("fp32", lambda: MiniLMEmbedder(precision="fp32")),
                       ("bf16", lambda: MiniLMEmbedder(precision="bf16")),
                       ("int8", lambda: MiniLMEmbedder(precision="int8")),
                       ("static", lambda: StaticMiniLMEmbedder())):
        model = make()
        model.encode(texts[:256])  # warm-up: first-call allocations, kernel selection
        t0 = time.perf_counter()
        embs[name] = model.encode(texts)
        rates[name] = len(texts) / (time.perf_counter() - t0)
        print(f"{name:>6}: {rates[name]:8.1f} sentences/s -> 500k headlines in "
              f"{500_000 / rates[name] / 60:6.1f} min")
    cos = np.sum(embs["fp32"] * embs["int8"], axis=1)  # both are unit-normalised
    cos16 = np.sum(embs["fp32"] * embs["bf16"], axis=1)
    print(f"bf16 vs fp32 cosine: mean {cos16.mean():.6f}, min {cos16.min():.6f}")
    print(f"int8 vs fp32 cosine: mean {cos.mean():.4f}, p1 {np.percentile(cos, 1):.4f}, "
          f"min {cos.min():.4f}; cpus={os.cpu_count()} load_avg_1m={os.getloadavg()[0]:.1f}")
    print(f"sentences={len(texts)} fp32_per_s={rates['fp32']:.1f} int8_per_s={rates['int8']:.1f} "
          f"ratio_int8_fp32={rates['int8'] / rates['fp32']:.2f} cosine_mean={cos.mean():.4f} "
          f"cosine_min={cos.min():.4f} bf16_per_s={rates['bf16']:.1f} "
          f"ratio_bf16_fp32={rates['bf16'] / rates['fp32']:.2f} bf16_cosine_min={cos16.min():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
