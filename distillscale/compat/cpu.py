"""Compatibility shims that let NVIDIA's GPU stack (megatron-core 0.19, ModelOpt 0.47,
Megatron-Bridge 0.6) run on a CPU-only machine with the same versions as the NGC container.

Every shim here is active only when CUDA is absent (`apply_cpu_shims()` is a no-op on GPU) and
says why it exists and which upstream version needs it. Nothing else in the package patches
library internals.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

_APPLIED: set[str] = set()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_shims() -> None:
    """Apply the megatron-core CPU shims (idempotent). No-op when CUDA is available."""
    if cuda_available() or "core" in _APPLIED:
        return
    _patch_current_device()
    _patch_rng_tracker()
    _APPLIED.add("core")


def _patch_current_device() -> None:
    # megatron-core 0.19: RoPE (`rotary_pos_embedding.py`) and the global memory buffer build
    # tensors on `torch.cuda.current_device()`; on CPU that call raises. Point it at the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


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
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = _manual_seed


def install_transformer_engine_stub() -> None:
    """Import-only stand-in for transformer-engine, for ModelOpt 0.47's Megatron plugins.

    `modelopt/torch/nas/plugins/megatron.py` (0.47) does `import transformer_engine as te` and
    uses `te.pytorch.LayerNorm` / `te.pytorch.RMSNorm` as registry keys, and megatron-core 0.19
    leaves its TE wrapper classes as MagicMock/None when TE is missing. The real TE wheels must
    NOT be installed on CPU (their torch extension is source-only; megatron-core then fails to
    import). The placeholders below are never instantiated: the local layer spec never builds
    them; they only have to be distinct `nn.Module` classes so registries can key on them.
    """
    if cuda_available() or "te_stub" in _APPLIED:
        return
    import megatron.core.extensions.transformer_engine as mte  # noqa: F401  (must come first)

    if "transformer_engine" not in sys.modules:
        te = types.ModuleType("transformer_engine")
        te.__path__ = []  # type: ignore[attr-defined]
        te.__version__ = "0.0.0+cpu-stub"
        te_pt = types.ModuleType("transformer_engine.pytorch")
        for name in ("LayerNorm", "RMSNorm", "Linear", "LayerNormLinear"):
            setattr(te_pt, name, type(name, (torch.nn.Module,), {"__module__": te_pt.__name__}))
        te.pytorch = te_pt  # type: ignore[attr-defined]
        sys.modules["transformer_engine"] = te
        sys.modules["transformer_engine.pytorch"] = te_pt
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
