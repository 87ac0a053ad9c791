"""Data: the in-domain dataset from the taxonomy, generated or imported (`data/build.py`):
train/val/test.jsonl and rejects.jsonl, every rejected row kept with its reason."""

from __future__ import annotations

from pathlib import Path

from distillscale.data.build import build_dataset
from distillscale.manifest import StageOutput
from distillscale.runner import Context, Stage


def _inputs(ctx: Context) -> dict[str, Path]:
    inputs = {"taxonomy": Path(ctx.cfg.domain.taxonomy)}
    if ctx.cfg.data.generator == "file":
        inputs["source"] = Path(ctx.cfg.data.source_path)
    return inputs


def _body(ctx: Context, out: StageOutput) -> None:
    out.metrics.update(build_dataset(out.path, ctx.taxonomy, ctx.cfg.data, seed=ctx.cfg.seed))
    out.extra.update({k: out.metrics[k] for k in ("rows_in", "rows_kept", "rows_rejected")})


def _summary(ctx: Context, m: dict) -> str:
    return (f"data: {m['rows_kept']} rows kept of {m['rows_in']} "
            f"({m['rows_rejected']} rejected), splits {m['split_sizes']}")


# One rank builds the data (under srun the others wait for its manifest); no model runs.
STAGE = Stage("data", _body, folder=lambda ctx: ctx.paths.data, sections=("domain", "data", "seed"),
              inputs=_inputs, summary=_summary, collective=False, distributed=False)
