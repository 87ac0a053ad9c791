"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint, then exit with the requeue code".

Slurm warns a job before its time limit or a preemption (`#SBATCH --signal=B:USR1@120` sends
SIGUSR1 to the batch shell, which forwards it to the tasks; a preemption sends SIGTERM to every
task). The handler only sets a flag: the training loop checks it after each optimizer step,
saves its regular checkpoint and raises `Preempted`, whose exit code tells the launcher to
`scontrol requeue` the job. The requeued job re-runs the same command; finished stages are
skipped by their manifests and the interrupted one resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". The launchers
# requeue on exactly this code and treat every other non-zero code as a real failure.
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested: int | None = None  # the signal number received, once one arrived
_installed = False


class Preempted(SystemExit):
    """The run stopped at a checkpoint because the scheduler asked it to.

    A `SystemExit` on purpose: every entry point (CLI, recipes, tools) then exits with
    `REQUEUE_EXIT_CODE` without catching it, and no `except Exception` on the way swallows it.
    An unfinished stage keeps its temp folder, so the checkpoint inside it survives.
    """

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _handler(signum, frame) -> None:
    global _requested
    if _requested is None:
        _requested = signum
        # Plain write: a signal handler must not take locks (rich's console does).
        os.write(2, f"\npreemption: {signal.Signals(signum).name} received; "
                    "will checkpoint after the current step\n".encode())


def install() -> bool:
    """Install the handlers for this process (idempotent). False where signals cannot be caught.

    Only the main thread may set signal handlers; elsewhere (e.g. a training loop run in a
    worker thread) the default behaviour is kept and the caller's checks simply never fire.
    """
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    _installed = True
    return True


def uninstall() -> None:
    """Restore the default handlers and clear the flag (tests, and code embedding the library)."""
    global _installed, _requested
    if _installed and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    _installed = False
    _requested = None


def requested() -> bool:
    """Whether any rank received a preemption signal.

    Under several ranks the decision is all-reduced (MAX) so that every rank stops after the
    same step: a rank that stopped alone would leave the others blocked in a collective.
    """
    flag = _requested is not None
    # heavy: torch, only on the path that needs it; the rest of this module stays light
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # heavy: torch, only on the path that needs it; the rest of this module stays light
        import torch

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def stop(where: str, checkpoint: Path | None, step: int | None) -> None:
    """Raise `Preempted` once every rank has finished writing its checkpoint."""
    # heavy: torch, only on the path that needs it; the rest of this module stays light
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    at = f" at step {step}" if step is not None else ""
    saved = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
    msg = f"{where}: preempted{at}{saved}; exiting with {REQUEUE_EXIT_CODE} (requeue)"
    print(msg, file=sys.stderr, flush=True)
    raise Preempted(msg)


def check(where: str) -> None:
    """Stop between stages when a signal arrived outside a training loop."""
    if requested():
        stop(where, None, None)
