"""The evaluation stage on a model folder that holds only an HF export (a student distilled on
the Bridge path writes no Megatron checkpoint), and lm-eval in a child process of its own (one
vLLM engine per process on GPU), both at CPU scale."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TAXONOMY = ROOT / "conf/domains/finance.yaml"
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from tiny_hf import build_checkpoint, build_tokenizer, domain_texts, randomize_weights

HEADLINES = [
    "acme agrees to buy rival in $2 billion deal",
    "acme beats quarterly estimates on strong sales",
    "regulator fines bank over reporting lapses",
    "board approves share buyback program",
    "acme cuts dividend after weak quarter",
    "ceo resigns amid accounting probe",
    "acme files for bankruptcy protection",
    "bank raises full-year guidance",
    "acme shares jump after record quarter",
    "lender misses estimates as loan losses rise",
    "acme names new chief financial officer",
    "court approves merger of two lenders",
]


def _randomize(model, seed: int = 0) -> None:
    # Larger than the default init, so the answer logits are not flat and predictions differ.
    randomize_weights(model, seed, scale=0.3)


def _ctx(run_dir: Path, *overrides: str):
    from distillscale.config import load_config
    from distillscale.runner import Context, Paths

    cfg = load_config(ROOT / "conf/experiments/quickstart.yaml", [
        f"output_dir={run_dir}", f"domain.taxonomy={TAXONOMY}", "students=[]",
        "eval.bootstrap_samples=20", "eval.general.probe_path=null", *overrides])
    return Context(cfg, Paths(cfg))


@pytest.fixture(scope="module")
def word_model(tmp_path_factory, megatron):
    """A tiny Megatron model with the tiny family's word tokenizer (untied embeddings), saved
    twice: `ckpt/` as its Megatron checkpoint only, `hf_only/` as its HF export only."""
    from distillscale.config import ModelArch
    from distillscale.domain import load_taxonomy
    from distillscale.models.checkpoint import save_model
    from distillscale.models.hf_io import save_hf
    from distillscale.models.megatron_gpt import build_gpt, count_params
    from distillscale.tokenizer import build_word_tokenizer

    root = tmp_path_factory.mktemp("word_model")
    labels = load_taxonomy(TAXONOMY).labels
    tok = build_word_tokenizer(HEADLINES, labels)
    arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, seq_length=96)
    model = build_gpt(arch, len(tok))
    _randomize(model)
    save_model(model, arch, len(tok), root / "ckpt")
    save_hf(model, arch, len(tok), root / "hf_only" / "hf", tokenizer=tok)
    return {"root": root, "tok": tok, "arch": arch, "labels": labels,
            "params": count_params(model)}


def _stage_run(run_dir: Path, model_folder: Path, word_model, *overrides: str):
    """The eval stage body on a run whose teacher folder is `model_folder` (students=[])."""
    from distillscale.manifest import StageOutput
    from distillscale.stages import evaluate

    shutil.copytree(model_folder, run_dir / "teacher")
    word_model["tok"].save_pretrained(run_dir / "teacher" / "tokenizer")
    labels = word_model["labels"]
    data = run_dir / "data"
    data.mkdir(parents=True)
    rows = [{"id": str(i), "text": t, "label": labels[i % len(labels)]}
            for i, t in enumerate(HEADLINES)]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = _ctx(run_dir, *overrides)
    out = StageOutput(run_dir / "eval_out", config_hash="h")
    out.path.mkdir()
    evaluate._body(ctx, out)
    return ctx, out.path


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["label_constrained", "generative"])
def test_hf_only_folder_scores_as_its_megatron_checkpoint(word_model, tmp_path, scoring,
                                                          monkeypatch):
    from distillscale.eval import indomain
    from distillscale.stages import evaluate
    from distillscale.stages.rows import encoder

    # The general evaluation runs before the stage loads any model (one engine per process).
    loaded, order = [], []
    real_load = evaluate.load_evaluated
    monkeypatch.setattr(evaluate, "load_evaluated",
                        lambda folder: loaded.append(folder) or real_load(folder))
    real_general = evaluate.evaluate_hf_export
    monkeypatch.setattr(evaluate, "evaluate_hf_export",
                        lambda *a, **k: order.append(len(loaded)) or real_general(*a, **k))
    over = [f"eval.scoring={scoring}", "eval.max_new_tokens=6"]
    _, ck = _stage_run(tmp_path / "ckpt", word_model["root"] / "ckpt", word_model, *over)
    assert (order, len(loaded)) == ([0], 1)
    loaded.clear(), order.clear()
    ctx, hf = _stage_run(tmp_path / "hf", word_model["root"] / "hf_only", word_model, *over)
    assert (order, len(loaded)) == ([0], 1)
    assert not (ctx.paths.teacher / "checkpoint").exists()

    pred_ck = pd.read_csv(ck / "predictions.csv")
    pred_hf = pd.read_csv(hf / "predictions.csv")
    pd.testing.assert_frame_equal(pred_ck, pred_hf)
    if scoring == "label_constrained":
        assert pred_ck.teacher.nunique() > 1  # the predictions discriminate
    long_ck = pd.read_csv(ck / "results_long.csv").drop(columns="manifest_hash")
    long_hf = pd.read_csv(hf / "results_long.csv").drop(columns="manifest_hash")
    pd.testing.assert_frame_equal(long_ck, long_hf)
    # Params and shape columns: the Megatron model's, read here from the HF model and config.
    assert set(long_hf.params) == {word_model["params"]}
    models = pd.read_csv(hf / "models.csv").iloc[0]
    arch = word_model["arch"]
    assert (models.num_layers, models.hidden_size, models.ffn_hidden_size,
            models.num_attention_heads) == (arch.num_layers, arch.hidden_size,
                                            arch.ffn_hidden_size, arch.num_attention_heads)

    # Beneath the predictions: the same answer logits, and greedy decoding writes the same text.
    enc, _ = encoder(ctx, arch.seq_length)
    rows = [{"text": t} for t in HEADLINES]
    m_ck, _, _ = evaluate.load_evaluated(word_model["root"] / "ckpt")
    m_hf, _, _ = evaluate.load_evaluated(word_model["root"] / "hf_only")
    assert indomain.is_hf_model(m_hf) and not indomain.is_hf_model(m_ck)
    if scoring == "label_constrained":
        b = enc.encode([{**r, "label": word_model["labels"][0]} for r in rows])
        with torch.no_grad():
            a_ck = indomain.answer_logits(m_ck, b.tokens, b.answer_pos)
            a_hf = indomain.answer_logits(m_hf, b.tokens, b.answer_pos)
        assert (a_ck - a_hf).abs().max() < 1e-4
    else:
        _, t_ck = indomain.generate_labels(m_ck, enc, rows, 6)
        _, t_hf = indomain.generate_labels(m_hf, enc, rows, 6)
        assert t_ck == t_hf and any(t.strip() for t in t_ck)


@pytest.mark.slow
def test_hf_only_student_with_tied_embeddings_and_multi_token_names(tmp_path, megatron):
    """An HF teacher's format (chat template, class names of several BPE tokens) and a Qwen3
    model with tied embeddings: the parameter count of the HF model counts the shared matrix
    once, as `count_params` does on the Megatron model, and the KV-cache scorer on the HF model
    predicts what the full Megatron forward per class does."""
    from distillscale.eval.indomain import is_hf_model, multi_token
    from distillscale.models.checkpoint import save_model
    from distillscale.models.hf_io import load_hf, save_hf
    from distillscale.stages import evaluate
    from distillscale.stages.rows import encoder

    tok = build_tokenizer(domain_texts(TAXONOMY))
    src = build_checkpoint("qwen3", tmp_path / "src", tok, layers=2)
    model, arch, vocab = load_hf(src)
    assert arch.tie_word_embeddings
    _randomize(model, seed=1)
    save_model(model, arch, vocab, tmp_path / "ckpt")
    save_hf(model, arch, vocab, tmp_path / "hf_only" / "hf", tokenizer=tok)

    ctx = _ctx(tmp_path / "run", "teacher.source=hf", f"teacher.hf_path={src}")
    tok.save_pretrained(ctx.paths.teacher / "tokenizer")
    enc, _ = encoder(ctx, arch.seq_length)
    assert multi_token(enc)
    rows = [{"text": t} for t in HEADLINES[:6]]
    m_ck, arch_ck, params_ck = evaluate.load_evaluated(tmp_path / "ckpt")
    m_hf, arch_hf, params_hf = evaluate.load_evaluated(tmp_path / "hf_only")
    assert is_hf_model(m_hf)
    assert params_hf == params_ck
    every_tensor = sum(p.numel() for _, p in m_hf.named_parameters(remove_duplicate=False))
    assert params_hf == every_tensor - vocab * arch.hidden_size  # the tied matrix once
    assert arch_hf == arch_ck
    # No hf/ in the checkpoint folder: the Megatron model scores every class by a full forward.
    p_ck = evaluate.indomain_predictions(ctx, "s/distilled", tmp_path / "ckpt", m_ck, enc, rows)
    p_hf = evaluate.indomain_predictions(ctx, "s/distilled", tmp_path / "hf_only", m_hf, enc,
                                         rows)
    assert p_ck.tolist() == p_hf.tolist()
    assert len(set(p_ck.tolist())) > 1  # the predictions discriminate


def _mmlu_copy(folder: Path) -> Path:
    qs = [{"question": f"what does acme {w} ?", "subject": "finance",
           "choices": ["bank", "deal", "quarter", "rival"], "answer": i % 4}
          for i, w in enumerate(["buy", "beat", "cut", "raise", "file", "name", "approve", "fine"])]
    folder.mkdir()
    pd.DataFrame(qs).to_parquet(folder / "test.parquet")
    pd.DataFrame(qs[:2]).to_parquet(folder / "dev.parquet")
    return folder


@pytest.mark.slow
def test_general_eval_in_a_child_process_matches_in_process(word_model, tmp_path):
    from distillscale.config import GeneralEvalConfig
    from distillscale.eval.general import evaluate_hf_export

    hf = word_model["root"] / "hf_only" / "hf"
    cfg = GeneralEvalConfig(mmlu_path=str(_mmlu_copy(tmp_path / "mmlu")), batch_size=4)
    here, notes = evaluate_hf_export(hf, cfg, scratch_tokenizer=True, own_process=False)
    child, child_notes = evaluate_hf_export(hf, cfg, scratch_tokenizer=True, own_process=True)
    assert here["mmlu"]["n"] == 8
    assert child == here and child_notes == notes

    # A failing child: one line naming the model folder and the child's error.
    broken = tmp_path / "broken" / "hf"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    with pytest.raises(RuntimeError) as e:
        evaluate_hf_export(broken, cfg, scratch_tokenizer=True, own_process=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{broken.parent}: general evaluation (hf) failed in its own process")
    assert "exit 1" in msg and "Error" in msg


def test_vllm_backend_runs_lm_eval_in_a_child_process(tmp_path, monkeypatch):
    from distillscale.config import GeneralEvalConfig
    from distillscale.eval import general

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(general, "_in_child_process",
                        lambda *a: calls.append(a) or {"mmlu": {"value": 0.5}})
    monkeypatch.setattr(general, "evaluate",
                        lambda *a, **k: pytest.fail("lm-eval ran in the parent process"))
    mmlu = str(_mmlu_copy(tmp_path / "mmlu"))
    cfg = GeneralEvalConfig(mmlu_path=mmlu, backend="vllm")
    res, _ = general.evaluate_hf_export(tmp_path / "hf", cfg, False, tensor_parallel=2,
                                        max_model_len=512)
    assert res == {"mmlu": {"value": 0.5}}
    assert calls == [(tmp_path / "hf", cfg, False, 2, 512)]
    # The hf backend stays in process unless asked.
    monkeypatch.setattr(general, "evaluate", lambda *a, **k: {"mmlu": {"value": 0.25}})
    res, _ = general.evaluate_hf_export(tmp_path / "hf", cfg.model_copy(update={"backend": "hf"}),
                                        False)
    assert res == {"mmlu": {"value": 0.25}} and len(calls) == 1
