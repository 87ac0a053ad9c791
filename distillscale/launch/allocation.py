"""The launch plan of one job: how many tasks, which parallel layout, checked against the allocation.

Each launcher asks for its plan before any GPU work (`distillscale launch plan ...`), so a
layout that cannot fit is one clear error at submission or at the start of the job, never a
hang inside NCCL initialisation.

Kinds of job (what the launcher runs decides how processes map onto GPUs):
- `prune_distill`: Megatron training, one srun task per GPU, world = TP x PP x DP;
- `teacher`, `eval`: one vLLM engine per node spanning `launch.vllm_tensor_parallel` GPUs;
- `data`, `fit`: one task (CPU; a data job on a GPU cluster gets the GPUs of its served LLM
  generator, or one for Curator's cuDF dedup).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from distillscale.config import ConfigError, ExperimentConfig

KINDS = ("prune_distill", "teacher", "eval", "data", "fit")


@dataclass(frozen=True)
class LaunchPlan:
    kind: str
    name: str
    run_dir: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    vllm_tensor_parallel: int
    # Shown by the launchers' plan line; the recipe reads them from the same config + overrides.
    sequence_parallel: bool
    distill_backend: str
    image: str
    mounts: str
    time: str
    partition: str
    account: str

    def shell(self) -> str:
        """`DS_KEY=value` lines, shell-quoted, for `eval` in the launchers."""
        return "".join(
            f"DS_{k.upper()}={shlex.quote(str(v))}\n" for k, v in asdict(self).items()
        )


def plan_launch(
    cfg: ExperimentConfig,
    kind: str,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    repo: Path | None = None,
    image: str | None = None,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    extra_mounts: list[str] | None = None,
) -> LaunchPlan:
    """The plan for `kind`; arguments given here (flags, env, the allocation) win over `launch.*`.

    Raises ConfigError with the keys to change when the layout does not fit.
    """
    if kind not in KINDS:
        raise ConfigError(f"launch plan: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if kind in ("data", "fit") and nodes is None:
        nodes = 1
    lc = cfg.launch
    nodes = lc.nodes if nodes is None else nodes
    gpus = gpus_per_node
    if gpus is None:
        # launch.gpus_per_node sizes the training job; a vLLM job asks for the GPUs its engine
        # spans, and data / fit jobs run on CPU unless told otherwise.
        if kind == "prune_distill":
            gpus = lc.gpus_per_node
        elif kind in ("teacher", "eval"):
            gpus = lc.vllm_tensor_parallel if lc.gpus_per_node > 0 else 0
        elif kind == "data" and lc.gpus_per_node > 0:
            gpus = _data_gpus(cfg)
        else:
            gpus = 0
    if nodes < 1:
        raise ConfigError(f"launch plan: nodes must be at least 1 (got {nodes})")
    if gpus < 0:
        raise ConfigError(f"launch plan: gpus per node must be 0 (CPU) or more (got {gpus})")
    tp, pp, vtp = lc.tensor_parallel, lc.pipeline_parallel, lc.vllm_tensor_parallel
    where = f"{nodes} node(s) x {gpus} GPU(s)"

    if kind == "prune_distill":
        tasks_per_node = gpus if gpus > 0 else 1
        world = nodes * tasks_per_node
        if gpus > 0 and tp > gpus:
            raise ConfigError(
                f"launch.tensor_parallel={tp} is larger than the {gpus} GPUs of a node: tensor "
                "parallelism must stay inside a node (NVLink); lower it or use pipeline_parallel"
            )
        if world % (tp * pp):
            raise ConfigError(
                f"launch.tensor_parallel={tp} x launch.pipeline_parallel={pp} = {tp * pp} does "
                f"not divide the allocation's {world} rank(s) ({where}); change the config or "
                "--nodes / --gpus-per-node"
            )
        dp = world // (tp * pp)
    elif kind in ("teacher", "eval"):
        tasks_per_node, world, dp = 1, nodes, nodes
        if gpus > 0 and vtp > gpus:
            raise ConfigError(
                f"launch.vllm_tensor_parallel={vtp} needs {vtp} GPUs on one node, the allocation "
                f"has {gpus} per node ({where})"
            )
        if gpus == 0 and vtp > 1:
            raise ConfigError(
                f"launch.vllm_tensor_parallel={vtp} needs GPUs; the allocation has none ({where})"
            )
    else:  # data, fit: one process does it all
        if nodes != 1:
            raise ConfigError(f"launch plan: a {kind} job runs on one node (got {nodes})")
        need = _data_gpus(cfg) if kind == "data" else 0
        if 0 < gpus < need:
            raise ConfigError(
                f"data.llm.serve_tensor_parallel={need} needs {need} GPUs on the data job's "
                f"node, the allocation has {gpus} ({where})")
        tasks_per_node, world, dp = 1, 1, 1

    repo = (repo or Path.cwd()).resolve()
    # The repository is mounted at its own path so that the run folders and configs the user
    # names on the host resolve identically inside the container.
    mounts = [f"{repo}:{repo}", *lc.container_mounts, *(extra_mounts or [])]
    return LaunchPlan(
        kind=kind, name=cfg.name, run_dir=str(cfg.run_dir), nodes=nodes, gpus_per_node=gpus,
        tasks_per_node=tasks_per_node, world_size=world, tensor_parallel=tp,
        pipeline_parallel=pp, data_parallel=dp, vllm_tensor_parallel=vtp,
        sequence_parallel=lc.sequence_parallel and tp > 1, distill_backend=cfg.distill.backend,
        image=image or lc.container, mounts=",".join(mounts), time=time or lc.time,
        partition=partition or lc.partition or "", account=account or lc.account or "",
    )


def _data_gpus(cfg: ExperimentConfig) -> int:
    """GPUs a data job uses on a GPU cluster: the served generator's tensor-parallel size
    (`data.llm.endpoint: serve`), else one for Curator's GPU dedup and the MiniLM encoder
    (designer recipe, dedup backend not forced to CPU), else none."""
    data = cfg.data
    if data.llm is not None and data.llm.endpoint == "serve":
        return data.llm.serve_tensor_parallel
    if data.generator == "designer" and data.dedup_backend != "cpu":
        return 1
    return 0


def check_world_size(cfg: ExperimentConfig, world_size: int) -> None:
    """In-process check before torch.distributed starts (the launcher checked it already; this
    catches a hand-written srun or torchrun line)."""
    tp, pp = cfg.launch.tensor_parallel, cfg.launch.pipeline_parallel
    if world_size % (tp * pp):
        raise ConfigError(
            f"launch.tensor_parallel={tp} x launch.pipeline_parallel={pp} = {tp * pp} does not "
            f"divide WORLD_SIZE={world_size}"
        )
