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

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from distillscale.config import ConfigError, ExperimentConfig, ModelArch
from distillscale.models.shape import arch_params
from distillscale.prune.schedule import plan_schedule

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
    # The prune stage's own layout: Minitron scores and prunes an unsharded model (ModelOpt
    # checks only that the *config* says TP 1; megatron-core shards by the process group), so
    # it runs at TP 1, PP from the teacher's size (`prune_layout`).
    prune_tensor_parallel: int
    prune_pipeline_parallel: int
    prune_data_parallel: int
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
        check_student_layouts(cfg, tp, pp, lc.sequence_parallel and tp > 1)
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
        **dict(zip(("prune_tensor_parallel", "prune_pipeline_parallel", "prune_data_parallel"),
                   prune_layout(cfg, world, gpus) if kind == "prune_distill"
                   else (1, 1, world))),
        sequence_parallel=lc.sequence_parallel and tp > 1, distill_backend=cfg.distill.backend,
        image=image or (lc.vllm_container if runs_vllm(cfg, kind) else lc.container), mounts=",".join(mounts), time=time or lc.time,
        partition=partition or lc.partition or "", account=account or lc.account or "",
    )


# Teacher bf16 weights one GPU may hold while Minitron scores it: the weights, the calibration
# activations and ModelOpt's importance buffers must fit an 80 GB H100 with room to spare.
PRUNE_WEIGHT_BUDGET_GIB = 40.0


def teacher_shape(cfg: ExperimentConfig):
    """(ModelArch, vocab size) of the teacher without loading it: the teacher stage's arch.json
    once it has run, else an HF teacher's config.json, else None (a scratch teacher not yet
    trained: the config's own `teacher.arch`)."""
    meta = Path(cfg.run_dir) / "teacher" / "checkpoint" / "arch.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return ModelArch.model_validate(m["arch"]), int(m["vocab_size"])
    if cfg.teacher.source == "hf" and cfg.teacher.hf_path:
        return teacher_arch_from_hf(Path(cfg.teacher.hf_path))
    return None


def prune_layout(cfg: ExperimentConfig, world_size: int | None = None,
                 gpus_per_node: int | None = None) -> tuple[int, int, int]:
    """(TP, PP, DP) of the prune stage, distinct from the distill layout.

    TP is always 1: Minitron scores and slices an unsharded model (ModelOpt 0.47 checks only
    that the model *config* says TP 1, `nas/plugins/megatron.py`, while megatron-core shards by
    the process group, so a TP > 1 group would be pruned silently sharded). PP is the smallest
    divisor of the node's GPUs that divides the teacher's layers and brings its bf16 weights per
    GPU under PRUNE_WEIGHT_BUDGET_GIB (1 for an 8B teacher: 16 GB; 4 on 8 GPUs for a 70B one).
    PP > 1 is for an HF teacher (`teacher.source: hf`) only: the prune stage then prunes its HF
    checkpoint through its Bridge provider split over PP stages (`prune/bridge_prune.py`); our
    own builder (`models/megatron_gpt.py` `build_gpt`, the scratch teacher's) builds one stage.
    Refused in one line: no divisor fits, or PP > 1 for a scratch teacher. DP = world / PP."""
    world = world_size if world_size is not None else cfg.launch.nodes * max(
        cfg.launch.gpus_per_node, 1)
    gpus = gpus_per_node if gpus_per_node is not None else cfg.launch.gpus_per_node
    shape = teacher_shape(cfg) or ((cfg.teacher.arch, None) if cfg.teacher.arch else None)
    if shape is None:
        return 1, 1, world
    arch, vocab = shape
    gib = arch_params(arch, vocab or 32000) * 2 / 2**30
    pp = next((p for p in range(1, max(gpus, 1) + 1)
               if max(gpus, 1) % p == 0 and arch.num_layers % p == 0
               and gib / p <= PRUNE_WEIGHT_BUDGET_GIB), None)
    if pp is None:
        raise ConfigError(
            f"prune: the teacher ({gib:.0f} GiB in bf16, {arch.num_layers} layers) does not fit "
            f"{max(gpus, 1)} GPU(s) of a node at {PRUNE_WEIGHT_BUDGET_GIB:.0f} GiB each")
    if pp > 1 and cfg.teacher.source != "hf":
        raise ConfigError(
            f"prune: the teacher ({gib:.0f} GiB in bf16) needs pipeline_parallel={pp} to be "
            "pruned, which only an HF teacher gets (teacher.source: hf, pruned through its "
            "Bridge provider); a scratch teacher is pruned on one pipeline stage")
    if world % pp:
        raise ConfigError(f"prune: pipeline_parallel={pp} does not divide the {world} rank(s)")
    return 1, pp, world // pp


def teacher_arch_from_hf(hf_dir: Path):
    """(ModelArch, vocab size) from an HF teacher's config.json, without loading weights."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"teacher.hf_path: {path} not found (the launch plan reads the "
                          "teacher's shape from it)")
    c = json.loads(path.read_text())
    try:
        arch = ModelArch(
            num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
            ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
            num_query_groups=c.get("num_key_value_heads", c["num_attention_heads"]),
            kv_channels=c.get("head_dim"),
            seq_length=min(int(c.get("max_position_embeddings", 4096)), 4096),
            rotary_base=float(c.get("rope_theta", 10000.0)),
            norm_epsilon=float(c.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"{path}: no {e.args[0]!r} (not a decoder-only LM config)") from e
    return arch, int(c["vocab_size"])


def layout_problem(arch, tp: int, pp: int, sequence_parallel: bool, seq_length: int) -> str | None:
    """Why megatron-core would refuse `arch` at TP x PP (None: it fits). The asserts it would hit
    only when the model is built: transformer_block.py (layers % PP), attention.py (heads and
    query groups % TP), ColumnParallelLinear (FFN % TP), sequence parallel (sequence % TP)."""
    checks = [
        (arch.num_layers % pp, f"num_layers {arch.num_layers} % pipeline_parallel {pp}"),
        (arch.num_attention_heads % tp,
         f"num_attention_heads {arch.num_attention_heads} % tensor_parallel {tp}"),
        (arch.num_query_groups % tp,
         f"num_query_groups {arch.num_query_groups} % tensor_parallel {tp}"),
        (arch.ffn_hidden_size % tp, f"ffn_hidden_size {arch.ffn_hidden_size} % tensor_parallel {tp}"),
        (sequence_parallel and seq_length % tp,
         f"seq_length {seq_length} % tensor_parallel {tp} (sequence parallel)"),
    ]
    bad = [what + " != 0" for failed, what in checks if failed]
    return "; ".join(bad) if bad else None


def check_student_layouts(cfg: ExperimentConfig, tp: int, pp: int, sequence_parallel: bool) -> None:
    """Every student the schedule plans (every step), and the teacher, must fit the distill
    layout; checked here, before an allocation is asked for. Needs the teacher's shape: an HF
    teacher's config.json, or the trained teacher's arch.json once it exists (else skipped)."""
    if cfg.teacher.source == "hf" and cfg.teacher.hf_path:
        arch, vocab = teacher_arch_from_hf(Path(cfg.teacher.hf_path))
    else:
        meta = Path(cfg.run_dir) / "teacher" / "checkpoint" / "arch.json"
        if not meta.is_file():
            return  # a scratch teacher not yet trained: its shape is the config's, checked below
        m = json.loads(meta.read_text())
        arch, vocab = ModelArch.model_validate(m["arch"]), int(m["vocab_size"])
    seq = cfg.distill.seq_length or arch.seq_length
    why = layout_problem(arch, tp, pp, sequence_parallel, seq)
    if why:
        raise ConfigError(f"teacher: does not fit launch.tensor_parallel={tp} x "
                          f"launch.pipeline_parallel={pp}: {why}")
    for student in cfg.students:
        for k, step in enumerate(plan_schedule(arch, vocab, student, cfg.prune), 1):
            why = layout_problem(step.arch, tp, pp, sequence_parallel, seq)
            if why:
                at = f" (step {k})" if k > 1 else ""
                raise ConfigError(
                    f"student {student.name}{at}: planned shape {step.arch.num_layers} layers, "
                    f"{step.arch.num_attention_heads} heads / {step.arch.num_query_groups} query "
                    f"groups, ffn {step.arch.ffn_hidden_size} does not fit launch.tensor_parallel="
                    f"{tp} x launch.pipeline_parallel={pp}: {why}; change the student or the layout")


def runs_vllm(cfg: ExperimentConfig, kind: str) -> bool:
    """Whether a job of `kind` runs vLLM, and so runs in `launch.vllm_container`: the teacher and
    eval jobs, and a data job that serves its generator (`data.llm.endpoint: serve`)."""
    if kind in ("teacher", "eval"):
        return True
    return kind == "data" and cfg.data.llm is not None and cfg.data.llm.endpoint == "serve"


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
