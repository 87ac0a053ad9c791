"""Fit: the scaling forms of each metric against the compression ratio, per pruning axis,
with bootstrap CIs and inverse predictions inside the measured range (`fit/`)."""

from __future__ import annotations

import pandas as pd

from distillscale.fit import fit_results
from distillscale.manifest import StageOutput
from distillscale.runner import Context, Stage


def _body(ctx: Context, out: StageOutput) -> None:
    results = ctx.paths.eval / "results.parquet"
    long = pd.read_parquet(results)
    models = ctx.paths.eval / "models.csv"
    if "axis" not in long.columns and models.is_file():
        # Results from before the axis column: take it from the per-model table, so curves of
        # depth and width students are fitted apart.
        long = long.merge(pd.read_csv(models)[["model", "axis"]], on="model", how="left")
    fits = fit_results(long, out.path, ctx.cfg.fit, len(ctx.taxonomy.classes), ctx.cfg.seed,
                       source=str(results))
    out.metrics["fits"] = len(fits)


# version 2: bounded asymptotes, more distinct x than parameters, estimates only inside the
# measured range, parametric bootstrap; 3: curves split by pruning axis.
STAGE = Stage("fit", _body, folder=lambda ctx: ctx.paths.fit, sections=("fit", "domain", "seed"),
              inputs=lambda ctx: {"eval": ctx.paths.eval}, collective=False, distributed=False,
              version=3)
