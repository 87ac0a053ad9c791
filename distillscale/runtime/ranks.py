"""Who writes: under srun every rank runs the same stages, and only rank 0 touches the disk.

The rank comes from torch.distributed once it is initialized, else from the `RANK` /
`WORLD_SIZE` variables the launchers export (the data stage runs before any process group
exists). Stages that every rank computes (training, pruning, evaluation) meet at barriers.

This module imports nothing else from the package, so the stage-folder writer
(`distillscale.manifest`) and the launchers can both build on it.
"""

from __future__ import annotations

import os


def _dist():
    try:
        # torch only once a rank is asked for: the manifest helpers (and the launchers that use
        # them) stay importable without loading torch.
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    """All ranks meet here; a no-op for one process or before any process group exists."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()
