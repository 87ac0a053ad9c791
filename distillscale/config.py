"""One typed schema for an experiment, composed from YAML files and `key.sub=value` overrides.

Every error is reported as one line naming the file (or the command line) and the dotted key:
a wrong key must fail at load, not as a traceback from deep inside training.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from distillscale.knowledge.general import is_knowledge_probe


class ConfigError(ValueError):
    """A configuration problem, already phrased as `<file>: <key>: <what is wrong>`."""


def _accepts_number_not_bool(annotation: Any) -> bool:
    """Whether a field's type takes an int or a float but not a bool (`steps: true` must not
    mean 1, as pydantic's lax mode would have it)."""
    leaves: set = set()

    def walk(t: Any) -> None:
        origin = typing.get_origin(t)
        if origin is Annotated:
            walk(typing.get_args(t)[0])
        elif origin in (typing.Union, types.UnionType):
            for a in typing.get_args(t):
                walk(a)
        else:
            leaves.add(t)

    walk(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field and _accepts_number_not_bool(field.annotation):
            raise ValueError(f"must be a number, not the boolean {str(value).lower()}")
        return value


def _folder_name(value: str) -> str:
    """A name that becomes a folder (`runs/<name>`, `students/<name>`): dots alone would make
    it the parent folder or the folder itself."""
    if set(value) <= {"."}:
        raise ValueError(f"{value!r} is not usable as a folder name")
    return value


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class DomainConfig(Strict):
    # Path of the taxonomy file (classes, definitions, aliases, priors, generator templates).
    # Required: no domain is built in, so every experiment names the one it is about (the
    # class count, prompts and data all follow from it).
    taxonomy: str


class LLMEndpointConfig(Strict):
    """An OpenAI-compatible chat endpoint for the Data Designer LLM column (e.g. vLLM)."""

    # A server's base URL (e.g. http://localhost:8000/v1), or `serve`: the data stage starts
    # a local vLLM server for `model` for the build and stops it after (distillscale/data/serve.py).
    endpoint: str
    model: str  # e.g. nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B (a hub name or a local path)
    api_key_env: str | None = None  # name of the environment variable holding the key
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.9
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_tokens: Annotated[int, Field(gt=0)] = 64
    max_parallel_requests: Annotated[int, Field(gt=0)] = 16
    timeout_s: Annotated[int, Field(gt=0)] = 60
    # --- endpoint: serve ---
    # GPUs the served model spans (the paper's data build served its generator with TP=4).
    serve_tensor_parallel: Annotated[int, Field(gt=0)] = 1
    # The server command, `{model}` `{port}` `{tp}` filled in; default `vllm serve {model}
    # --host 127.0.0.1 --port {port} --tensor-parallel-size {tp} --served-model-name {model}`.
    serve_command: list[str] | None = None
    serve_args: list[str] = []  # appended, e.g. ["--max-model-len", "4096"]
    startup_timeout_s: Annotated[int, Field(gt=0)] = 1800

    @model_validator(mode="after")
    def _check_endpoint(self) -> LLMEndpointConfig:
        if self.endpoint != "serve" and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"data.llm.endpoint: {self.endpoint!r} is neither an http(s) URL "
                             "nor `serve`")
        return self


class DataConfig(Strict):
    # `templates`: the minimal offline generator (slots filled from the taxonomy file);
    # `designer`: the data recipe (Data Designer rounds + NeMo-Curator curation + global dedup);
    # `file`: import a user's own CSV / JSONL / Parquet with `text` and `label` columns.
    generator: Literal["templates", "designer", "file"] = "templates"
    source_path: str | None = None
    # `file`: the columns holding the text and the label (labels match a class by name or
    # alias, in any case; docs/domains.md).
    text_column: str = "text"
    label_column: str = "label"
    num_examples: Annotated[int, Field(gt=0)] = 3000
    target_distribution: Literal["natural", "balanced"] = "natural"
    # Floor so that rare classes still reach the test split in small samples.
    min_per_class: Annotated[int, Field(ge=0)] = 20
    # `templates` only: the share of headlines that go on to mention a second event of another
    # class ("<primary>; <second>", "<primary> as <second>", ...; from the classes the
    # taxonomy's `confusable_with` pairs it with, else any). label and gold_label stay the
    # primary event, the one written first: word order carries the answer, which a bag of
    # words cannot read. 0: none, the generator draws exactly as before the key existed.
    # docs/domains.md measures the rates.
    second_event_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.2
    # --- the `designer` recipe (distillscale/data/recipe.py) ---
    max_rounds: Annotated[int, Field(gt=0)] = 6
    # None: offline sampler/template synthesis; set: an LLM writes each headline.
    llm: LLMEndpointConfig | None = None
    fewshot_k: Annotated[int, Field(ge=0)] = 5
    near_dup_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    semantic_dedup: bool = True
    semantic_threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    semantic_clusters: Annotated[int, Field(gt=0)] = 100
    # A near or semantic duplicate of a row of *another* class (the contrast an author writes
    # on purpose: "shows benefit" / "shows no benefit"): `keep` it, counted in the dataset
    # card, or `reject` it naming both rows. Same text with two labels is always rejected.
    cross_class_duplicates: Literal["keep", "reject"] = "keep"
    # Near-duplicate and semantic dedup: `auto` runs NeMo-Curator's GPU workflows when a CUDA
    # GPU and cuDF are present and the CPU indexes otherwise; `cpu` / `curator_gpu` force one.
    dedup_backend: Literal["auto", "cpu", "curator_gpu"] = "auto"
    # `minilm`: all-MiniLM-L6-v2 (~210 headlines/s on 2 CPU cores); `minilm_static`: its
    # word-piece embeddings mean-pooled, for CPU runs at 500k scale (distillscale/data/dedup.py).
    embedding: Literal["minilm", "minilm_static"] = "minilm"
    # MiniLM's precision: `auto` = bf16 where the hardware has it natively (CUDA, AVX512-BF16 /
    # AMX CPUs; 1.75x fp32 on 2 cores, cosine to fp32 >= 0.9999), else fp32; or fp32 / bf16 /
    # int8 (dynamic quantization, CPU only: 2.2x fp32, but cosine to fp32 only 0.94 on average).
    embedding_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    # Kept for configs that set it: true is embedding_precision=int8.
    quantize_embeddings: bool = False
    min_words: Annotated[int, Field(ge=1)] = 4
    max_words: Annotated[int, Field(ge=1)] = 40
    max_non_alnum_ratio: Annotated[float, Field(gt=0, le=1)] = 0.35
    language: str = "en"
    # Points in the dataset card's UMAP (0: no UMAP).
    card_umap_points: Annotated[int, Field(ge=0)] = 4000

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.generator == "file" and not self.source_path:
            raise ValueError("data.generator=file needs data.source_path")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        if self.second_event_rate > 0 and self.generator != "templates":
            raise ValueError(f"data.second_event_rate applies to data.generator=templates "
                             f"(the {self.generator} generator writes one event per row)")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_second_event_rate_when_off(self, handler):
        # Off, second_event_rate is left out of dumps: the data stage's identity (and a sweep's
        # upstream hash) of a config that does not set it stays what it was before the key
        # existed, as do its data, so cached runs stay up to date.
        out = handler(self)
        if self.second_event_rate == 0:
            out.pop("second_event_rate", None)
        return out


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
    # RMSNorm on each head's queries and keys (Qwen3); pruning and export keep it.
    qk_layernorm: bool = False
    # Biases on the query, key and value projections (Qwen2 / Qwen2.5).
    add_qkv_bias: bool = False
    # The checkpoint's RoPE scaling as HF writes it (e.g. {"rope_type": "llama3", "factor": 8.0,
    # ...}); None: plain RoPE with `rotary_base`.
    rope_scaling: dict[str, Any] | None = None

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
    # Micro-batches per optimizer step: `batch_size` examples are split into this many parts,
    # each forward/backward separately (memory), gradients summed before the step.
    grad_accum_steps: Annotated[int, Field(gt=0)] = 1

    @model_validator(mode="after")
    def _check_accum(self) -> TrainConfig:
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) is larger than "
                             f"batch_size ({self.batch_size})")
        return self


class KnowledgeConfig(Strict):
    """The offline general-knowledge world a scratch teacher also learns
    (distillscale/knowledge/general.py) and its multiple-choice probe."""

    countries: Annotated[int, Field(gt=0)] = 60
    arithmetic: Annotated[int, Field(ge=0)] = 120
    conversions: Annotated[int, Field(ge=0)] = 40
    # Share of every teacher training batch drawn from the knowledge corpus.
    fraction: Annotated[float, Field(ge=0, lt=1)] = 0.15
    # Test questions in the probe (None: one per fact not used by dev).
    probe_size: Annotated[int, Field(gt=0)] | None = None


class LogitCacheConfig(Strict):
    # Supervision formats whose KD tokens (trace + answer) get a top-k cache; [] = none.
    formats: list[Literal["label", "cot_short", "cot_long", "blended_cot"]] = ["label"]
    k: Annotated[int, Field(gt=0)] = 64
    # Tokens drawn from the teacher's tail per position (an unbiased tail-KL estimate; HF
    # backend only). 0: the tail is one merged bucket.
    tail_samples: Annotated[int, Field(ge=0)] = 0
    # How shards store a token (distillscale/teacher/logit_cache.py): `fp16` bit-packed ids and
    # float16 log-probabilities; `quantized` sorted delta-coded ids and log-probabilities as
    # `logprob_bits`-bit steps below the top-1 (tools/bench_logit_cache.py --budget measures
    # bytes per token against KL error; docs/benchmarks-kd.md has the frontier).
    encoding: Literal["fp16", "quantized"] = "fp16"
    logprob_bits: Annotated[int, Field(ge=2, le=16)] = 6
    # Shared by every run and student (entries are keyed by a content hash); default:
    # `logit_cache/` next to the run folder, i.e. runs/logit_cache.
    dir: str | None = None
    shard_size: Annotated[int, Field(gt=0)] = 512


class SupervisionConfig(Strict):
    """Teacher supervision (distillscale/teacher/): labels and traces at each thinking depth."""

    # Family adapter: how this teacher is asked to think at each depth (conf/teachers/).
    family: str = "conf/teachers/tiny.yaml"
    # `hf`: transformers (CPU / GPU); `vllm`: offline engine (GPU); `openai`: a served endpoint.
    backend: Literal["hf", "vllm", "openai"] = "hf"
    depths: list[Literal["label", "cot_short", "cot_long"]] = ["label", "cot_short", "cot_long"]
    splits: list[Literal["train", "val", "test"]] = ["train"]
    batch_size: Annotated[int, Field(gt=0)] = 128
    shard_size: Annotated[int, Field(gt=0)] = 512
    max_retries: Annotated[int, Field(ge=0)] = 2
    retry_temperature: Annotated[float, Field(gt=0)] = 0.7
    # `openai` backend only.
    base_url: str | None = None
    model_name: str | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    cache: LogitCacheConfig = LogitCacheConfig()


class TeacherConfig(Strict):
    # `scratch`: build `arch` from config and train it on the in-domain data (CPU default);
    # `hf`: load an HF checkpoint directory (e.g. a local copy of Qwen3-32B) through Megatron-Bridge.
    source: Literal["scratch", "hf"] = "scratch"
    hf_path: str | None = None
    arch: ModelArch | None = None
    train: TrainConfig = TrainConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()
    supervision: SupervisionConfig = SupervisionConfig()

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

    _name_is_a_folder = field_validator("name")(_folder_name)
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
    # `one_shot`, or iterative prune -> distill steps: `uniform` (equal steps in points of the
    # teacher's parameters) or `decayed` (each step `decay` x the previous one); every
    # intermediate student is kept and evaluated (distillscale/prune/schedule.py).
    schedule: Literal["one_shot", "uniform", "decayed"] = "one_shot"
    steps: Annotated[int, Field(gt=0)] = 1
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.5
    calibration_samples: Annotated[int, Field(gt=0)] = 64
    hidden_size_divisor: Annotated[int, Field(gt=0)] = 16
    ffn_hidden_size_divisor: Annotated[int, Field(gt=0)] = 32
    # Width targets from a ratio: `scale` shrinks attention heads with hidden and FFN, so the
    # student gets faster about as much as it gets smaller; `keep` is Minitron's published width
    # recipe (all heads kept while a shape within 1% of the ratio keeps them). See choose_shape.
    attention_heads: Literal["scale", "keep"] = "scale"

    @model_validator(mode="after")
    def _check_steps(self) -> PruneConfig:
        if self.schedule == "one_shot" and self.steps != 1:
            raise ValueError(f"schedule one_shot has exactly 1 step (got steps={self.steps})")
        if self.schedule != "one_shot" and self.steps < 2:
            raise ValueError(f"schedule {self.schedule} needs steps >= 2 (got {self.steps})")
        return self


class LossConfig(Strict):
    # Divergence between teacher and student (distillscale/distill/losses.py).
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: Annotated[float, Field(gt=0)] = 1.0
    # Weight of the KL term against the CE anchor on gold answer tokens. Unset: 1.0 (pure KD)
    # for label / cot_short / cot_long, 0.5 for blended_cot, whose CE anchor is what makes it
    # blended (resolved when the config loads, so manifests record the value used).
    alpha: Annotated[float, Field(ge=0, le=1)] | None = None
    alpha_warmup_steps: Annotated[int, Field(ge=0)] = 0
    # > 0: compute the divergence this many tokens at a time, never holding full-vocabulary fp32
    # logits for the whole batch (TP=1; tools/bench_kd_loss.py measures it). 0: ModelOpt's KL.
    chunk_tokens: Annotated[int, Field(ge=0)] = 0
    # Local online path: `logits` compares the two models' output-layer logits (ModelOpt's
    # DistillationModel); `fused_head` feeds their last hidden states and head weights to
    # distillscale/distill/fused_kd.py, which computes the logits `chunk_tokens` tokens at a
    # time (0: 64) and never holds [tokens, vocab] of either (TP=1; same loss, less memory).
    implementation: Literal["logits", "fused_head"] = "logits"


# Which teacher thinking depth feeds each supervision format (`None`: no trace).
FORMAT_DEPTH = {"label": None, "cot_short": "cot_short", "cot_long": "cot_long",
                "blended_cot": "cot_long"}
# Default KL weight of blended CoT: trace KL and answer CE weighted equally.
BLENDED_COT_ALPHA = 0.5


class DistillConfig(Strict):
    # `logit_kd`: full-parameter (ModelOpt Megatron distillation); `lora_kd`: LoRA adapters
    # only (peft), merged for export (distillscale/distill/).
    method: Literal["logit_kd", "lora_kd"] = "logit_kd"
    lora_rank: Annotated[int, Field(gt=0)] = 8
    lora_alpha: Annotated[float, Field(gt=0)] = 16.0
    # What the student is trained on (distillscale/teacher/supervision.py): `label`, or the
    # teacher's traces from the supervision stage (`cot_short`, `cot_long`; `blended_cot`: KL
    # on the long trace + CE anchor on the gold answer, weighted by loss.alpha).
    supervision: Literal["label", "cot_short", "cot_long", "blended_cot"] = "label"
    # `online`: the teacher runs forward next to the student; `cache`: the student trains
    # against the teacher stage's top-k logit cache of this supervision format (the teacher is
    # never in memory during training; teacher.supervision.cache.formats must include it).
    teacher_logits: Literal["online", "cache"] = "online"
    # `local`: our loop on megatron-core (CPU: local layer spec, fp32); `bridge`: Megatron-Bridge's
    # distillation provider and training loop (GPU: transformer-engine spec, bf16, TP/PP/SP from
    # `launch`; distillscale/distill/bridge.py); `auto`: bridge when CUDA and transformer-engine
    # are importable, else local.
    backend: Literal["auto", "local", "bridge"] = "auto"
    # Bridge backend: tokens per training sequence (None: teacher.arch.seq_length, else 4096).
    seq_length: Annotated[int, Field(gt=0)] | None = None
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig(steps=150, lr=1e-3, min_lr=1e-4)

    @model_validator(mode="after")
    def _resolve_alpha(self) -> DistillConfig:
        if self.loss.alpha is None:
            self.loss.alpha = BLENDED_COT_ALPHA if self.supervision == "blended_cot" else 1.0
        elif self.supervision == "blended_cot" and self.loss.alpha == 1.0:
            raise ValueError("supervision=blended_cot with loss.alpha=1 has no CE anchor (it is "
                             "cot_long's KL on the trace alone); set loss.alpha < 1 or leave it "
                             f"unset ({BLENDED_COT_ALPHA})")
        return self

    @model_validator(mode="after")
    def _check_cache_loss(self) -> DistillConfig:
        # A top-k cache knows the teacher's probabilities on its top-k and tail only: enough for
        # KL(p_teacher || p_student), not for reverse KL or JSD (they weigh the student's mass).
        if self.teacher_logits == "cache" and self.loss.kind != "forward_kl":
            raise ValueError(f"teacher_logits=cache supports loss.kind=forward_kl only "
                             f"(got {self.loss.kind}); use teacher_logits=online")
        return self


class GeneralEvalConfig(Strict):
    """General knowledge through lm-eval (distillscale/eval/lm_eval_tasks/), from local copies.

    `{run_dir}` in a path stands for this experiment's run folder. Each path is a directory of
    Parquet files: MMLU in the HF `cais/mmlu` schema (`question`, `subject`, `choices`,
    `answer` int; test + dev splits), MMLU-Pro in the `TIGER-Lab/MMLU-Pro` schema (`question`,
    `options`, `answer` letter, `answer_index`, `category`), and the knowledge probe the
    teacher stage writes (`{run_dir}/teacher/knowledge_probe`, a synthetic quiz on the facts
    the tiny teacher learned, in the `cais/mmlu` schema; reported as metric `probe`). Unset:
    skipped.
    """

    mmlu_path: str | None = None
    mmlu_pro_path: str | None = None
    probe_path: str | None = None
    # `hf`: transformers on CPU (or one GPU); `vllm`: the GPU path (NGC container).
    backend: Literal["hf", "vllm"] = "hf"
    # `letters`: the reference MMLU prompt (answer letter); `cloze`: the likelihood of each
    # choice's text, for small models; `auto`: cloze for from-scratch (word-level) teachers.
    prompt: Literal["auto", "letters", "cloze"] = "auto"
    num_fewshot: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(gt=0)] = 16
    # Cap on questions per benchmark (None: all); for quick looks at large local copies.
    limit: Annotated[int, Field(gt=0)] | None = None

    @field_validator("mmlu_path", "mmlu_pro_path")
    @classmethod
    def _not_the_probe(cls, v, info):
        # Scored as MMLU, the synthetic quiz would be reported, fitted and plotted as MMLU.
        if v and is_knowledge_probe(v):
            real = {"mmlu_path": "MMLU", "mmlu_pro_path": "MMLU-Pro"}[info.field_name]
            raise ValueError(f"{v} is the synthetic knowledge probe, not {real}: set "
                             "eval.general.probe_path to it instead")
        return v

    @model_serializer(mode="wrap")
    def _leave_out_probe_path_when_unset(self, handler):
        # Unset, probe_path is left out of dumps: the eval stage's identity of a config that
        # scores real MMLU only stays what it was before the key existed.
        out = handler(self)
        if self.probe_path is None:
            out.pop("probe_path", None)
        return out


class EvalConfig(Strict):
    split: Literal["val", "test"] = "test"
    # `label_constrained`: argmax over the class names' likelihood (no parse failures);
    # `generative`: greedy decoding, the answer parsed after the model's own reasoning.
    scoring: Literal["label_constrained", "generative"] = "label_constrained"
    bootstrap_samples: Annotated[int, Field(ge=0)] = 200
    batch_size: Annotated[int, Field(gt=0)] = 128
    # Generative scoring: tokens the model may produce (reasoning + answer).
    max_new_tokens: Annotated[int, Field(gt=0)] = 48
    general: GeneralEvalConfig = GeneralEvalConfig()


class FitConfig(Strict):
    """Scaling fits (distillscale/fit/): which curves, forms and inverse predictions."""

    # Axes to fit against; an axis with fewer than 3 distinct values in the results is skipped.
    x: list[Literal["compression_ratio", "dataset_size"]] = ["compression_ratio", "dataset_size"]
    metrics: list[str] = ["macro_f1", "weighted_f1", "accuracy", "gold_accuracy", "mmlu",
                          "mmlu_pro", "probe"]
    forms: list[Literal["saturating_power_law", "logistic_log", "broken_power_law"]] = [
        "saturating_power_law", "logistic_log", "broken_power_law"]
    bootstrap_samples: Annotated[int, Field(ge=0)] = 200
    # Huber threshold in units of each point's standard error (from its eval CI).
    huber_delta: Annotated[float, Field(gt=0)] = 1.345
    # Inverse predictions: x needed to reach each level ("data for macro F1 >= 0.9").
    targets: dict[str, list[float]] = {"macro_f1": [0.8, 0.9, 0.95]}
    # Inverse predictions at levels relative to the teacher's own score on the same metric, in
    # the same curve ("largest compression keeping MMLU >= 0.9 of the teacher's"): a fixed level
    # such as MMLU >= 0.3 means nothing for a teacher that scores 0.29, or 0.75. Compression
    # curves only (the teacher anchors them).
    relative_targets: dict[str, list[Annotated[float, Field(gt=0, le=1)]]] = {
        "mmlu": [0.9], "mmlu_pro": [0.9], "probe": [0.9]}

    @field_validator("x", mode="before")
    @classmethod
    def _one_axis(cls, v):
        return [v] if isinstance(v, str) else v


class LaunchConfig(Strict):
    """Where it runs. The launchers read this section through `distillscale launch plan`;
    flags and environment variables override nodes, GPUs, time, partition and image."""

    backend: Literal["local", "slurm"] = "local"
    nodes: Annotated[int, Field(gt=0)] = 1
    # 0 = CPU (one task per node); otherwise one srun task per GPU.
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    tensor_parallel: Annotated[int, Field(gt=0)] = 1
    pipeline_parallel: Annotated[int, Field(gt=0)] = 1
    # Megatron sequence parallelism (activations split along the sequence in the TP group);
    # applies only when tensor_parallel > 1 (Bridge distillation backend).
    sequence_parallel: bool = True
    # GPUs one vLLM engine spans (teacher traces, evaluation): a 32B teacher in bf16 needs at
    # least 2 H100s; the paper's data build served its generator with TP=4.
    vllm_tensor_parallel: Annotated[int, Field(gt=0)] = 1
    container: str = "nvcr.io/nvidia/nemo:26.04"
    # The image of the jobs that run vLLM (teacher supervision, evaluation, a data job serving its
    # generator): vLLM 0.32.0 pins torch 2.13.0 and transformers >= 5.16.1, which the NeMo
    # image's own torch build and Megatron-Bridge 0.6.2 (transformers <= 5.12.1) cannot meet, so
    # these jobs get their own image (Dockerfile.vllm; docs/gpu_path.md).
    vllm_container: str = "vllm/vllm-openai:v0.32.0"
    # Extra pyxis mounts `SRC:DST[:FLAGS]`; the repository is always mounted at its own path.
    container_mounts: list[Annotated[str, Field(pattern=r"^[^:,]+:[^:,]+(:[a-z+]+)?$")]] = []
    time: Annotated[str, Field(pattern=r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")] = "04:00:00"
    partition: str | None = None
    account: str | None = None


class ExperimentConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    # The recipe that runs this experiment (`distillscale recipes` lists them): a name in
    # recipes/, or a path to your own .py file with a main(run).
    recipe: str = "prune_distill"
    seed: int = 0
    output_dir: str | None = None  # default: runs/<name>
    domain: DomainConfig
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    students: list[StudentTarget] = []
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    fit: FitConfig = FitConfig()
    launch: LaunchConfig = LaunchConfig()

    _name_is_a_folder = field_validator("name")(_folder_name)

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_a_folder(cls, value: str | None) -> str | None:
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{value} exists and is not a folder")
        return value

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
        self._check_supervision()
        tp = self.launch.tensor_parallel
        if tp > 1 and arch is not None and arch.num_query_groups % tp:
            raise ValueError(
                    f"launch.tensor_parallel ({self.launch.tensor_parallel}) must divide "
                    f"teacher.arch.num_query_groups ({arch.num_query_groups})"
                )
        return self

    def _check_supervision(self) -> None:
        """What distillation asks of the supervision stage must be what it produces."""
        d, sup = self.distill, self.teacher.supervision
        depth = FORMAT_DEPTH[d.supervision]
        if depth is not None and self.students:
            if depth not in sup.depths:
                raise ValueError(f"distill.supervision={d.supervision} trains on the teacher's "
                                 f"{depth!r} traces, but teacher.supervision.depths is "
                                 f"{sup.depths}")
            if "train" not in sup.splits:
                raise ValueError(f"distill.supervision={d.supervision} needs 'train' in "
                                 f"teacher.supervision.splits (got {sup.splits})")
        if d.teacher_logits == "cache" and self.students:
            if d.supervision not in sup.cache.formats:
                raise ValueError(f"distill.teacher_logits=cache with supervision="
                                 f"{d.supervision} needs {d.supervision!r} in "
                                 f"teacher.supervision.cache.formats (got {sup.cache.formats})")
            if d.backend == "bridge":
                raise ValueError("distill.teacher_logits=cache runs on the local backend only "
                                 "(Bridge's distillation always runs the co-located teacher); "
                                 "use teacher_logits=online with backend=bridge")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def section_payload(self, *sections: str) -> dict[str, Any]:
        """The named config sections as plain JSON values, keyed by section."""
        return {s: _dump(getattr(self, s)) for s in sections}

    def section_hash(self, *sections: str) -> str:
        """Hash of the config sections a stage depends on (its resume key)."""
        return payload_hash(self.section_payload(*sections))


def payload_hash(payload: dict[str, Any]) -> str:
    """The 16-hex identity of a JSON payload (key order does not matter)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (first on line "
                    f"{first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    """`yaml.safe_load`, with a duplicate key in a mapping an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml_load(path.read_text()) or {}
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
        value = yaml_load(raw) if raw != "" else ""
    except yaml.constructor.ConstructorError as e:  # a key given twice: not a plain string
        raise ConfigError(f"{CMDLINE}: {key}: {e.problem}") from None
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


def _error_message(err: dict) -> str:
    """One pydantic error as the text after `<file>: <key>: `."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if "input" in err and err["type"] != "value_error" and not isinstance(
        err["input"], (dict, list)
    ):
        return f"{msg} (got {err['input']!r})"
    return msg


def _error_loc(err: dict) -> tuple:
    return tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))


def _format_validation_error(e: ValidationError, prov: dict, top: Path) -> str:
    lines = []
    for err in e.errors():
        loc = _error_loc(err)
        key = ".".join(str(x) for x in loc) or "<top>"
        lines.append(f"{_origin(loc, prov, top)}: {key}: {_error_message(err)}")
    return "\n".join(lines)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_yaml_model(path: str | Path, model: type[BaseModel], what: str):
    """Validate one YAML file without `defaults:` (a taxonomy, a teacher family, a sweep) into
    `model`; problems are a ConfigError, one line `<file>: <key>: <what is wrong>` each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    data = _read_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(
            f"{path}: {'.'.join(str(x) for x in _error_loc(err)) or '<top>'}: "
            f"{_error_message(err)}" for err in e.errors()
        )) from None
