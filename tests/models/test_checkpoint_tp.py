"""A model split over TP=2 ranks is saved as one distributed checkpoint (every rank's shards,
not rank 0's slice) inside a multi-rank stage, and loads back at TP=2 and in one process.

The TP=2 half runs as two gloo processes (`python THIS_FILE --worker`) so the test session's
TP=1 parallel state is not disturbed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from gloo_ranks import run_ranks

from distillscale.config import ModelArch

ARCH = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, kv_channels=16, seq_length=16)
VOCAB = 128
TOKENS = torch.arange(32).reshape(2, 16) % VOCAB


def _worker(out: Path) -> None:
    from distillscale.manifest import atomic_stage
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.models.megatron_gpt import build_gpt, forward_logits, init_distributed

    init_distributed(2, 1, 0)
    torch.manual_seed(0)
    model = build_gpt(ARCH, VOCAB)
    with torch.no_grad():
        ref = forward_logits(model, TOKENS)
    with atomic_stage(out / "stage", "test", "h", {}) as stage:
        save_model(model, ARCH, VOCAB, stage.path)  # rank 1's stage.path is its scratch folder
    again, _, _ = load_model(out / "stage")  # resharded back to TP=2
    with torch.no_grad():
        diff = float((forward_logits(again, TOKENS) - ref).abs().max())
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": ref, "tp2_reload_diff": diff}, out / "ref.pt")
    torch.distributed.barrier()


@pytest.mark.slow
def test_tp2_checkpoint_holds_every_shard_and_reloads_at_tp1(tmp_path, megatron):
    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import build_gpt, forward_logits

    run_ranks([sys.executable, __file__, "--worker", json.dumps(str(tmp_path))], world=2)

    ck = tmp_path / "stage" / "checkpoint"
    assert not (ck / "model.pt").exists()
    assert sorted(f.name for f in (ck / "dist").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((tmp_path / "stage").glob(".rank*"))  # scratch folders dropped
    ref = torch.load(tmp_path / "ref.pt")
    assert ref["tp2_reload_diff"] < 1e-5

    model, arch, vocab = load_model(tmp_path / "stage")  # this process: TP=1
    assert (arch, vocab) == (ARCH, VOCAB)
    with torch.no_grad():
        fresh = forward_logits(build_gpt(ARCH, VOCAB), TOKENS)
        got = forward_logits(model, TOKENS)
    assert got.shape == ref["logits"].shape
    assert float((fresh - ref["logits"]).abs().max()) > 1e-2  # loading is what makes them agree
    assert float((got - ref["logits"]).abs().max()) < 1e-5


def test_local_path_refuses_pipeline_parallel(megatron):
    from distillscale.models.megatron_gpt import build_gpt

    with pytest.raises(NotImplementedError, match="launch.pipeline_parallel=2"):
        build_gpt(ARCH, VOCAB, 1, 2)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(json.loads(sys.argv[2])))
