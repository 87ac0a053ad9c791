"""Compatibility shims that let NVIDIA's GPU stack (megatron-core 0.19, ModelOpt 0.47,
Megatron-Bridge 0.6) run on a CPU-only machine with the same versions as the NGC container.

`activate()` switches every CPU shim on, once per process (idempotent, cheap after the first
call, a no-op when CUDA is available): the megatron-core ones and the transformer-engine import
stub at once, those of peft and of ModelOpt's Minitron plugin when those modules are imported
(post-import hooks, so a process that never prunes or adds LoRA adapters never imports them).
Code that builds a Megatron model calls it first; nothing depends on import order. One shim is
scoped instead of switched on: `tensor_cuda_as_identity()`, around the library calls that move
tensors to the GPU before a collective (pruning over several gloo ranks). Each shim says
why it exists and which upstream version needs it. The one patch that applies on every device,
`restore_student_methods` (ModelOpt's distillation export), is here too, so that nothing else in
the package patches library internals.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import sys
import types

import torch
import torch.distributed as dist
import wrapt

_APPLIED: set[str] = set()


def cuda_available() -> bool:
    return torch.cuda.is_available()


_REAL_TE: list[bool] = []


def real_transformer_engine() -> bool:
    """True when the real transformer-engine imports (CUDA present, TE installed with its
    built extension). On CPU it is never imported: only the import-only stub below may be.
    A GPU machine without TE (a bare CUDA + torch image) runs the local layer spec, with the
    same stub and local-spec adapters as the CPU."""
    if not _REAL_TE:
        ok = False
        if cuda_available():
            if "transformer_engine" in sys.modules:
                ok = not str(getattr(sys.modules["transformer_engine"], "__version__",
                                     "")).endswith("cpu-stub")
            else:
                try:
                    importlib.import_module("transformer_engine.pytorch")
                    ok = True
                # A wheel without its built torch extension raises FileNotFoundError (OSError).
                except (ImportError, OSError, RuntimeError):
                    ok = False
        _REAL_TE.append(ok)
    return _REAL_TE[0]


def activate() -> None:
    """Switch on every CPU shim (idempotent). No-op with CUDA and the real transformer-engine;
    on CUDA without TE (the local layer spec on a GPU) only the TE stub and the local-spec
    adapters apply."""
    if "core" in _APPLIED or real_transformer_engine():
        return
    if not cuda_available():
        _patch_current_device()
        _patch_rng_tracker()
    # Before any ModelOpt import: ModelOpt 0.47 registers its Megatron plugins (Minitron,
    # distillation) only if `import transformer_engine` succeeds at its own import time, and
    # silently skips them otherwise (`mtp.mcore_minitron` then does not exist). The same stub
    # makes `import megatron.bridge` (Megatron-Bridge 0.6.2) work: it carries the
    # `te.pytorch.ops.Sequential` Bridge needs.
    _install_transformer_engine_stub()
    # Each runs now if its module is already imported, else right after that import.
    wrapt.register_post_import_hook(_peft_shim, "peft.tuners.lora.te")
    wrapt.register_post_import_hook(_minitron_shims,
                                    "modelopt.torch.prune.plugins.mcore_minitron")
    _APPLIED.add("core")


def _patch_current_device() -> None:
    # megatron-core 0.19: RoPE (`rotary_pos_embedding.py`) and the global memory buffer build
    # tensors on `torch.cuda.current_device()`; on CPU that call raises. Point it at the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # megatron-core 0.19 dist-checkpointing (`filesystem_async.preload_tensors`) synchronizes
    # CUDA before writing, unconditionally; with no device there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


class CPURNGStatesTracker:
    """Stand-in for megatron-core's CudaRNGStatesTracker backed by the CPU generator.

    megatron-core 0.19 forks a CUDA RNG state around weight init and dropout in tensor-parallel
    regions (`get_cuda_rng_tracker().fork()`); CUDA generators do not exist on CPU. Forking the
    CPU generator keeps init reproducible and leaves the default stream untouched.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        gen = torch.Generator().manual_seed(seed)
        self.seeds_.add(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            yield
            return
        saved = torch.random.get_rng_state()
        torch.random.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.random.get_rng_state()
            torch.random.set_rng_state(saved)


def _patch_rng_tracker() -> None:
    # heavy: megatron-core, only where a Megatron model is built or run
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def _manual_seed(seed: int, *args, **kwargs) -> None:
        # Same seed offsets as megatron-core's model_parallel_cuda_manual_seed.
        from megatron.core import parallel_state

        torch.manual_seed(seed)
        tracker = mrandom._CUDA_RNG_STATE_TRACKER
        tracker.reset()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
        tracker.add("expert-parallel-rng", seed + 2718 + 100 * tp_rank + 1)
        tracker.add("data-parallel-rng", seed)

    mrandom.model_parallel_cuda_manual_seed = _manual_seed
    # heavy: megatron-core, only where a Megatron model is built or run
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = _manual_seed


def _stub_module(name: str) -> types.ModuleType:
    # A real `__spec__`: with None, `importlib.util.find_spec("transformer_engine")` raises
    # ValueError, which transformers 5.12's availability checks (`from transformers import
    # Trainer`) and so ModelOpt 0.47's HF plugins do not catch.
    mod = types.ModuleType(name)
    mod.__path__ = []  # type: ignore[attr-defined]
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = mod
    return mod


def _peft_shim(peft_te) -> None:
    """peft 0.21 on CPU, next to the transformer-engine stub (`peft.tuners.lora.te`).

    The import-only stub makes peft believe TE is present; its TE dispatcher then reads
    `te.pytorch.LayerNormMLP`, which the stub lacks. Models peft wraps here are transformers
    models with no TE layers, so that dispatch never applies.
    """
    if real_transformer_engine():
        return
    peft_te.is_te_pytorch_available = lambda: False


def _install_transformer_engine_stub() -> None:
    """Import-only stand-in for transformer-engine, for ModelOpt 0.47's Megatron plugins.

    `modelopt/torch/nas/plugins/megatron.py` (0.47) does `import transformer_engine as te` and
    uses `te.pytorch.LayerNorm` / `te.pytorch.RMSNorm` as registry keys, and megatron-core 0.19
    leaves its TE wrapper classes as MagicMock/None when TE is missing. The real TE wheels must
    NOT be installed on CPU (their torch extension is source-only; megatron-core then fails to
    import). The placeholders below are never instantiated: the local layer spec never builds
    them; they only have to be distinct `nn.Module` classes so registries can key on them.
    """
    if real_transformer_engine() or "te_stub" in _APPLIED:
        return
    # heavy: megatron-core, only where a Megatron model is built or run
    import megatron.core.extensions.transformer_engine as mte

    if "transformer_engine" not in sys.modules:
        te = _stub_module("transformer_engine")
        te.__version__ = "0.0.0+cpu-stub"
        te_pt = _stub_module("transformer_engine.pytorch")
        for name in ("LayerNorm", "RMSNorm", "Linear", "LayerNormLinear"):
            setattr(te_pt, name, type(name, (torch.nn.Module,), {"__module__": te_pt.__name__}))
        # Megatron-Bridge 0.6.2 `peft/lora_layers.py` names `te.ops.Sequential` in annotations
        # evaluated at class definition, reached by `import megatron.bridge`.
        ops = _stub_module("transformer_engine.pytorch.ops")
        ops.Sequential = type("Sequential", (torch.nn.Module,), {"__module__": ops.__name__})
        te_pt.ops = ops  # type: ignore[attr-defined]
        te.pytorch = te_pt  # type: ignore[attr-defined]
    for name in (
        "TEColumnParallelGroupedLinear",
        "TEColumnParallelLinear",
        "TEDotProductAttention",
        "TELayerNormColumnParallelLinear",
        "TELinear",
        "TERowParallelGroupedLinear",
        "TERowParallelLinear",
    ):
        current = getattr(mte, name, None)
        if not (isinstance(current, type) and issubclass(current, torch.nn.Module)):
            setattr(mte, name, type(name, (torch.nn.Module,), {"__module__": mte.__name__}))
    _APPLIED.add("te_stub")


@contextlib.contextmanager
def tensor_cuda_as_identity():
    """Within the block, on a machine without CUDA, `Tensor.cuda()` returns the tensor itself
    (restored on exit; a no-op context with CUDA). For library code that moves tensors to the
    GPU unconditionally before a collective, which gloo runs on CPU tensors as they are:

    - ModelOpt 0.47's object collectives, `modelopt/torch/utils/distributed.py` `broadcast`
      (line 128) and `allgather` (line 158), used by the Minitron conversion
      (`modelopt/torch/nas/plugins/megatron.py` `_DynamicMCoreLanguageModel._setup`) at world
      size > 1;
    - megatron-core 0.19's tied-embedding sync across pipeline stages
      (`models/common/language_module/language_module.py:307`,
      `setup_embeddings_and_output_layer`: `weight.data = weight.data.cuda()`) at PP > 1.

    With one process neither runs. Scoped, not process-wide, so a stray `.cuda()` elsewhere
    still fails loudly on CPU.
    """
    if cuda_available():
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = saved  # type: ignore[method-assign]


# =============================================================================================
# BEGIN ModelOpt Minitron pruning on CPU (local layer spec) -- used by distillscale.prune
# =============================================================================================
#
# ModelOpt 0.47's `mcore_minitron` mode prunes megatron-core GPT models built with the
# transformer-engine layer spec. On CPU the model is built with the *local* spec (torch RMSNorm,
# DotProductAttention, Column/RowParallelLinear with separate layernorms), which 0.47 does not
# handle. The adapters below only register / subclass ModelOpt's own dynamic modules; the
# importance estimation, sorting, layer ranking and slicing logic all stay ModelOpt's.


def _minitron_shims(mcore_minitron) -> None:
    """Let ModelOpt 0.47 Minitron prune a local-spec GPTModel (run once, when `mcore_minitron`
    is imported). No-op with the real transformer-engine: the GPU path then builds the TE spec,
    which ModelOpt supports as is. On CUDA without TE (local spec on GPU) the local-spec
    adapters apply and the layer-drop CPU workaround does not (NCCL takes CUDA tensors)."""
    if real_transformer_engine() or "modelopt_prune" in _APPLIED:
        return
    _register_dynamic_torch_rmsnorm()
    _register_dynamic_local_self_attention()
    _adapt_hidden_size_hooks_to_local_spec(mcore_minitron)
    if not cuda_available():
        _make_layer_drop_cpu_safe(mcore_minitron)
    _APPLIED.add("modelopt_prune")


def _convert_to(dm_cls: type, module: torch.nn.Module, **setup_kwargs):
    """Convert `module` in place into `dm_cls` mixed over its own class (what ModelOpt's DMRegistry
    generates for registered classes), for modules ModelOpt converts without the registry."""
    cls = type(f"{dm_cls.__name__}_{type(module).__name__}", (dm_cls, type(module)), {})
    return cls.convert(module, **setup_kwargs)


def _register_dynamic_torch_rmsnorm() -> None:
    # ModelOpt 0.47 converts every TransformerLayer layernorm that is not an IdentityOp, and the
    # final layernorm, through DMRegistry. The local spec builds `torch.nn.RMSNorm`, which has no
    # registered dynamic module (KeyError). Reuse ModelOpt's TE-norm dynamic module (weight sliced
    # by the shared hidden_size hparam) and make `normalized_shape` dynamic too, since
    # F.rms_norm checks it against the input width.
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.plugins.megatron import _DynamicTENorm
    from modelopt.torch.nas.registry import DMRegistry

    if DMRegistry.get(torch.nn.RMSNorm) is not None:
        return

    class _DynamicTorchRMSNorm(_DynamicTENorm):
        def _setup(self, *, num_features):
            super()._setup(num_features=num_features)
            self._register_dynamic_attribute(
                "normalized_shape", _DynamicLayerNorm._get_normalized_shape
            )

    DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})(_DynamicTorchRMSNorm)


def _register_dynamic_local_self_attention() -> None:
    # ModelOpt 0.47 `_DynamicSelfAttention` prunes heads only through TE modules: it asserts the
    # core attention is `TEDotProductAttention` and converts linear_qkv / linear_proj into TE
    # dynamic classes (TE names: in_features, out_features, layer_norm_weight). Without this,
    # conversion fails on the local spec (or, with the assert bypassed, a smaller head count is
    # silently not applied to the weights). The local modules store the same fused QKV layout
    # ([q_0..q_n, k, v] per query group), so ModelOpt's own head-index functions are reused and
    # only the local attribute names (input_size/output_size[_per_partition],
    # hidden_size_per_partition) are made dynamic.
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from modelopt.torch.nas.plugins import megatron as mnas
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.opt.dynamic import DynamicModule

    te_qkv = mnas._DynamicTEQKVLayerNormColumnParallelLinear
    te_proj = mnas._DynamicTEProjRowParallelLinear

    class _DynamicLocalCoreAttention(DynamicModule):
        def _setup(self, *, num_attention_heads):
            self._register_dynamic_attribute(
                "num_attention_heads_per_partition", lambda mod, val: num_attention_heads.active
            )
            self._register_dynamic_attribute(
                "hidden_size_per_partition",
                lambda mod, val: num_attention_heads.active * mod.hidden_size_per_attention_head,
            )

    class _DynamicLocalQKV(DynamicModule):
        _get_output_size_indices = te_qkv._get_output_size_indices
        _get_weight = staticmethod(te_qkv._get_weight)
        _get_bias = staticmethod(te_qkv._get_bias)

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("input_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)

            def out_size(mod, val):
                return (num_attention_heads.active + 2 * mod.config.num_query_groups) * (
                    mod.config.kv_channels
                )

            self._register_dynamic_attribute("output_size", out_size)
            self._register_dynamic_attribute("output_size_per_partition", out_size)
            self._register_dynamic_attribute("weight", self._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", self._get_bias)

    class _DynamicLocalProj(DynamicModule):
        _get_input_size_indices = te_proj._get_input_size_indices
        _get_weight = staticmethod(te_proj._get_weight)
        _get_bias = staticmethod(te_proj._get_bias)

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("output_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)

            def in_size(mod, val):
                return num_attention_heads.active * mod.config.kv_channels

            self._register_dynamic_attribute("input_size", in_size)
            self._register_dynamic_attribute("input_size_per_partition", in_size)
            self._register_dynamic_attribute("weight", self._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", self._get_bias)

    class _DynamicLocalSelfAttention(mnas._DynamicSelfAttention):
        _distillscale_local_spec = True

        def _setup(self, *, hidden_size):
            if not (
                isinstance(self.core_attention, DotProductAttention)
                and self._prunes_attention_heads()
            ):
                super()._setup(hidden_size=hidden_size)
                return
            # Same hparam and head-count attribute as ModelOpt's TE path.
            heads = mnas.NumAttentionHeadsHp(
                self.num_attention_heads_per_partition, self.num_query_groups_per_partition
            )
            self._register_hparam("num_attention_heads", heads)
            self._register_dynamic_attribute(
                "num_attention_heads_per_partition", lambda mod, val: mod.num_attention_heads
            )
            _convert_to(_DynamicLocalCoreAttention, self.core_attention, num_attention_heads=heads)
            kw = {"num_attention_heads": heads, "hidden_size": hidden_size}
            _convert_to(_DynamicLocalQKV, self.linear_qkv, **kw)
            _convert_to(_DynamicLocalProj, self.linear_proj, **kw)

    if getattr(DMRegistry.get(SelfAttention), "_distillscale_local_spec", False):
        return
    key = DMRegistry.get_key(SelfAttention)
    DMRegistry.unregister(SelfAttention)
    DMRegistry.register({SelfAttention: key})(_DynamicLocalSelfAttention)


def _adapt_hidden_size_hooks_to_local_spec(mcore_minitron) -> None:
    # ModelOpt 0.47 ranks hidden_size channels by the layernorm output that TE's fused
    # LayerNorm+Linear returns with `return_layernorm_output=True`: its hook on linear_qkv /
    # linear_fc1 unpacks `((out, ln_out), bias)` and reads `te_return_bias`. On the local spec the
    # layernorm is a separate module whose output *is* the linear's input, so ModelOpt's own hook
    # is handed that tuple (and returns the unchanged `(out, bias)`).
    base = mcore_minitron.ImportanceEstimatorRegistry
    if getattr(base, "_distillscale_local_spec", False):
        return

    class _LocalSpecImportanceRegistry(base):
        _distillscale_local_spec = True

        def register_hook(self, module, hook_fn, hook_type="forward", **hook_kwargs):
            fn = getattr(hook_fn, "func", None)
            if (
                hook_type == "forward"
                and getattr(fn, "__name__", "") == "_fused_ln_linear_forward_hook"
                and not hasattr(module, "te_return_bias")
            ):
                as_te = types.SimpleNamespace(te_return_bias=False)  # stable id per module
                fused_hook = hook_fn

                def hook_fn(mod, inputs, output):
                    out, bias = output
                    return fused_hook(as_te, inputs, ((out, inputs[0]), bias))

            super().register_hook(module, hook_fn, hook_type, **hook_kwargs)

    mcore_minitron.ImportanceEstimatorRegistry = _LocalSpecImportanceRegistry


def _make_layer_drop_cpu_safe(mcore_minitron) -> None:
    # ModelOpt 0.47 `drop_mcore_language_model_layers` (depth pruning) moves its per-PP-rank
    # layer counters to `.cuda()` and all-gathers a 0-dim tensor, which gloo rejects. Run it with
    # `Tensor.cuda` as the identity and 0-dim inputs of that all-gather reshaped to 1-D.
    orig = mcore_minitron.drop_mcore_language_model_layers
    if getattr(orig, "_distillscale_cpu_safe", False):
        return

    @functools.wraps(orig)
    def drop_layers(model, *, layers_to_drop):
        saved_gather = dist.all_gather_into_tensor

        def gather(output, inp, *args, **kwargs):
            return saved_gather(output, inp.reshape(1) if inp.dim() == 0 else inp, *args, **kwargs)

        dist.all_gather_into_tensor = gather
        try:
            with tensor_cuda_as_identity():
                return orig(model, layers_to_drop=layers_to_drop)
        finally:
            dist.all_gather_into_tensor = saved_gather

    drop_layers._distillscale_cpu_safe = True  # type: ignore[attr-defined]
    mcore_minitron.drop_mcore_language_model_layers = drop_layers


# =============================================================================================
# END ModelOpt Minitron pruning on CPU
# =============================================================================================


# =============================================================================================
# ModelOpt distillation export (every device)
# =============================================================================================


def restore_student_methods(student) -> None:
    """Let a student exported from ModelOpt's distillation run as a plain model again.

    `adjust_distillation_model_for_mcore` (ModelOpt 0.47) binds forward / loss / PP helpers on
    the instance; `mtd.export` restores the class but leaves those bindings, whose forward then
    looks for the removed teacher. Dropping them lets the class methods apply again. Needed on
    GPU and CPU alike.
    """
    for name in ("forward", "sharded_state_dict", "compute_language_model_loss",
                 "set_student_input_tensor_shape", "set_input_tensor"):
        student.__dict__.pop(name, None)
