"""`distillscale run conf/experiments/quickstart.yaml teacher.source=hf teacher.hf_path=DIR` end to
end on tiny random Llama, Qwen2 (QKV bias) and Qwen3 (QK layernorm, tied embeddings)
checkpoints with a locally trained BPE tokenizer and a chat template (tests/fixtures/tiny_hf.py):
import through Megatron-Bridge, supervision by the HF backend over the chat template, Minitron
width and depth pruning, logit distillation, multi-token label-constrained evaluation, the
probe through lm-eval, HF export in the teacher's family."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from tiny_hf import FAMILIES, build_checkpoint, build_tokenizer, domain_texts

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_teachers")
    tok = build_tokenizer(domain_texts(ROOT / "conf/domains/finance.yaml"))
    return {f: build_checkpoint(f, root / f, tok, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, checkpoints, tmp_path_factory, megatron):
    from distillscale.cli import main

    family = request.param
    out = tmp_path_factory.mktemp(f"run_{family}")
    rc = main(["run", str(ROOT / "conf/experiments/quickstart.yaml"),
               "teacher.source=hf", f"teacher.hf_path={checkpoints[family]}",
               f"output_dir={out}", f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}",
               "data.num_examples=180", "data.min_per_class=5", "data.val_fraction=0.2",
               "teacher.supervision.depths=[label]", "teacher.supervision.max_retries=0",
               "teacher.supervision.cache.formats=[]", "teacher.knowledge.probe_size=20",
               "prune.calibration_samples=16", "distill.train.steps=12",
               "distill.train.batch_size=16", "eval.bootstrap_samples=20",
               "eval.general.limit=20",
               ("students=[{name: w, axis: width, compression_ratio: 0.5}, "
                "{name: d, axis: depth, shape: {num_layers: 2}}]"),
               # One family distills with the head fused into the loss, where the chat
               # prompts' shared prefix runs once per batch (models/shared_prefix.py).
               *(["distill.loss.implementation=fused_head"] if family == "qwen3" else [])])
    assert rc == 0
    return family, out, checkpoints[family]


@pytest.mark.slow
@pytest.mark.long_e2e
def test_hf_teacher_runs_every_stage(run):
    from distillscale.models.checkpoint import load_model
    from distillscale.models.megatron_gpt import forward_logits

    family, out, src = run
    teacher = json.loads((out / "teacher" / "manifest.json").read_text())["metrics"]
    assert teacher["hf_family"] == family and teacher["hf_max_abs_logit_diff"] < 1e-3
    assert max(teacher["class_name_tokens"].values()) > 1  # multi-token class names
    res = pd.read_csv(out / "results.csv")
    t = res[res.model == "teacher"].iloc[0]
    src_cfg = json.loads((src / "config.json").read_text())
    for name in ("w", "d"):
        for stage in ("pruned", "distilled"):
            row = res[res.model == f"{name}/{stage}"].iloc[0]
            assert row.params < t.params  # smaller than the teacher
            for metric in ("macro_f1", "accuracy"):
                assert 0.0 <= row[metric] <= 1.0
        distilled = out / "students" / name / "distilled"
        m = json.loads((distilled / "manifest.json").read_text())["metrics"]
        assert m["val_kl_after"] < m["val_kl_before"]
        assert m["hf_max_abs_logit_diff"] < 1e-3
        if family == "qwen3":  # fused_head: each batch ran its shared prompt prefix once
            ran = [(h["forward_tokens"], h["batch_tokens"]) for h in m["history"]]
            assert ran and all(0 < t < b / 2 for t, b in ran), ran
        cfg = json.loads((distilled / "hf" / "config.json").read_text())
        assert cfg["architectures"] == [ARCHITECTURES[family]]  # the teacher's family
        assert cfg["tie_word_embeddings"] == src_cfg.get("tie_word_embeddings", False)
        # Reloaded with transformers, the export gives the distilled checkpoint's logits.
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(distilled / "hf", dtype=torch.float32).eval()
        model, arch, _ = load_model(distilled)
        assert arch.qk_layernorm == (family == "qwen3")
        assert arch.add_qkv_bias == (family == "qwen2")
        tokens = torch.randint(0, hf.config.vocab_size, (2, 24),
                               generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (hf(tokens).logits - forward_logits(model, tokens)).abs().max().item()
        assert diff < 1e-3
    assert res[res.model == "d/distilled"].iloc[0].num_layers == 2
    w = res[res.model == "w/distilled"].iloc[0]
    assert w.hidden_size < t.hidden_size or w.ffn_hidden_size < t.ffn_hidden_size
    long = pd.read_csv(out / "eval" / "results_long.csv")
    assert set(long.metric) >= {"macro_f1", "accuracy", "gold_accuracy"}
    sup = json.loads((out / "supervision" / "manifest.json").read_text())["metrics"]
    assert sup["family"] == "chat" and sup["depths"]["train"]["label"]["examples"] > 0
    assert (out / "report.md").is_file()
