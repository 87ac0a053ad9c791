"""One training loop for every stage that updates weights (teacher training, distillation).

Resumable: a checkpoint (weights, optimizer, step) is written atomically every
`checkpoint_every` steps and picked up on restart; batches are a pure function of (seed, step),
so a resumed run sees exactly the batches the killed one would have. A non-finite loss stops the
run with the step number, keeping the last good checkpoint.

A checkpoint carries the fingerprint of what made it (training settings, seed, data size, the
parameters' names and shapes) and is resumed only by a run with the same fingerprint; another
one is set aside (`<name>.stale`, removed once the new run finishes). Partial checkpoint files of
a failed write are removed at once and at the next start; free space is checked before each
checkpoint write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from distillscale.compat.console import stderr_console
from distillscale.config import TrainConfig
from distillscale.manifest import DiskSpaceError, atomic_path, check_free_space, remove_partials
from distillscale.train import preemption


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to `min_lr` (the Megatron default schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([seed, step])
    return rng.choice(n, size=min(batch_size, n), replace=False)


def checkpoint_fingerprint(model: torch.nn.Module, cfg: TrainConfig, seed: int,
                           num_examples: int, desc: str) -> str:
    """What a checkpoint must have been made by to be resumed: the training settings, seed,
    data size, and the model's parameter names, shapes and dtypes."""
    payload = {
        "train": cfg.model_dump(mode="json"), "seed": seed, "num_examples": num_examples,
        "desc": desc,
        # Wrapped models (ModelOpt's DistillationModel) also hold non-tensor entries (None
        # extra states): only tensors describe the model's shape.
        "params": [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()
                   if isinstance(v, torch.Tensor)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _checkpoint_bytes(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> int:
    """Size of a checkpoint: the weights plus AdamW's two moments of each trained parameter."""
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values()
                  if isinstance(v, torch.Tensor))
    moments = sum(2 * p.numel() * 4 for p in params if p.requires_grad)
    return weights + moments


def _save_checkpoint(path: Path, model, optimizer, step: int, history: list,
                     fingerprint: str | None = None, needed_bytes: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, needed_bytes, f"the checkpoint {path.name}")
    try:
        with atomic_path(path) as tmp:  # never leaves a partial checkpoint behind
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "history": history, "fingerprint": fingerprint},
                tmp,
            )
    except BaseException as e:
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, DiskSpaceError):
            # torch reports a failed write as "[enforce fail at inline_container.cc:...]
            # unexpected pos ..."; say what was being written and how much room is left.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            free = shutil.disk_usage(path.parent).free
            raise DiskSpaceError(
                f"{path}: writing the checkpoint at step {step} failed ({first}); "
                f"{free / 2**20:.1f} MiB free, it needs about {needed_bytes / 2**20:.1f} MiB"
            ) from e
        raise


def _load_checkpoint(checkpoint: Path, fingerprint: str, desc: str) -> dict | None:
    """The checkpoint's state if this run made it; otherwise it is set aside (one line)."""
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("fingerprint") == fingerprint:
        return state
    stale = checkpoint.with_name(checkpoint.name + ".stale")
    os.replace(checkpoint, stale)
    stderr_console().print(
        f"{desc}: the checkpoint {checkpoint} was made with other settings (step "
        f"{state.get('step')}); moved to {stale.name}, starting from step 0")
    return None


def _sort_after_existing_events(folder: Path) -> None:
    """Wait (at most a second) until a new event file sorts after the existing ones.

    TensorBoard reads event files in name order (`events.out.tfevents.<unix seconds>.<host>.
    <pid>...`) and a resumed writer's `purge_step` only drops events read before it; a resumed
    run started within the killed run's second could sort first (by pid) and the killed run's
    late events would survive.
    """
    stamps = []
    for p in folder.glob("events.out.tfevents.*"):
        parts = p.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[np.ndarray, int], tuple[torch.Tensor, dict]],
    num_examples: int,
    cfg: TrainConfig,
    seed: int,
    checkpoint: Path,
    desc: str,
    eval_fn: Callable[[int], dict] | None = None,
    tensorboard_dir: Path | None = None,
) -> TrainResult:
    """Minimise `loss_fn(batch_indices, step)` over `cfg.steps` steps with AdamW.

    Each step's batch is split into `cfg.grad_accum_steps` micro-batches; `loss_fn` is called
    once per micro-batch (it must return a mean over its examples) and the gradients of the
    micro-batch losses, each weighted by its share of the batch, add up to the full batch's.
    Logged scalars (loss, lr, everything `loss_fn` and `eval_fn` return) go to TensorBoard in
    `tensorboard_dir` when given; a resumed run drops the events the killed run logged after
    its checkpoint (`purge_step`), so the curves continue without duplicates.
    """
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    preemption.install()
    checkpoint = Path(checkpoint)
    remove_partials(checkpoint.parent)  # a write cut short by a kill or a full disk
    fingerprint = checkpoint_fingerprint(model, cfg, seed, num_examples, desc)
    needed = _checkpoint_bytes(model, params)

    def save(done: int) -> None:
        _save_checkpoint(checkpoint, model, optimizer, done, history, fingerprint, needed)

    start, history = 0, []
    state = _load_checkpoint(checkpoint, fingerprint, desc)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    writer = None
    if tensorboard_dir is not None:
        # heavy: torch's TensorBoard writer loads tensorboard (and its protobufs); only when a
        # run logs scalars.
        from torch.utils.tensorboard import SummaryWriter

        # Events after the checkpoint (steps > start) were logged by a killed run: drop them.
        _sort_after_existing_events(Path(tensorboard_dir))
        writer = SummaryWriter(str(tensorboard_dir), purge_step=start + 1 if start else None)
    model.train()
    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), transient=False,
        ) as progress:
            task = progress.add_task(desc, total=cfg.steps, completed=start, info="")
            for step in range(start, cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                idx = batch_indices(num_examples, cfg.batch_size, seed, step)
                optimizer.zero_grad(set_to_none=True)
                loss_sum, logs = 0.0, {}
                for micro in np.array_split(idx, min(cfg.grad_accum_steps, len(idx))):
                    micro_loss, micro_logs = loss_fn(micro, step)
                    if not torch.isfinite(micro_loss):
                        kept = checkpoint if checkpoint.is_file() else "(none yet)"
                        raise NonFiniteLossError(
                            f"{desc}: non-finite loss ({micro_loss.item()}) at step {step}; "
                            f"last good checkpoint kept at {kept}"
                        )
                    share = len(micro) / len(idx)
                    (micro_loss * share).backward()
                    loss_sum += float(micro_loss.detach()) * share
                    for k, v in micro_logs.items():  # batch means of the micro-batch logs
                        logs[k] = logs.get(k, 0.0) + v * share if isinstance(v, float) else v
                loss = torch.tensor(loss_sum)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    rec = {"step": done, "loss": float(loss.detach()), **logs}
                    if eval_fn is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                        model.eval()
                        rec.update(eval_fn(done))
                        model.train()
                    history.append(rec)
                    if writer is not None:
                        writer.add_scalar(f"{desc}/lr", lr_at(step, cfg), done)
                        for k, v in rec.items():
                            if k != "step" and isinstance(v, (int, float)):
                                writer.add_scalar(f"{desc}/{k}", v, done)
                        writer.flush()
                    progress.update(task, info=" ".join(
                        f"{k}={v:.4g}" for k, v in rec.items()
                        if k != "step" and isinstance(v, float)
                    ))
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    save(done)
                progress.update(task, completed=done)
                if done < cfg.steps and preemption.requested():  # SIGUSR1/SIGTERM from Slurm
                    save(done)
                    preemption.stop(desc, checkpoint, done)
    finally:
        if writer is not None:
            writer.close()
    model.eval()
    checkpoint.with_name(checkpoint.name + ".stale").unlink(missing_ok=True)
    return TrainResult(steps=cfg.steps, resumed_from=start, history=history)
