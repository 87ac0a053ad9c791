"""Minitron pruning of an HF teacher through its Megatron-Bridge provider (`prune/bridge_prune.py`)
on CPU: a tiny random Qwen3 (tied embeddings, QK layernorm; local layer spec) pruned in width and
depth at PP 1 (this process) and at PP 2 (two gloo processes: `python THIS_FILE --worker`), then
exported to HF by Bridge and re-imported with transformers.

At PP 2 on CPU, ModelOpt 0.47's object collectives and megatron-core 0.19's tied-embedding sync
call `.cuda()` unconditionally; `prune_hf_through_bridge` runs them inside the CPU shim
`compat/cpu.py` `tensor_cuda_as_identity` (scoped to the prune; the worker patches nothing), and
the test checks `Tensor.cuda` is restored afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from gloo_ranks import run_ranks

TARGET = {"hidden_size": 48, "ffn_hidden_size": 128, "num_layers": 2}
TEACHER = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
SEQ = 16


def _tokens(vocab: int, seed: int, batches: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, SEQ), generator=g) for _ in range(batches)]


def _prune(teacher: Path, out: Path, pipeline_parallel: int) -> dict:
    """Prune `teacher` at this world's PP; return (on every rank) what the test compares."""
    from transformers import AutoConfig

    from distillscale.prune.bridge_prune import pipeline_logits, prune_hf_through_bridge

    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    info: dict = {}
    _, model, arch = prune_hf_through_bridge(
        teacher, TARGET, _tokens(vocab, seed=1, batches=3, batch=2), out / "hf",
        pipeline_parallel=pipeline_parallel, seq_length=64, dtype=torch.float32, info=info)
    model.eval()
    with torch.no_grad():
        (probe,) = _tokens(vocab, seed=2, batches=1, batch=3)
        logits = pipeline_logits(model, probe)
    return {"logits": logits, "probe": probe, "arch": arch.model_dump(), **info}


def _worker(teacher: Path, out: Path) -> None:
    from distillscale.models.megatron_gpt import init_distributed

    cuda = torch.Tensor.cuda
    init_distributed(pipeline_parallel=int(os.environ["WORLD_SIZE"]))
    result = _prune(teacher, out, int(os.environ["WORLD_SIZE"]))
    result["cuda_restored"] = torch.Tensor.cuda is cuda  # the shim is scoped to the prune
    if int(os.environ["RANK"]) == 0:
        torch.save(result, out / "result.pt")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_hf import build_checkpoint, build_tokenizer

    tok = build_tokenizer([f"w{i} alpha beta gamma delta" for i in range(64)], vocab_size=256)
    return build_checkpoint("qwen3", tmp_path_factory.mktemp("teacher") / "qwen3", tok, layers=4)


@pytest.fixture(scope="module")
def pp1(teacher, tmp_path_factory, megatron):
    from distillscale.models.megatron_gpt import init_distributed, use_model_parallel_layout

    use_model_parallel_layout(1, 1)
    init_distributed()
    out = tmp_path_factory.mktemp("pp1")
    return out, _prune(teacher, out, 1)


def _hf_logits(folder: Path, tokens: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(tokens).logits


@pytest.mark.slow
def test_pp1_export_is_the_pruned_qwen3(teacher, pp1):
    from safetensors.torch import load_file

    out, res = pp1
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (48, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["tie_word_embeddings"] is True and len(cfg["layer_types"]) == 2
    assert (res["arch"]["hidden_size"], res["arch"]["num_layers"]) == (48, 2)

    # Depth: the two layers ModelOpt scored highest are the ones kept.
    scores = res["layer_scores"]
    assert sorted(scores) == [1, 2, 3, 4]
    assert res["kept_layers"] == sorted(sorted(scores, key=scores.get, reverse=True)[:2])

    # The export re-imports with transformers and gives the pruned Megatron model's logits.
    hf, logits = _hf_logits(out / "hf", res["probe"])
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in hf.parameters()) < 0.5 * sum(
        p.numel() for p in load_file(str(teacher / "model.safetensors")).values())
    assert (logits - res["logits"]).abs().max().item() <= 1e-4
    _, teacher_logits = _hf_logits(teacher, res["probe"])
    assert (teacher_logits - logits).abs().max().item() > 1e-2  # pruning changed the model

    # Width is a selection of the teacher's channels, not new weights: every kept hidden channel
    # is one of the teacher's embedding columns, and the kept layers keep their (head_dim-wide,
    # unpruned) QK norms.
    t, s = load_file(str(teacher / "model.safetensors")), load_file(str(out / "hf" /
                                                                        "model.safetensors"))
    te, se = t["model.embed_tokens.weight"], s["model.embed_tokens.weight"]
    assert se.shape == (te.shape[0], 48)
    match = (se.T[:, None, :] - te.T[None, :, :]).abs().amax(-1) == 0  # [48, 64]
    assert (match.sum(1) == 1).all() and match.any(0).sum() == 48
    for new, old in enumerate(res["kept_layers"]):
        for norm in ("q_norm", "k_norm"):
            key = f"model.layers.{{}}.self_attn.{norm}.weight"
            assert torch.equal(s[key.format(new)], t[key.format(old - 1)])


@pytest.mark.slow
def test_pp2_on_two_gloo_ranks_gives_the_pp1_student(teacher, pp1, tmp_path):
    from safetensors.torch import load_file

    run_ranks([sys.executable, __file__, "--worker", str(teacher), str(tmp_path)], world=2)
    res2 = torch.load(tmp_path / "result.pt", weights_only=False)
    out1, res1 = pp1
    assert res2["cuda_restored"]

    # Same calibration, same HF weights: ModelOpt's importance reductions over the pipeline group
    # (hidden_size activations all-reduced, layer scores gathered) give the same scores, the same
    # kept channels and layers, so the same student.
    assert res2["layer_scores"] == pytest.approx(res1["layer_scores"], rel=1e-6)
    assert res2["kept_layers"] == res1["kept_layers"] and res2["arch"] == res1["arch"]
    w1 = load_file(str(out1 / "hf" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert w2.keys() == w1.keys()
    assert all(torch.allclose(w2[k], w1[k], rtol=0, atol=1e-6) for k in w1)
    assert (res2["logits"] - res1["logits"]).abs().max().item() <= 1e-5

    # The PP 2 export (weights streamed from both stages) re-imports and matches PP 2's logits.
    _, logits = _hf_logits(tmp_path / "hf", res2["probe"])
    assert (logits - res2["logits"]).abs().max().item() <= 1e-4


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
