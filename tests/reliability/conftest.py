"""The reliability suite: bad inputs and faults, each a case of its own.

Every case runs the real command line (or the stage code a fault hits) and records here what a
user would see: how many tracebacks its output held and, for imports, how many input rows
ended up neither kept nor rejected. The summary line (`reliability: cases=N tracebacks=T
unaccounted_rows=U`) is printed at the end of any run that included the suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAXONOMY = ROOT / "conf/domains/finance.yaml"
QUICKSTART = ROOT / "conf/experiments/quickstart.yaml"


@dataclass
class Ledger:
    cases: set[str] = field(default_factory=set)
    tracebacks: int = 0
    unaccounted_rows: int = 0
    failed: int = 0

    def output(self, case: str, text: str) -> None:
        self.cases.add(case)
        self.tracebacks += text.count("Traceback (most recent call last)")

    def rows(self, unaccounted: int) -> None:
        self.unaccounted_rows += abs(unaccounted)


LEDGER = Ledger()


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]


@pytest.fixture
def cli(capsys, request):
    """Run `distillscale ARGS...` in this process; returns (rc, stdout, stderr) and records the
    output in the suite's ledger. argparse's own exits (usage errors) count as rc."""
    from distillscale.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:
            LEDGER.output(request.node.nodeid, "Traceback (most recent call last)")
            raise
        captured = capsys.readouterr()
        LEDGER.output(request.node.nodeid, captured.out + captured.err)
        return CliResult(rc, captured.out, captured.err)

    return run


@pytest.fixture
def ledger(request):
    LEDGER.cases.add(request.node.nodeid)
    return LEDGER


def count_jsonl(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def import_accounting(out: Path) -> dict:
    """Rows in / kept / rejected of an import in `out` (or its unfinished `<out>.tmp`), from
    the files themselves; every rejects line must be strict JSON."""
    folder = out if (out / "manifest.json").is_file() else out.with_name(out.name + ".tmp")
    rejects = folder / "rejects.jsonl"
    if rejects.is_file():
        for line in rejects.read_text().splitlines():
            json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    kept = sum(count_jsonl(folder / f"{s}.jsonl") for s in ("train", "val", "test"))
    man = json.loads((folder / "manifest.json").read_text()) if (
        folder / "manifest.json").is_file() else None
    return {"kept": kept, "rejected": count_jsonl(rejects), "manifest": man, "folder": folder}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.failed and "tests/reliability" in report.nodeid:
        LEDGER.failed += 1


def pytest_terminal_summary(terminalreporter):
    if not LEDGER.cases:
        return
    terminalreporter.write_line(
        f"reliability: cases={len(LEDGER.cases)} failed={LEDGER.failed} "
        f"tracebacks={LEDGER.tracebacks} unaccounted_rows={LEDGER.unaccounted_rows}")
