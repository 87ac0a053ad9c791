"""The Bridge distillation path built and run through Megatron-Bridge's own hooks on CPU.

`bridge.distillation_provider` / `bridge.config_container` make the providers from tiny random
HF checkpoints (AutoBridge), Bridge's pre-wrap hooks load the weights, put in our criterion and
convert to ModelOpt's `DistillationModel` (the teacher built inside `_convert_hook`); one
forward, Bridge's own KD loss (`gpt_step._create_loss_function_modelopt` -> `loss_func_kd`) and
backward follow. What differs from the GPU run, on purpose: the local layer spec with the fusions
off (no transformer-engine), one gloo rank, and `use_cpu_initialization` forced on the teacher's
build (`_convert_hook` builds it with the default False, which moves it to CUDA).

bf16, as `bridge.model_provider` sets it, not fp32: megatron-core 0.19's cross-entropy
(tensor_parallel/cross_entropy.py, `calculate_logits_max` / `calculate_predicted_logits`) works
in place on `logits.float()`, a copy only when the logits are not fp32 already. In fp32 the LM
loss (alpha < 1) overwrites the student's logits with its softmax before ModelOpt's KD reads them.
"""

import functools
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillscale.config import ConfigError, load_config
from distillscale.distill import bridge
from distillscale.tokenizer import build_word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "conf" / "experiments" / "quickstart.yaml"
SEQ, BATCH = 16, 2
STUDENT_LAYERS, TEACHER_LAYERS = 2, 3
VOCAB, PADDED_VOCAB = 256, 320


def _cfg(*overrides):
    return load_config(QUICKSTART, [f"distill.seq_length={SEQ}", *overrides])


def _hf_model(folder: Path, layers: int, hidden: int, vocab: int, tok, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Wider than HF's default init (0.02): the two models' distributions are then far apart and
    # the KD term is not a rounding error.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    bridge._bridge_imports()
    tok = build_word_tokenizer([" ".join(f"w{i}" for i in range(200))], ["up", "down"])
    assert 200 < len(tok) <= VOCAB
    root = tmp_path_factory.mktemp("hf")
    return types.SimpleNamespace(
        tokens=len(tok),
        teacher=_hf_model(root / "teacher", TEACHER_LAYERS, 64, VOCAB, tok, seed=0),
        student=_hf_model(root / "student", STUDENT_LAYERS, 32, VOCAB, tok, seed=1),
        padded=_hf_model(root / "padded", STUDENT_LAYERS, 32, PADDED_VOCAB, tok, seed=1))


def _build_on_cpu(provider, extra_hooks=()):
    """Bridge's own `provide_distributed_model` (every registered pre-wrap hook runs, bf16 with
    the Float16Module wrapper as in training, no DDP) with what the CPU needs, mirrored onto the
    teacher by `DistillationProvider.__setattr__`. Returns (wrapped model, DistillationModel)."""
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.bridge.training.setup import _register_pre_wrap_hook
    from megatron.core.utils import unwrap_model

    provider.transformer_layer_spec = local_layer_spec
    provider.gradient_accumulation_fusion = False
    for flag in ("bias_activation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
                 "apply_rope_fusion", "persist_layer_norm"):
        setattr(provider, flag, False)
    provider.hidden_dropout = provider.attention_dropout = 0.0
    provider.finalize()  # what ConfigContainer.validate() does to the model provider
    assert provider.teacher.transformer_layer_spec is local_layer_spec  # mirrored
    teacher = provider.teacher
    teacher.provide_distributed_model = functools.partial(teacher.provide_distributed_model,
                                                          use_cpu_initialization=True)
    for hook in extra_hooks:
        _register_pre_wrap_hook(provider, hook)
    chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    assert len(chunks) == 1
    return chunks[0], unwrap_model(chunks[0])


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()
    mask[0, :3] = 0.0  # a prompt: no loss there
    return tokens, labels, mask


def _forward_and_bridge_loss(wrapped, vocab: int):
    """One forward of the (wrapped) DistillationModel and Bridge's KD loss; also the student's
    and the teacher's output-layer logits [s, b, v] (the student's still in the graph)."""
    from megatron.bridge.training.gpt_step import _create_loss_function_modelopt
    from megatron.core.utils import unwrap_model

    model = unwrap_model(wrapped)
    logits = {}
    hooks = [model.output_layer.register_forward_hook(
                 lambda m, i, o: logits.__setitem__("student", o[0])),
             model._teacher_model.output_layer.register_forward_hook(
                 lambda m, i, o: logits.__setitem__("teacher", o[0]))]
    tokens, labels, mask = _batch(vocab)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    # Explicit causal mask: with None, megatron-core 0.19's local attention builds it on "cuda".
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    wrapped.train()
    out = wrapped(tokens, positions, causal, labels=labels)
    for h in hooks:
        h.remove()
    loss_fn = _create_loss_function_modelopt(mask, wrapped, check_for_nan_in_loss=True,
                                             check_for_spiky_loss=False)
    loss, num_tokens, report = loss_fn(out)
    assert int(num_tokens) == int(mask.sum())
    return loss, report, logits, labels, mask


def _reference_divergence(zs, zt, kind: str, temperature: float):
    """Per-token divergence [b, s] from logits [s, b, v], written from the definitions (float64
    probabilities), independent of distillscale.distill.losses and of ModelOpt."""
    ps = torch.softmax(zs.double() / temperature, -1)
    pt = torch.softmax(zt.double() / temperature, -1)
    if kind == "forward_kl":
        d = (pt * (pt.log() - ps.log())).sum(-1)
    else:
        m = 0.5 * (ps + pt)
        d = 0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)
    return d.transpose(0, 1)


def _hf_weight(folder: Path, name: str) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))[name].to(torch.bfloat16)


def _student_and_teacher_params(model):
    named = dict(model.named_parameters())
    teacher = {n: p for n, p in named.items() if n.startswith("_teacher_model.")}
    student = {n: p for n, p in named.items() if n not in teacher}
    return student, teacher


# ----------------------------------------------------------------- forward, KD loss, backward


@pytest.mark.parametrize("kind,alpha,padded", [
    ("forward_kl", 1.0, False),  # ModelOpt's LogitsKLLoss, LM loss skipped
    ("jsd", 1.0, False),         # our DivergenceLogitsLoss through the criterion hook
    ("forward_kl", 0.75, False),  # LM loss kept, kd_loss_scale = 3
    ("jsd", 1.0, True),          # padded vocabularies 320 vs 256, aligned on the tokenizer's
])
def test_kd_loss_and_gradients_through_bridge_hooks(hf_models, megatron, kind, alpha, padded):
    import modelopt.torch.distill as mtd

    temperature = 2.0
    cfg = _cfg(f"distill.loss.kind={kind}", f"distill.loss.alpha={alpha}",
               f"distill.loss.temperature={temperature}")
    student_hf = hf_models.padded if padded else hf_models.student
    provider = bridge.distillation_provider(student_hf, hf_models.teacher, cfg,
                                            bridge.parallel_layout(cfg, 1))
    assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == 1
    wrapped, model = _build_on_cpu(provider)
    assert isinstance(model, mtd.DistillationModel)
    assert model.output_layer.weight.dtype == torch.bfloat16  # bf16_mixed, as on the GPU

    # Each model's own weight-loading hook ran: the student from its checkpoint, the teacher
    # (built inside Bridge's _convert_hook) from its own.
    assert torch.equal(model.output_layer.weight, _hf_weight(student_hf, "lm_head.weight"))
    assert torch.equal(model._teacher_model.output_layer.weight,
                       _hf_weight(hf_models.teacher, "lm_head.weight"))
    student_vocab = PADDED_VOCAB if padded else VOCAB
    assert model.output_layer.weight.shape[0] == student_vocab
    assert model._teacher_model.output_layer.weight.shape[0] == VOCAB
    (crit,) = model._layers_to_loss.values()
    ours = kind != "forward_kl" or padded
    assert type(crit).__name__ == ("DivergenceLogitsLoss" if ours else "LogitsKLLoss")

    real = hf_models.tokens if padded else VOCAB
    loss, report, logits, labels, mask = _forward_and_bridge_loss(wrapped, real)
    assert torch.isfinite(loss) and loss.ndim == 0
    zs, zt = logits["student"], logits["teacher"].detach()
    kd_ref = (_reference_divergence(zs[..., :real], zt[..., :real], kind, temperature)
              * mask).sum()
    kd = float(report["logits distillation loss"][0])
    assert kd == pytest.approx(float(kd_ref), rel=1e-4)
    assert float(kd_ref) > 1e-3 * float(mask.sum())  # the two models disagree: not 0 == 0

    if alpha == 1.0:
        assert float(report["lm loss"][0]) == 0.0  # skip_lm_loss: the student's CE is zeroed
        reference = kd_ref
    else:
        ce = torch.nn.functional.cross_entropy(
            zs.transpose(0, 1).reshape(-1, student_vocab).double(), labels.reshape(-1),
            reduction="none").view(BATCH, SEQ)
        lm_ref = (ce * mask).sum()
        assert float(report["lm loss"][0]) == pytest.approx(float(lm_ref), rel=1e-4)
        scale = alpha / (1 - alpha)
        # ModelOpt's balancer: KD rescaled to the LM loss's value, then weighted by the scale.
        assert float(loss) == pytest.approx(float(lm_ref) * (1 + scale), rel=1e-4)
        reference = lm_ref + scale * kd_ref * (lm_ref.detach() / kd_ref.detach())

    weight = model.output_layer.weight
    (want,) = torch.autograd.grad(reference, weight, retain_graph=True)
    loss.backward()
    student, teacher = _student_and_teacher_params(model)
    # bf16 gradients rounded in another order than the reference's (measured: < 0.1%).
    assert (weight.grad.float() - want.float()).norm() <= 5e-3 * want.float().norm()
    for name, p in student.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher.values())
    if padded:
        # KD only: the student's padding rows past the tokenizer get no gradient.
        assert weight.grad[real:].abs().sum() == 0
        assert (weight.grad[:real].abs().sum(-1) > 0).all()


def test_alpha_zero_is_refused_on_the_bridge_backend():
    # CE only cannot be expressed by ModelOpt's balancer (kd_loss_scale must be > 0); it used to
    # map to kd_loss_scale = 1, an equal KD : CE blend.
    with pytest.raises(ConfigError, match=r"distill.loss.alpha=0"):
        bridge.kd_config(_cfg("distill.loss.alpha=0").distill.loss)


# --------------------------------------------------------------------------- LoRA + KD


class _NoTimer:
    def __call__(self, *args, **kwargs):
        return self

    def start(self, *args, **kwargs):
        pass

    def stop(self, *args, **kwargs):
        pass

    def log(self, *args, **kwargs):
        pass


def _lora_kd_model(hf_models, tmp_path, targets=None):
    """The LoRA + KD model as Bridge's `setup` builds it: our ConfigContainer, then Bridge's own
    PEFT pre-wrap hook (loads `pretrained_checkpoint`, applies `cfg.peft`) registered after the
    KD conversion hook."""
    from megatron.bridge.training.setup import _create_peft_pre_wrap_hook

    cfg = _cfg("distill.method=lora_kd", "distill.lora_rank=4", "distill.lora_alpha=8")
    c = bridge.config_container(cfg, hf_models.student, hf_models.teacher, tmp_path,
                                world_size=1)
    if targets is not None:
        c.peft.target_modules = list(targets)
    state = types.SimpleNamespace(cfg=c, timers=_NoTimer(),
                                  train_state=types.SimpleNamespace(step=0))
    wrapped, model = _build_on_cpu(c.model, extra_hooks=[_create_peft_pre_wrap_hook(c, state)])
    return c, wrapped, model


def _adapters(model):
    from megatron.bridge.peft.lora_layers import LoRALinear

    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_lora_kd_adapters_are_the_students_only(hf_models, megatron, tmp_path):
    c, wrapped, model = _lora_kd_model(hf_models, tmp_path)
    assert c.peft.target_modules == bridge.MEGATRON_LORA_TARGETS
    adapters = _adapters(model)
    leaves = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
              "mlp.linear_fc2")
    assert sorted(adapters) == sorted(f"decoder.layers.{i}.{leaf}"
                                      for i in range(STUDENT_LAYERS) for leaf in leaves)
    student, teacher = _student_and_teacher_params(model)
    trainable = sorted(n for n, p in student.items() if p.requires_grad)
    assert trainable == sorted(f"{a}.adapter.{part}.weight" for a in adapters
                               for part in ("linear_in", "linear_out"))
    assert not any(p.requires_grad for p in teacher.values())
    assert c.peft.params_to_save == set(trainable)
    # The PEFT hook's reload of the student's HF checkpoint went into the student only.
    assert torch.equal(model.output_layer.weight,
                       _hf_weight(hf_models.student, "lm_head.weight"))
    assert torch.equal(model._teacher_model.output_layer.weight,
                       _hf_weight(hf_models.teacher, "lm_head.weight"))

    loss, _, _, _, _ = _forward_and_bridge_loss(wrapped, VOCAB)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in student.items():
        assert (p.grad is not None) == p.requires_grad, name
    # LoRA's B (`linear_out`) starts at zero: it gets the gradient, A (`linear_in`) none yet.
    assert all(student[n].grad.abs().sum() > 0 for n in trainable if "linear_out" in n)
    assert all(p.grad is None for p in teacher.values())


def test_bridge_default_lora_targets_would_wrap_the_teacher(hf_models, megatron, tmp_path):
    """Why MEGATRON_LORA_TARGETS is anchored: Bridge's default bare leaf names also match the
    linears of ModelOpt's co-located `_teacher_model`, giving the teacher trainable adapters."""
    from megatron.bridge.peft.lora import LoRA

    _, _, model = _lora_kd_model(hf_models, tmp_path, targets=LoRA().target_modules)
    on_teacher = [a for a in _adapters(model) if a.startswith("_teacher_model.")]
    assert len(on_teacher) == 4 * TEACHER_LAYERS
    _, teacher = _student_and_teacher_params(model)
    assert sum(p.requires_grad for p in teacher.values()) == 2 * 4 * TEACHER_LAYERS
