"""Headline synthesis with NVIDIA Data Designer (`data-designer` 0.9.6).

One Data Designer config per round:

- `label`: category sampler over the taxonomy's classes, weighted by the round's class weights
  (the rare-class reweighting of `recipe.py`);
- `pattern`: subcategory sampler (per class, which phrasing), repeated entries = weights;
- one sampler column per taxonomy slot (`slot_<name>`): category samplers for lists and Faker
  pools, uniform samplers for numeric ranges;
- `prefix` / `suffix`: the taxonomy's source decorations;
- `draft`: the class phrasing filled with the row's slot values, as a Data Designer custom
  column (full-column strategy). Data Designer's own Jinja expression columns render one row
  at a time (about 1.6 ms per row here, i.e. 13 minutes for 500k rows); the custom column
  renders a whole batch in one pass;
- offline mode: `text` = prefix + draft + suffix;
- LLM mode: `text` is an LLM text column against an OpenAI-compatible endpoint (e.g. vLLM
  serving Nemotron-3-Nano-30B-A3B), prompted with the class definition, the draft as the
  facts to use, and few-shot examples of the class chosen by the previous round.

Data Designer reads `DATA_DESIGNER_HOME` at import time, so the environment is set before the
first import (`designer_environment`), inside the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from distillscale.config import LLMEndpointConfig
from distillscale.domain import SLOT, RangeSlot, Taxonomy

MODEL_ALIAS = "headline-writer"
OFFLINE_PROVIDER = "offline"


@dataclass
class LLMSettings:
    """An OpenAI-compatible chat endpoint (vLLM, NIM, ...)."""

    endpoint: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 64
    max_parallel_requests: int = 16
    timeout_s: int = 60

    @classmethod
    def from_config(cls, llm: LLMEndpointConfig, endpoint: str | None = None) -> LLMSettings:
        """The request settings of `data.llm`; `endpoint` replaces its endpoint (the URL of a
        server started for the build, when the config says `serve`)."""
        given = llm.model_dump() | {"endpoint": endpoint or llm.endpoint}
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls)})


@dataclass
class RoundSpec:
    """What one synthesis round asks for."""

    num_records: int
    class_weights: dict[str, float]
    # Per class, a weight per template (same order as the taxonomy); None = uniform.
    pattern_weights: dict[str, list[float]] | None = None
    # Per class, few-shot example headlines (LLM mode).
    fewshot: dict[str, list[str]] = field(default_factory=dict)


def designer_environment(home: Path) -> None:
    """Data Designer settings that must be in place before it is imported."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DATA_DESIGNER_HOME"] = str(home)
    os.environ["NEMO_TELEMETRY_ENABLED"] = "false"
    # Keep Data Designer from looking for managed person data sets (not downloadable here).
    # A user's own setting is kept; ours follows the build (a second build in the same
    # process would otherwise write into the first one's finished folder).
    global _assets_set_here
    current = os.environ.get("DATA_DESIGNER_MANAGED_ASSETS_PATH")
    if current is None or current == _assets_set_here:
        _assets_set_here = str(home / "managed-assets")
        os.environ["DATA_DESIGNER_MANAGED_ASSETS_PATH"] = _assets_set_here


_assets_set_here: str | None = None


class _RenderParams(BaseModel):
    templates: dict[str, list[str]]
    slots: list[str]


def _render_drafts(df: pd.DataFrame, params: _RenderParams) -> pd.DataFrame:
    """Fill each row's class phrasing with the row's slot values (one pass per batch)."""
    cols = {s: df[f"slot_{s}"].astype(str).tolist() for s in params.slots}
    labels = df["label"].astype(str).tolist()
    patterns = df["pattern"].astype(int).tolist()
    out = []
    for i, (label, pattern) in enumerate(zip(labels, patterns)):
        template = params.templates[label][pattern]
        out.append(SLOT.sub(lambda m, i=i: cols[m.group(1)][i], template))
    df["draft"] = out
    return df


def _offline_text(df: pd.DataFrame) -> pd.DataFrame:
    df["text"] = (df["prefix"].astype(str) + df["draft"] + df["suffix"].astype(str)).str.strip()
    return df


def _pattern_values(cls_templates: list[str], weights: list[float] | None) -> list[int]:
    """Subcategory samplers have no weights: repeat indices in proportion (1..4 copies)."""
    n = len(cls_templates)
    if weights is None:
        return list(range(n))
    w = np.asarray(weights, dtype=float)
    w = np.maximum(w, 1e-9) / max(w.max(), 1e-9)
    copies = np.clip(np.rint(w * 4), 1, 4).astype(int)
    return [i for i in range(n) for _ in range(copies[i])]


def llm_system_prompt(taxonomy: Taxonomy) -> str:
    """The writer's instructions, from the domain's own task and classes (no domain is built
    in: the same words serve every taxonomy)."""
    classes = "; ".join(f"{c.name}: {c.definition}" for c in taxonomy.classes)
    return (f"You write realistic, factual headlines for a labelled data set. The task the data "
            f"is for: {taxonomy.task} The classes: {classes}. Each headline you write must "
            "belong to the class you are given and to no other. Reply with the headline only.")


LLM_PROMPT = """Class: {{ label }} ({{ definition }}).
Facts to use (rephrase freely, keep names and numbers): {{ draft }}
Headlines of this class written earlier:
{{ examples }}
Write one new headline of this class. Vary the wording and structure from the earlier
headlines; do not copy them. Reply with the headline only."""


def build_designer_config(
    taxonomy: Taxonomy, slot_values: dict[str, Any], spec: RoundSpec, llm: LLMSettings | None
):
    """The Data Designer config builder for one round (see the module docstring)."""
    # optional: Data Designer (the `data` extra), only for the designer generator
    import data_designer.config as dd
    from data_designer.config.custom_column import custom_column_generator

    model_configs = []
    if llm is not None:
        model_configs.append(dd.ModelConfig(
            alias=MODEL_ALIAS, model=llm.model, provider="llm", skip_health_check=True,
            inference_parameters=dd.ChatCompletionInferenceParams(
                temperature=llm.temperature, top_p=llm.top_p, max_tokens=llm.max_tokens,
                max_parallel_requests=llm.max_parallel_requests, timeout=llm.timeout_s,
            ),
        ))
    b = dd.DataDesignerConfigBuilder(model_configs=model_configs)
    labels = [c.name for c in taxonomy.classes if spec.class_weights.get(c.name, 0) > 0]
    if not labels:
        raise ValueError("synthesis round with no class to generate")
    b.add_column(dd.SamplerColumnConfig(
        name="label", sampler_type="category",
        params=dd.CategorySamplerParams(
            values=labels, weights=[float(spec.class_weights[n]) for n in labels]
        ),
    ))
    pw = spec.pattern_weights or {}
    b.add_column(dd.SamplerColumnConfig(
        name="pattern", sampler_type="subcategory",
        params=dd.SubcategorySamplerParams(category="label", values={
            n: _pattern_values(taxonomy.by_name(n).templates, pw.get(n)) for n in labels
        }),
    ))
    used = sorted({s for n in labels for t in taxonomy.by_name(n).templates
                   for s in SLOT.findall(t)})
    for name in used:
        spec_ = slot_values[name]
        if isinstance(spec_, RangeSlot):
            if spec_.int_range is not None:
                lo, hi = spec_.int_range
                b.add_column(dd.SamplerColumnConfig(
                    name=f"slot_{name}", sampler_type="uniform", convert_to="int",
                    # uniform on [lo, hi + 1) floored would need a custom column; rounding
                    # on [lo - 0.5, hi + 0.5) gives every integer the same share.
                    params=dd.UniformSamplerParams(low=lo - 0.499, high=hi + 0.499,
                                                   decimal_places=0),
                ))
            else:
                lo, hi = spec_.float_range
                b.add_column(dd.SamplerColumnConfig(
                    name=f"slot_{name}", sampler_type="uniform",
                    params=dd.UniformSamplerParams(low=lo, high=hi, decimal_places=2),
                ))
        else:
            b.add_column(dd.SamplerColumnConfig(
                name=f"slot_{name}", sampler_type="category",
                params=dd.CategorySamplerParams(values=[str(v) for v in spec_]),
            ))
    b.add_column(dd.SamplerColumnConfig(
        name="prefix", sampler_type="category",
        params=dd.CategorySamplerParams(values=_distinct(taxonomy.prefixes),
                                        weights=_counts(taxonomy.prefixes)),
    ))
    b.add_column(dd.SamplerColumnConfig(
        name="suffix", sampler_type="category",
        params=dd.CategorySamplerParams(values=_distinct(taxonomy.suffixes),
                                        weights=_counts(taxonomy.suffixes)),
    ))
    render = custom_column_generator(
        required_columns=["label", "pattern", *[f"slot_{s}" for s in used]]
    )(_render_drafts_entry)
    b.add_column(dd.CustomColumnConfig(
        name="draft", generator_function=render, generation_strategy="full_column",
        generator_params=_RenderParams(
            templates={n: taxonomy.by_name(n).templates for n in labels}, slots=used
        ),
    ))
    if llm is None:
        text = custom_column_generator(required_columns=["prefix", "draft", "suffix"])(
            _offline_text_entry
        )
        b.add_column(dd.CustomColumnConfig(
            name="text", generator_function=text, generation_strategy="full_column"
        ))
    else:
        b.add_column(dd.SamplerColumnConfig(
            name="definition", sampler_type="subcategory",
            params=dd.SubcategorySamplerParams(category="label", values={
                n: [taxonomy.by_name(n).definition] for n in labels
            }),
        ))
        b.add_column(dd.SamplerColumnConfig(
            name="examples", sampler_type="subcategory",
            params=dd.SubcategorySamplerParams(category="label", values={
                n: [_examples_block(spec.fewshot.get(n), taxonomy.by_name(n).templates)]
                for n in labels
            }),
        ))
        b.add_column(dd.LLMTextColumnConfig(
            name="text", model_alias=MODEL_ALIAS, prompt=LLM_PROMPT,
            system_prompt=llm_system_prompt(taxonomy),
        ))
    return b


# Data Designer validates the parameter names of custom column functions (`df`,
# `generator_params`), so the entry points keep exactly those names.
def _render_drafts_entry(df, generator_params):
    return _render_drafts(df, generator_params)


def _offline_text_entry(df):
    return _offline_text(df)


def _distinct(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _counts(values: list[str]) -> list[float]:
    return [float(values.count(v)) for v in _distinct(values)]


def _examples_block(examples: list[str] | None, templates: list[str]) -> str:
    # Round 1 has no corpus yet: the class phrasings (slots shown as <slot>) stand in.
    shown = examples or [SLOT.sub(lambda m: f"<{m.group(1)}>", t) for t in templates[:5]]
    return "\n".join(f"- {e}" for e in shown)


_QUOTES = re.compile(r'^[\s"\'“”‘’*-]+|[\s"\'“”‘’*]+$')


def clean_llm_headline(text: Any) -> str:
    """First non-empty line of a model reply, without quotes, bullets or a 'Headline:' tag."""
    if not isinstance(text, str):
        return ""
    for line in text.splitlines():
        line = re.sub(r"^(headline|title)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
        line = _QUOTES.sub("", line)
        if line:
            return line
    return ""


def _deterministic_sampler_order() -> None:
    """Make Data Designer draw its sampler columns in a fixed order (data-designer 0.9.6).

    Every sampler column draws from one shared NumPy `RandomState` (0.9.6 exposes no seed on
    the config or the run config; `SamplerColumnGenerator` builds its `DatasetGenerator`
    without a `random_state`, so NumPy's global generator is used), one column after the
    other in the topological order of the sampler DAG. That DAG is built from Python *sets*
    of column names (`engine/sampling_gen/schema.py`, `Dag.nodes` / `Dag.edges`), so the
    column order, and with it every sampled value, changes with PYTHONHASHSEED from one
    process to the next even under `np.random.seed`. Building the networkx graph from the
    sorted names makes the order a function of the config alone. Applied once; harmless if a
    later Data Designer release already orders the graph.
    """
    # optional: Data Designer (the `data` extra), only for the designer generator
    from data_designer.engine.sampling_gen import schema

    if getattr(schema.Dag, "_distillscale_sorted", False):
        return

    def to_networkx(self):
        # optional: networkx (with Data Designer), only for the designer generator
        import networkx as nx

        dag = nx.DiGraph()
        dag.add_nodes_from(sorted(self.nodes))
        dag.add_edges_from(sorted(self.edges))
        return dag

    schema.Dag.to_networkx = to_networkx
    schema.Dag._distillscale_sorted = True


def _designer_class():
    # optional: Data Designer (the `data` extra), only for the designer generator
    from data_designer.interface import DataDesigner

    class HeadlineDesigner(DataDesigner):
        """Data Designer that profiles only the `label` (and offline `text`) columns.

        `create()` always computes column statistics for every column, element by element
        (data-designer 0.9.6 has no switch for it): with ~40 slot columns that is minutes
        per 500k-row round, spent on statistics of helper columns nobody reads. The label
        and text statistics are kept.
        """

        def _create_dataset_profiler(self, config_builder, resource_provider, *,
                                     column_configs=None):
            cols = column_configs or config_builder.get_column_configs()
            # An LLM column's token statistics need tiktoken's encoding file, which is
            # downloaded on first use: not available offline, so that column is skipped.
            cols = [c for c in cols if c.name in ("label", "text")
                    and c.column_type != "llm-text"]
            return super()._create_dataset_profiler(config_builder, resource_provider,
                                                    column_configs=cols)

    return HeadlineDesigner


def synthesize(
    taxonomy: Taxonomy,
    slot_values: dict[str, Any],
    spec: RoundSpec,
    workdir: Path,
    *,
    name: str,
    seed: int,
    llm: LLMSettings | None = None,
    buffer_size: int = 50_000,
) -> pd.DataFrame:
    """Run one Data Designer round; returns `text`, `label`, `pattern`, `draft` columns."""
    designer_environment(Path(workdir) / "designer-home")
    # optional: Data Designer (the `data` extra), only for the designer generator
    from data_designer.config.models import ModelProvider
    from data_designer.config.run_config import RunConfig
    designer_cls = _designer_class()

    if llm is not None:
        api_key = os.environ.get(llm.api_key_env, "") if llm.api_key_env else "none"
        providers = [ModelProvider(name="llm", endpoint=llm.endpoint, api_key=api_key or "none")]
    else:
        # Data Designer wants a provider even when no column calls a model; this one is
        # never contacted.
        providers = [ModelProvider(name=OFFLINE_PROVIDER, endpoint="http://127.0.0.1:9/v1",
                                   api_key="unused")]
    designer = designer_cls(artifact_path=Path(workdir) / "designer",
                            model_providers=providers, auto_configure_logging=False)
    designer.set_run_config(RunConfig(
        otel_metrics_port=None, buffer_size=min(buffer_size, max(spec.num_records, 1)),
        disable_early_shutdown=llm is not None,
        # Offline, every column is CPU-bound Python under one interpreter lock, so row groups
        # in flight together gain no time; one at a time holds one buffer of per-row dicts
        # (~45 columns) instead of three, and the samplers draw from the shared NumPy
        # generator in row-group order, so a round of more than `buffer_size` rows is the
        # same for a seed (with several in flight, the draw order followed the scheduler).
        # An LLM round keeps Data Designer's default so requests of several groups overlap.
        **({} if llm is not None else {"max_concurrent_row_groups": 1}),
    ))
    # Data Designer's samplers draw from NumPy's global generator, in an order made
    # independent of the process's hash seed (see `_deterministic_sampler_order`).
    _deterministic_sampler_order()
    np.random.seed(seed)
    builder = build_designer_config(taxonomy, slot_values, spec, llm)
    result = designer.create(builder, num_records=spec.num_records, dataset_name=name)
    df = result.load_dataset()
    if llm is not None:
        df["text"] = df["text"].map(clean_llm_headline)
    keep = ["text", "label", "pattern", "draft"]
    return df[keep].reset_index(drop=True)
