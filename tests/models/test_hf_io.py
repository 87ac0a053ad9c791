"""HF <-> Megatron round trips through distillscale.models.hf_io (tiny models, CPU, offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distillscale.config import ModelArch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from tiny_hf import randomize_weights

VOCAB = 300
SEQ = 32
TOL = 1e-4

ARCHS = {
    # Teacher-like: GQA, non-default RoPE base, untied embeddings.
    "teacher": ModelArch(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=SEQ,
        rotary_base=50000.0,
    ),
    # Width-pruned student: head_dim (16) no longer hidden / heads (24).
    "pruned": ModelArch(
        num_layers=2,
        hidden_size=48,
        ffn_hidden_size=96,
        num_attention_heads=2,
        num_query_groups=2,
        kv_channels=16,
        seq_length=SEQ,
    ),
    "tied": ModelArch(
        num_layers=1,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        seq_length=SEQ,
        norm_epsilon=1e-6,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="module")
def mg(megatron):
    from distillscale.models import megatron_gpt

    return megatron_gpt


def _randomize(model, seed: int = 0) -> None:
    randomize_weights(model, seed, scale=0.2)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits, hf


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", "rates", "rise"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


@pytest.mark.parametrize("name", list(ARCHS))
def test_save_hf_loads_in_transformers_and_back(mg, tmp_path, name):
    from distillscale.models.hf_io import load_hf, save_hf

    arch = ARCHS[name]
    model = mg.build_gpt(arch, VOCAB)
    _randomize(model)
    tokens = _tokens()
    with torch.no_grad():
        ours = mg.forward_logits(model, tokens)

    out = save_hf(model, arch, VOCAB, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == arch.head_dim
    assert cfg["num_key_value_heads"] == arch.num_query_groups
    assert cfg["tie_word_embeddings"] == arch.tie_word_embeddings
    hf, hf_model = _hf_logits(out, tokens)
    assert hf_model.config.rope_parameters["rope_theta"] == arch.rotary_base
    assert (hf - ours).abs().max().item() < TOL

    loaded, loaded_arch, vocab = load_hf(out)
    assert (loaded_arch, vocab) == (arch, VOCAB)
    with torch.no_grad():
        back = mg.forward_logits(loaded, tokens)
    assert (back - ours).abs().max().item() < TOL
    # load_hf's arch describes the loaded module exactly: our own builder accepts its weights.
    rebuilt = mg.build_gpt(loaded_arch, vocab)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(mg.forward_logits(rebuilt, tokens), back)


def test_save_hf_writes_tokenizer_and_replaces_atomically(mg, tmp_path):
    from transformers import AutoTokenizer

    from distillscale.models.hf_io import save_hf

    arch = ARCHS["tied"]
    model = mg.build_gpt(arch, VOCAB)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    tok = _word_tokenizer()
    save_hf(model, arch, VOCAB, out, tokenizer=tok)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("rates rise")["input_ids"] == tok("rates rise")["input_ids"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 3, 0)


def test_save_hf_rejects_arch_that_does_not_match_model(mg, tmp_path):
    from distillscale.models.hf_io import save_hf

    model = mg.build_gpt(ARCHS["teacher"], VOCAB)
    with pytest.raises(ValueError, match="hidden_size"):
        save_hf(model, ARCHS["pruned"], VOCAB, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# Checkpoints as users bring them (local Qwen3 / Qwen2.5 / Llama-3.1 directories), at toy size:
# (transformers config class name, extra config, (QK layernorm, QKV bias, RoPE scaling)).
HUB_FAMILIES = {
    "qwen3": (
        "Qwen3Config",
        {"head_dim": 32, "rope_theta": 1e6, "tie_word_embeddings": True},
        (True, False, False),
    ),
    "qwen2": ("Qwen2Config", {"rope_theta": 1e6}, (False, True, False)),
    "llama3.1": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
        (False, False, True),
    ),
}


@pytest.mark.parametrize("family", list(HUB_FAMILIES))
def test_load_hf_checkpoint_and_export_back(mg, tmp_path, family):
    import transformers

    from distillscale.models.hf_io import load_hf, save_hf

    cls_name, extra, feature = HUB_FAMILIES[family]
    cfg = getattr(transformers, cls_name)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        **extra,
    )
    cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    src = transformers.AutoModelForCausalLM.from_config(cfg)
    _randomize(src)
    src.save_pretrained(tmp_path / "src")
    tokens = _tokens()
    with torch.no_grad():
        ref = src(tokens).logits

    model, arch, vocab = load_hf(tmp_path / "src")
    assert (arch.hidden_size, arch.num_query_groups, vocab) == (64, 2, VOCAB)
    assert (arch.qk_layernorm, arch.add_qkv_bias, arch.rope_scaling is not None) == feature
    assert arch.head_dim == extra.get("head_dim", 16)
    assert arch.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    with torch.no_grad():
        ours = mg.forward_logits(model, tokens)
    assert (ours - ref).abs().max().item() < TOL

    out = save_hf(model, arch, vocab, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == cfg.architectures
    hf, _ = _hf_logits(out, tokens)
    assert (hf - ref).abs().max().item() < TOL

    # The recorded arch rebuilds the same model without Bridge (what checkpoints, pruning and
    # distillation do): the state dict loads strictly and gives the same logits.
    rebuilt = mg.build_gpt(arch, vocab)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert (mg.forward_logits(rebuilt, tokens) - ref).abs().max().item() < TOL
    assert mg.count_params(rebuilt) == mg.arch_params(arch, vocab)


def test_arch_from_hf_config_reads_each_family(tmp_path):
    import transformers

    from distillscale.models.hf_io import arch_from_hf_config
    from distillscale.models.shape import hf_family

    for family, (cls_name, extra, feature) in HUB_FAMILIES.items():
        cfg = getattr(transformers, cls_name)(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, **extra)
        cfg.save_pretrained(tmp_path / family)
        arch, vocab = arch_from_hf_config(tmp_path / family / "config.json")
        assert (arch.num_layers, arch.ffn_hidden_size, vocab) == (3, 128, VOCAB)
        assert (arch.qk_layernorm, arch.add_qkv_bias, arch.rope_scaling is not None) == feature
        assert hf_family(arch) == {"llama3.1": "llama"}.get(family, family)
    assert arch.rope_scaling["factor"] == 8.0 and arch.rotary_base == 5e5
    bad = transformers.LlamaConfig(hidden_act="gelu", attention_bias=True)
    bad.save_pretrained(tmp_path / "bad")
    with pytest.raises(NotImplementedError, match="hidden_act=gelu.*attention_bias"):
        arch_from_hf_config(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="config.json"):
        arch_from_hf_config(tmp_path / "nothing")


def test_bridge_te_stub_has_module_spec(mg):
    # A transformer-engine stub module without __spec__ makes `importlib.util.find_spec` raise
    # ValueError, which transformers' package probes (e.g. behind `import Trainer`) do not catch.
    import importlib.util

    from distillscale.models.hf_io import _auto_bridge

    _auto_bridge()
    importlib.util.find_spec("transformer_engine")
    importlib.util.find_spec("transformer_engine.pytorch")


def test_pruned_qwen3_stays_qwen3_through_export(mg, tmp_path):
    """A Qwen3 checkpoint keeps its family through Minitron: the QK layernorm is built into the
    pruning copy and the student (`build_gpt` from the arch), the strict reload accepts its
    q/k norm weights, and `save_hf` writes Qwen3 whose transformers logits match Megatron's."""
    import transformers

    from distillscale.models.hf_io import load_hf, save_hf
    from distillscale.prune.minitron import prune_minitron

    _, extra, _ = HUB_FAMILIES["qwen3"]
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=SEQ, **extra)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    src = transformers.AutoModelForCausalLM.from_config(cfg)
    _randomize(src)
    src.save_pretrained(tmp_path / "src")
    teacher, arch, vocab = load_hf(tmp_path / "src")
    assert arch.qk_layernorm

    def forward_loop(model):
        with torch.no_grad():
            mg.forward_logits(model, _tokens(2))

    target = {"hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 2}
    student, student_arch = prune_minitron(teacher, arch, target, forward_loop)
    assert student_arch.qk_layernorm and student.config.qk_layernorm
    assert any("q_layernorm" in n for n in student.state_dict())
    out = save_hf(student, student_arch, vocab, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert (written["hidden_size"], written["num_attention_heads"], written["head_dim"]) == (
        48, 2, 32)
    tokens = _tokens()
    student.eval()
    with torch.no_grad():
        ours = mg.forward_logits(student, tokens)
    hf, _ = _hf_logits(out, tokens)
    assert (hf - ours).abs().max().item() < TOL
