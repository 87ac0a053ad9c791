"""One typed schema for an experiment, composed from YAML files and `key.sub=value` overrides.

Every error is reported as one line naming the file (or the command line) and the dotted key:
a wrong key must fail at load, not as a traceback from deep inside training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, already phrased as `<file>: <key>: <what is wrong>`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class DomainConfig(Strict):
    # Path of the taxonomy file (classes, definitions, aliases, priors, generator templates).
    taxonomy: str = "conf/domains/finance.yaml"


class DataConfig(Strict):
    # `templates`: the minimal offline generator (slots filled from the taxonomy file);
    # `file`: import a user's own CSV / JSONL / Parquet with `text` and `label` columns.
    generator: Literal["templates", "file"] = "templates"
    source_path: str | None = None
    num_examples: Annotated[int, Field(gt=0)] = 3000
    target_distribution: Literal["natural", "balanced"] = "natural"
    # Floor so that rare classes still reach the test split in small samples.
    min_per_class: Annotated[int, Field(ge=0)] = 20
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.2

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.generator == "file" and not self.source_path:
            raise ValueError("data.generator=file needs data.source_path")
        return self


class ModelArch(Strict):
    """Shape of a decoder-only transformer (Llama-style: RMSNorm, SwiGLU, RoPE, GQA, no bias)."""

    num_layers: Annotated[int, Field(gt=0)]
    hidden_size: Annotated[int, Field(gt=0)]
    ffn_hidden_size: Annotated[int, Field(gt=0)]
    num_attention_heads: Annotated[int, Field(gt=0)]
    num_query_groups: Annotated[int, Field(gt=0)]
    kv_channels: Annotated[int, Field(gt=0)] | None = None
    seq_length: Annotated[int, Field(gt=0)] = 64
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelArch:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless kv_channels is set"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


class TrainConfig(Strict):
    steps: Annotated[int, Field(gt=0)] = 300
    batch_size: Annotated[int, Field(gt=0)] = 32
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr: Annotated[float, Field(ge=0)] = 3e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    eval_every: Annotated[int, Field(gt=0)] = 100
    checkpoint_every: Annotated[int, Field(gt=0)] = 100
    log_every: Annotated[int, Field(gt=0)] = 25


class TeacherConfig(Strict):
    # `scratch`: build `arch` from config and train it on the in-domain data (CPU default);
    # `hf`: load an HF checkpoint directory (e.g. a local copy of Qwen3-32B) through Megatron-Bridge.
    source: Literal["scratch", "hf"] = "scratch"
    hf_path: str | None = None
    arch: ModelArch | None = None
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.source == "scratch" and self.arch is None:
            raise ValueError("teacher.source=scratch needs teacher.arch")
        if self.source == "hf" and not self.hf_path:
            raise ValueError("teacher.source=hf needs teacher.hf_path")
        return self


class StudentShape(Strict):
    num_layers: Annotated[int, Field(gt=0)] | None = None
    hidden_size: Annotated[int, Field(gt=0)] | None = None
    ffn_hidden_size: Annotated[int, Field(gt=0)] | None = None
    num_attention_heads: Annotated[int, Field(gt=0)] | None = None


class StudentTarget(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    # `width` prunes hidden / FFN / heads; `depth` drops whole layers (block influence).
    axis: Literal["width", "depth"]
    # Fraction of the teacher's parameters to keep (the paper's students: 0.79 0.58 0.37 0.16).
    compression_ratio: Annotated[float, Field(gt=0, lt=1)] | None = None
    shape: StudentShape | None = None

    @model_validator(mode="after")
    def _check(self) -> StudentTarget:
        if (self.compression_ratio is None) == (self.shape is None):
            raise ValueError("give exactly one of compression_ratio or shape")
        if self.shape is not None:
            given = {k for k, v in self.shape.model_dump().items() if v is not None}
            if self.axis == "depth" and given - {"num_layers"}:
                raise ValueError("a depth target may only set shape.num_layers")
            if self.axis == "width" and "num_layers" in given:
                raise ValueError("a width target may not set shape.num_layers")
        return self


class PruneConfig(Strict):
    # Iterative `uniform` / `decayed` schedules come with the prune/distill recipe.
    schedule: Literal["one_shot"] = "one_shot"
    calibration_samples: Annotated[int, Field(gt=0)] = 64
    hidden_size_divisor: Annotated[int, Field(gt=0)] = 16
    ffn_hidden_size_divisor: Annotated[int, Field(gt=0)] = 32


class LossConfig(Strict):
    kind: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    temperature: Annotated[float, Field(gt=0)] = 1.0
    # Weight of the KL term against the CE anchor on gold answer tokens (blended CoT).
    alpha: Annotated[float, Field(ge=0, le=1)] = 1.0
    alpha_warmup_steps: Annotated[int, Field(ge=0)] = 0


class DistillConfig(Strict):
    method: Literal["logit_kd"] = "logit_kd"
    # CoT formats (`cot_short`, `cot_long`, `blended_cot`) need the teacher-supervision stage.
    supervision: Literal["label"] = "label"
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig(steps=150, lr=1e-3, min_lr=1e-4)


class EvalConfig(Strict):
    split: Literal["val", "test"] = "test"
    scoring: Literal["label_constrained"] = "label_constrained"
    bootstrap_samples: Annotated[int, Field(ge=0)] = 200
    batch_size: Annotated[int, Field(gt=0)] = 128


class FitConfig(Strict):
    x: Literal["compression_ratio"] = "compression_ratio"
    metrics: list[str] = ["macro_f1", "accuracy"]
    forms: list[Literal["power_law", "linear"]] = ["power_law", "linear"]


class LaunchConfig(Strict):
    backend: Literal["local", "slurm"] = "local"
    nodes: Annotated[int, Field(gt=0)] = 1
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    tensor_parallel: Annotated[int, Field(gt=0)] = 1
    pipeline_parallel: Annotated[int, Field(gt=0)] = 1
    container: str = "nvcr.io/nvidia/nemo:26.04"


class ExperimentConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    seed: int = 0
    output_dir: str | None = None  # default: runs/<name>
    domain: DomainConfig = DomainConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    students: list[StudentTarget] = []
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    fit: FitConfig = FitConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [s.name for s in self.students]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate student names: {dup}")
        arch = self.teacher.arch
        if arch is not None:
            for i, s in enumerate(self.students):
                if s.shape is None:
                    continue
                err = _shape_error(arch, s.shape)
                if err:
                    raise ValueError(f"students.{i}.shape: {err}")
        tp = self.launch.tensor_parallel
        if tp > 1 and arch is not None and arch.num_query_groups % tp:
            raise ValueError(
                    f"launch.tensor_parallel ({self.launch.tensor_parallel}) must divide "
                    f"teacher.arch.num_query_groups ({arch.num_query_groups})"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def section_hash(self, *sections: str) -> str:
        """Hash of the config sections a stage depends on (its resume key)."""
        payload = {s: _dump(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _shape_error(arch: ModelArch, shape: StudentShape) -> str | None:
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        v = getattr(shape, key)
        if v is not None and v > getattr(arch, key):
            return f"{key}={v} is larger than the teacher's {getattr(arch, key)}"
    heads = shape.num_attention_heads
    if heads is not None and heads % arch.num_query_groups:
        return (
            f"num_attention_heads={heads} must stay a multiple of the teacher's "
            f"num_query_groups={arch.num_query_groups} (query groups are not pruned)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Loading: `defaults:` composition, provenance of every key, dot-key overrides
# ---------------------------------------------------------------------------------------------

CMDLINE = "command line"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: str, prov: dict, prefix: tuple = ()) -> None:
    for key, value in src.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and value and isinstance(dst.get(key, {}), dict):
            dst.setdefault(key, {})
            _merge(dst[key], value, origin, prov, path)
        else:
            dst[key] = value
            # Drop stale provenance below this key, then record this one.
            for p in [p for p in prov if p[: len(path)] == path]:
                del prov[p]
            prov[path] = origin


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{CMDLINE}: override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{CMDLINE}: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node: Any = tree
    for k in keys[:-1]:
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if not isinstance(node.get(k), (dict, list)):
            node[k] = {}
        node = node[k]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Compose `path` (with its `defaults:`), apply overrides, validate. Raises ConfigError."""
    path = Path(path)
    prov: dict[tuple, str] = {}
    # Provenance with defaults: collect per file so errors name the file that set the key.
    tree = _compose_with_provenance(path, prov)
    for text in overrides or []:
        keys, value = parse_override(text)
        try:
            _set_path(tree, keys, value)
        except (ValueError, IndexError, TypeError):
            raise ConfigError(f"{CMDLINE}: {'.'.join(keys)}: no such list element") from None
        prov[tuple(keys)] = CMDLINE
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, prov, _display(path.resolve()))) from None


def _compose_with_provenance(path: Path, prov: dict, stack: tuple = ()) -> dict:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{_display(path)}: defaults form a cycle")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError(f"{_display(path)}: defaults: must be a list of YAML paths")
    merged: dict = {}
    for d in defaults:
        sub_prov: dict = {}
        sub = _compose_with_provenance(path.parent / str(d), sub_prov, stack + (path,))
        _merge_tracked(merged, sub, sub_prov, prov)
    own_prov = {}
    _merge(merged, data, str(_display(path)), own_prov)
    for p in [p for p in prov if any(p[: len(q)] == q for q in own_prov)]:
        del prov[p]
    prov.update(own_prov)
    return merged


def _merge_tracked(dst: dict, src: dict, src_prov: dict, prov: dict) -> None:
    _merge(dst, src, "", {})
    for p in [p for p in prov if any(p[: len(q)] == q for q in src_prov)]:
        del prov[p]
    prov.update(src_prov)


def _origin(loc: tuple, prov: dict, default: Path) -> str:
    loc = tuple(str(x) for x in loc)
    for n in range(len(loc), 0, -1):
        if loc[:n] in prov:
            return prov[loc[:n]]
    # A missing key or a check across keys of a section: every file that set keys below it.
    origins = sorted({o for p, o in prov.items() if p[: len(loc)] == loc})
    return " + ".join(origins) if origins else str(default)


def _format_validation_error(e: ValidationError, prov: dict, top: Path) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "<top>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",) and not isinstance(
            err["input"], (dict, list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{_origin(loc, prov, top)}: {key}: {msg}")
    return "\n".join(lines)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
