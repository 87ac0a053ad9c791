"""General-knowledge evaluation of a real (tiny, random) HF checkpoint with the word-level
tokenizer, through lm-eval's `hf` backend: the path every model's HF export takes."""

import pandas as pd
import pytest

from distillscale.config import GeneralEvalConfig
from distillscale.eval.general import evaluate_hf_export


@pytest.mark.slow
def test_hf_export_scored_by_lm_eval(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillscale.tokenizer import build_word_tokenizer

    qs = [{"question": f"what is the currency of land{i} ?", "subject": "currency",
           "choices": [f"coin{j}" for j in range(4)], "answer": i % 4} for i in range(8)]
    (tmp_path / "mmlu").mkdir()
    pd.DataFrame(qs).to_parquet(tmp_path / "mmlu" / "test.parquet")
    pd.DataFrame(qs[:2]).to_parquet(tmp_path / "mmlu" / "dev.parquet")
    texts = [q["question"] + " answer : " + " ".join(q["choices"]) for q in qs]
    tok = build_word_tokenizer(texts, ["merger"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    # With a zero head every token is equally likely: all choices tie at the same likelihood
    # and lm-eval's argmax takes the first, so the accuracy is the share of answer 0.
    cfg = GeneralEvalConfig(mmlu_path=str(tmp_path / "mmlu"), batch_size=4)
    res, notes = evaluate_hf_export(hf, cfg, scratch_tokenizer=True)
    assert notes == ["mmlu_pro: skipped (eval.general.mmlu_pro_path is not set)",
                     "probe: skipped (eval.general.probe_path is not set)"]
    assert res["mmlu"]["n"] == 8
    assert res["mmlu"]["value"] == pytest.approx(sum(q["answer"] == 0 for q in qs) / 8)
