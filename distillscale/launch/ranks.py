"""Who writes: under srun every rank runs the same stages, and only rank 0 touches the disk.

The rank comes from torch.distributed once it is initialized, else from the `RANK` /
`WORLD_SIZE` variables the launchers export (the data stage runs before any process group
exists). Stages that every rank computes (training, pruning, evaluation) meet at barriers;
stages that only rank 0 computes (data, fit) make the other ranks wait for the finished
manifest on the shared file system.

The rank queries live in `distillscale.runtime.ranks` (re-exported here); this module adds the
wait that needs the manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distillscale.manifest import is_up_to_date
from distillscale.runtime.ranks import barrier, is_rank_zero, rank, world_size

__all__ = ["barrier", "is_rank_zero", "rank", "wait_for_stage", "world_size"]


def wait_for_stage(
    folder: Path, config_hash: str, inputs: dict[str, Path], timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> Path:
    """Block a non-zero rank until rank 0 has finished `folder` with a matching manifest.

    If rank 0 dies, srun's `--kill-on-bad-exit=1` ends this rank too; the timeout
    (`DISTILLSCALE_STAGE_WAIT_S`, default 24 h) is a last resort for other launchers.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("DISTILLSCALE_STAGE_WAIT_S", str(24 * 3600)))
    deadline = time.monotonic() + timeout_s
    while not is_up_to_date(folder, config_hash, inputs):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{folder}: rank {rank()} waited {timeout_s:.0f}s for rank 0 to finish this stage"
            )
        time.sleep(poll_s)
    return Path(folder)
