"""`distillscale` command line: one subcommand per stage and `run` for a whole experiment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from pydantic import ValidationError

from distillscale.config import ConfigError, load_config

STAGES = ("teacher", "prune", "distill", "eval", "fit", "report")


def _offline_defaults() -> None:
    # Compute nodes rarely reach a hub; nothing here downloads at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Megatron-Bridge 0.6 logs a full traceback at INFO for every optional TE symbol it probes.
    logging.getLogger("megatron.bridge").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distillscale", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a whole experiment (every stage, resumable)")
    r.add_argument("config", type=Path)
    r.add_argument("overrides", nargs="*", help="key.sub=value")
    for stage in STAGES:
        s = sub.add_parser(stage, help=f"run the {stage} stage of an experiment")
        s.add_argument("config", type=Path)
        s.add_argument("overrides", nargs="*", help="key.sub=value")
        if stage in ("prune", "distill"):
            s.add_argument("--student", help="only this student (default: all)")
    d = sub.add_parser("data", help="build or import a dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="generate a labelled dataset for a domain")
    b.add_argument("--domain", type=Path, default=Path("conf/domains/finance.yaml"))
    b.add_argument("--rows", type=int, default=3000)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("overrides", nargs="*", help="data.key=value")
    i = dsub.add_parser("import", help="import your own CSV / JSONL / Parquet headlines")
    i.add_argument("--input", type=Path, required=True)
    i.add_argument("--domain", type=Path, default=Path("conf/domains/finance.yaml"))
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--text-column", default="text")
    i.add_argument("--label-column", default="label")
    i.add_argument("--seed", type=int, default=0)
    return ap


def _data_command(args) -> int:
    from distillscale.config import DataConfig, parse_override
    from distillscale.data.build import build_dataset
    from distillscale.domain import load_taxonomy
    from distillscale.manifest import atomic_stage

    fields: dict = {}
    for text in getattr(args, "overrides", []) or []:
        keys, value = parse_override(text)
        keys = keys[1:] if keys[0] == "data" else keys
        fields[".".join(keys)] = value
    if args.data_command == "import":
        fields.update(generator="file", source_path=str(args.input))
        inputs = {"taxonomy": args.domain, "source": args.input}
    else:
        fields.update(num_examples=args.rows)
        inputs = {"taxonomy": args.domain}
    try:
        dcfg = DataConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"command line: data.{key}: {err['msg']}") from None
    taxonomy = load_taxonomy(args.domain)
    h = f"{dcfg.model_dump_json()}:{args.seed}"
    with atomic_stage(args.out, "data", h, inputs) as out:
        out.metrics.update(build_dataset(
            out.path, taxonomy, generator=dcfg.generator, num_examples=dcfg.num_examples,
            target_distribution=dcfg.target_distribution, min_per_class=dcfg.min_per_class,
            val_fraction=dcfg.val_fraction, test_fraction=dcfg.test_fraction, seed=args.seed,
            source_path=dcfg.source_path, text_column=getattr(args, "text_column", "text"),
            label_column=getattr(args, "label_column", "label"),
        ))
        out.extra.update({k: out.metrics[k] for k in ("rows_in", "rows_kept", "rows_rejected")})
        m = out.metrics
    print(f"in={m['rows_in']} kept={m['rows_kept']} rejected={m['rows_rejected']} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = _parser().parse_args(argv)
    try:
        if args.command == "data":
            return _data_command(args)
        cfg = load_config(args.config, args.overrides)
        from distillscale import pipeline

        if args.command == "run":
            pipeline.run_all(cfg)
        elif args.command in ("prune", "distill"):
            students = [s for s in cfg.students if args.student in (None, s.name)]
            if not students:
                raise ConfigError(f"{args.config}: students: no student named {args.student!r}")
            fn = pipeline.run_prune if args.command == "prune" else pipeline.run_distill
            for s in students:
                fn(cfg, s)
        else:
            getattr(pipeline, f"run_{args.command}")(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
