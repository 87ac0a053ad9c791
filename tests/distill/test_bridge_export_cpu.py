"""The Bridge stage's HF export (`bridge.export_in_fresh_process` -> `export_hf`) run on a real
`torch_dist` checkpoint in the layout Bridge's training writes.

The checkpoint is written by Bridge's own `training.checkpointing.save_checkpoint` from our
`bridge.config_container` and the model Bridge's pre-wrap hooks build (the `DistillationModel`,
co-located teacher included; ModelOpt hides the teacher from `sharded_state_dict`), so the folder
holds what `distill()` leaves at `train_iters`: `iter_<7 digits>/` with the `torch_dist` shards,
`run_config.yaml` (`cfg.to_yaml`, the student's provider via `DistillationProvider.to_cfg_dict`,
the `peft` section for LoRA), `modelopt_state/` and `train_state.pt`, plus
`latest_checkpointed_iteration.txt` and `latest_train_state.pt` beside it. The student's weights
(or its adapters) are perturbed first, so only a real export of the checkpoint gives the logits
checked here.

What differs from the GPU run, on purpose (each a CPU limitation, not the stage's code):
- the local layer spec with the fusions off, as in test_bridge_provider_cpu.py, and no optimizer
  state in the checkpoint (the export reads only the model's weights);
- `torch.cuda.get_rng_state` stubbed while saving: Bridge 0.6.2 calls it unconditionally
  (training/checkpointing.py:491, `get_rng_state`), which raises without CUDA;
- LoRA only: the export child rebuilds the student from its HF folder
  (`AutoBridge.export_adapter_ckpt`, models/conversion/auto_bridge.py:1571,
  `self.to_megatron_provider(load_weights=True)`) with Bridge's default transformer-engine spec
  and `apply_rope_fusion=True`, which megatron-core 0.19.2 refuses without TE
  (transformer/transformer_config.py:2185, "apply_rope_fusion is not available"). The test runs
  the stage's own child command with a prelude that gives that provider the local spec.
"""

import json
import subprocess
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distillscale.distill import bridge
from distillscale.tokenizer import build_word_tokenizer
from tests.distill.test_bridge_provider_cpu import (
    STUDENT_LAYERS,
    TEACHER_LAYERS,
    VOCAB,
    _build_on_cpu,
    _cfg,
    _hf_model,
    _lora_kd_model,
)

SEQS, SEQ_LEN = 3, 12
STEP = 7  # the iteration the "training" stopped at

# Prepended to the stage's child command for the LoRA export on CPU (see the module docstring).
LOCAL_SPEC_PRELUDE = """
from distillscale.distill.bridge import _bridge_imports
_bridge_imports()
from megatron.bridge import AutoBridge
from megatron.bridge.models.gpt_provider import local_layer_spec
_to_provider = AutoBridge.to_megatron_provider
def _local_spec_provider(self, *args, **kwargs):
    provider = _to_provider(self, *args, **kwargs)
    provider.transformer_layer_spec = local_layer_spec
    provider.gradient_accumulation_fusion = False
    for flag in ("bias_activation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
                 "apply_rope_fusion", "persist_layer_norm"):
        setattr(provider, flag, False)
    return provider
AutoBridge.to_megatron_provider = _local_spec_provider
"""


def _bf16_exact(folder: Path) -> Path:
    """Round the HF weights to bf16 values (kept in fp32): the LoRA export rebuilds the base from
    this folder in fp32, while training held it in bf16; with bf16-exact values both are the same
    numbers and the logits can be compared at 1e-4."""
    f = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(str(f)).items()}, str(f),
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    bridge._bridge_imports()
    tok = build_word_tokenizer([" ".join(f"w{i}" for i in range(200))], ["up", "down"])
    root = tmp_path_factory.mktemp("hf")
    return types.SimpleNamespace(
        tokens=len(tok),
        teacher=_hf_model(root / "teacher", TEACHER_LAYERS, 64, VOCAB, tok, seed=0),
        student=_bf16_exact(_hf_model(root / "student", STUDENT_LAYERS, 32, VOCAB, tok, seed=1)))


def _token_sequences(tokens: int) -> torch.Tensor:
    return torch.randint(0, tokens, (SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(11))


def _megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The student's logits [b, s, v] in fp32: the DistillationModel cast to fp32 in place (its
    bf16 values exactly; it holds process groups, so no copy), student forward only."""
    ref = model.float()
    ref.eval()  # ModelOpt's DistillationModel.train returns None
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    # Explicit causal mask: with None, megatron-core 0.19's local attention builds it on "cuda".
    causal = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
    with torch.no_grad(), ref.only_student_forward():
        out = type(ref).forward(ref, ids, positions, causal)
    assert out.shape == (*ids.shape, VOCAB)
    return out.float()


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _save_like_bridge(container, wrapped, monkeypatch) -> Path:
    """Bridge's own checkpoint save of the training model at iteration STEP."""
    from megatron.bridge.training.checkpointing import save_checkpoint
    from megatron.bridge.training.state import GlobalState

    # Bridge's get_rng_state (training/checkpointing.py:491) reads the CUDA RNG unconditionally.
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    state = GlobalState()
    state.cfg = container
    state.train_state.step = STEP
    save_checkpoint(state, [wrapped], None, None, num_floating_point_operations_so_far=0)
    ckpt = Path(container.checkpoint.save)
    it = ckpt / f"iter_{STEP:07d}"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(STEP)
    assert bridge.checkpointed_iteration(ckpt) == STEP
    for name in ("run_config.yaml", "train_state.pt", ".metadata", "modelopt_state"):
        assert (it / name).exists(), name
    return ckpt


def _perturb(params, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@pytest.mark.slow
def test_full_export_of_a_torch_dist_checkpoint_gives_the_megatron_logits(
        hf_pair, megatron, tmp_path, monkeypatch):
    container = bridge.config_container(_cfg(), hf_pair.student, hf_pair.teacher, tmp_path,
                                        world_size=1)
    wrapped, model = _build_on_cpu(container.model)
    student = [p for n, p in model.named_parameters() if not n.startswith("_teacher_model.")]
    assert student and all(p.dtype == torch.bfloat16 for p in student)
    _perturb(student, 0.05, seed=5)
    ckpt = _save_like_bridge(container, wrapped, monkeypatch)

    hf_out = tmp_path / "hf"
    bridge.export_in_fresh_process("kd", hf_pair.student, ckpt, hf_out)

    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # The student, not the co-located teacher.
    assert (config["num_hidden_layers"], config["hidden_size"]) == (STUDENT_LAYERS, 32)
    exported = load_file(str(hf_out / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"].float(), model.output_layer.weight.float())
    initial = load_file(str(hf_pair.student / "model.safetensors"))
    assert not torch.equal(exported["lm_head.weight"].float(), initial["lm_head.weight"])

    ids = _token_sequences(hf_pair.tokens)
    want = _megatron_logits(model, ids)
    got = _hf_logits(hf_out, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # The perturbation shows: the initial HF student gives other logits.
    assert (_hf_logits(hf_pair.student, ids) - want).abs().max() > 1e-2


@pytest.mark.slow
def test_lora_adapter_export_reads_the_run_config_and_merges_to_the_megatron_logits(
        hf_pair, megatron, tmp_path, monkeypatch):
    container, wrapped, model = _lora_kd_model(hf_pair, tmp_path)
    lora = container.peft
    # Not Bridge's defaults (LoRA(): dim 32, alpha 32): a fallback to them would show.
    assert (lora.dim, lora.alpha) == (4, 8)
    adapters = [p for n, p in model.named_parameters() if ".adapter." in n]
    assert len(adapters) == 2 * 4 * STUDENT_LAYERS
    assert not any(".adapter." in n for n, _ in model._teacher_model.named_parameters())
    _perturb(adapters, 0.1, seed=6)  # B (`linear_out`) starts at zero: now both are nonzero
    ckpt = _save_like_bridge(container, wrapped, monkeypatch)
    assert "peft:" in (ckpt / f"iter_{STEP:07d}" / "run_config.yaml").read_text()

    real_run = subprocess.run
    children = []

    def run_on_local_spec(cmd, **kwargs):
        assert cmd[1] == "-c" and "export_hf(" in cmd[2]  # the stage's own child command
        children.append(cmd)
        return real_run([cmd[0], "-c", LOCAL_SPEC_PRELUDE + cmd[2], *cmd[3:]], **kwargs)

    monkeypatch.setattr(bridge.subprocess, "run", run_on_local_spec)
    hf_out = tmp_path / "hf"
    bridge.export_in_fresh_process("lora_kd", hf_pair.student, ckpt, hf_out)
    assert len(children) == 1

    adapter_cfg = json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"]) == (4, 8)
    assert sorted(adapter_cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    ids = _token_sequences(hf_pair.tokens)
    want = _megatron_logits(model, ids)
    got = _hf_logits(hf_out, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # The adapters show: the base student alone gives other logits.
    assert (_hf_logits(hf_pair.student, ids) - want).abs().max() > 1e-2
