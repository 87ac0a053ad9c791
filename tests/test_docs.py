"""The README and docs/ name only commands and files that exist, and link only to files that exist.

Every `distillscale ...` command in the docs' code is resolved against the real argparse parser
(subcommands, brace alternatives, option flags, positional choices), every `make TARGET`
against the Makefile's rules, every `bash launchers/X.sh --flag` against the flags the launcher
parses, every repository path in code against the checkout, and every relative link against the
checkout (anchors against the target's headings, GitHub's way).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from distillscale.cli import _parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "recipes" / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(?!python)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)  # python: code, not commands
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:distillscale|recipes|tools|tests|launchers|conf|constraints|docs)/[\w./-]*)")
# Files the docs ask the reader to write (the README's example taxonomy).
WRITTEN_BY_THE_READER = {"conf/domains/support.yaml"}


def _code_lines(text: str) -> list[str]:
    """Shell-like lines of a markdown file: fenced lines (continuations joined, comments cut)
    and inline code spans. Prose is left out, so "make the ranks wait" is not a command."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"\s#\s.*$", "", line))
    lines += INLINE.findall(FENCE.sub("", text))
    return lines


def _words(line: str, name: str) -> list[list[str]]:
    """The argument words after each `name` in a line, up to a shell separator; brace groups
    such as `{data build|teacher}` stay one word."""
    out = []
    for m in re.finditer(rf"(?:^|[\s(/$])(?:\.venv/bin/)?{re.escape(name)}(?=\s)", line):
        rest = re.split(r"\s(?:\||&&|;|>)\s|[)`]", line[m.end():])[0]
        out.append(re.findall(r"\{[^}]*\}|\S+", rest))
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _check_cli(p: argparse.ArgumentParser, words: list[str], where: str) -> list[str]:
    """Problems with one command line against parser `p` (empty when it exists)."""
    if not words:
        return []
    word, rest = words[0], words[1:]
    subs = _subparsers(p)
    if word.startswith("{") and "|" in word:  # alternatives, each a command of its own
        return [e for alt in word[1:-1].split("|")
                for e in _check_cli(p, alt.split() + rest, where)]
    if subs and not word.startswith("-"):
        if word not in subs:
            return [f"{where}: '{word}' is not a subcommand (one of {sorted(subs)})"]
        return _check_cli(subs[word], rest, where)
    flags = {s for a in p._actions for s in a.option_strings}
    options = [w.lstrip("[").split("=")[0] for w in words]  # `[--text-column C]` is optional
    problems = [f"{where}: {p.prog} has no option {o}"
                for o in options if o.startswith("--") and o not in flags]
    choices = [set(a.choices) for a in p._actions
               if not a.option_strings and a.choices and not isinstance(a.choices, dict)]
    for w in words:
        if w.startswith("{") and "," in w:  # {data,teacher}: values of a positional
            names = set(w[1:-1].split(","))
            if not any(names <= c for c in choices):
                problems.append(f"{where}: {p.prog}: {sorted(names)} are not its choices")
    return problems


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for line in re.findall(r"^([A-Za-z0-9_.%/ -]+):(?!=)", text, re.MULTILINE)
            for t in line.split()}


def _launcher_flags(script: Path) -> set[str]:
    case = re.compile(r"^\s*((?:-h\|)?--[a-z-]+(?:\|--[a-z-]+)*)\)", re.MULTILINE)
    text = script.read_text()
    sources = [text]
    if re.search(r"\bds_(main|parse_args)\b", text):
        sources.append((REPO / "launchers" / "common.sh").read_text())
    return {f for s in sources for m in case.findall(s) for f in m.split("|")}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    body = FENCE.sub("", md.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", body, re.MULTILINE)}


def _broken_links(md: Path) -> list[str]:
    problems = []
    for target in LINK.findall(FENCE.sub("", md.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        where = f"{md.relative_to(REPO)}: link {target}"
        if not dest.exists():
            shown = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
            problems.append(f"{where}: {shown} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return problems


def _docs_commands(name: str) -> list[tuple[str, list[str]]]:
    return [(f"{md.relative_to(REPO)}: `{line.strip()}`", words)
            for md in DOCS for line in _code_lines(md.read_text())
            for words in _words(line, name)]


def test_the_docs_name_commands():
    # The checks below must have something to check: the README shows both front-door commands.
    readme = [w for where, w in _docs_commands("make") if where.startswith("README.md")]
    assert ["quickstart"] in [w[:1] for w in readme] and ["test"] in [w[:1] for w in readme]
    assert len(_docs_commands("distillscale")) >= 5


def test_every_distillscale_command_in_the_docs_exists():
    parser = _parser()
    problems = [e for where, words in _docs_commands("distillscale")
                for e in _check_cli(parser, words, where)]
    assert not problems, "\n".join(problems)


def _make_problems(commands: list[tuple[str, list[str]]], targets: set[str]) -> list[str]:
    return [f"{where}: no make target '{words[0]}'" for where, words in commands
            if words and not words[0].startswith("-") and "=" not in words[0]
            and words[0] not in targets]


def test_every_make_target_in_the_docs_exists():
    problems = _make_problems(_docs_commands("make"), _make_targets())
    assert not problems, "\n".join(problems)


def test_every_launcher_and_flag_in_the_docs_exists():
    problems = []
    for md in DOCS:
        for line in _code_lines(md.read_text()):
            for m in re.finditer(r"(?:bash |sbatch )(launchers/[\w.-]+\.sh)((?:\s+\S+)*)", line):
                script = REPO / m.group(1)
                where = f"{md.relative_to(REPO)}: `{line.strip()}`"
                if not script.is_file():
                    problems.append(f"{where}: {m.group(1)} does not exist")
                    continue
                flags = _launcher_flags(script)
                problems += [f"{where}: {m.group(1)} has no option {f}"
                             for f in re.findall(r"(?<!\S)--[a-z][a-z-]*", m.group(2))
                             if f not in flags]
    assert not problems, "\n".join(problems)


def test_every_repository_path_in_the_docs_exists():
    # Code, configs and tests named in the docs: a renamed or removed file leaves them stale.
    problems = [f"{md.relative_to(REPO)}: `{line.strip()}`: {p} does not exist"
                for md in DOCS for line in _code_lines(md.read_text())
                for p in REPO_PATH.findall(line)
                if p not in WRITTEN_BY_THE_READER and not (REPO / p.rstrip(".")).exists()]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(md):
    problems = _broken_links(md)
    assert not problems, "\n".join(problems)


def test_a_broken_link_or_command_is_caught(tmp_path, monkeypatch):
    # The checks themselves: an unknown subcommand, option, positional choice or make target,
    # a missing file and a missing heading are each reported.
    parser = _parser()
    assert _check_cli(parser, ["frobnicate", "CONFIG"], "x")
    assert _check_cli(parser, ["data", "build", "--rowz", "3"], "x")
    assert _check_cli(parser, ["launch", "stage", "{data,prune}", "CONFIG"], "x")
    assert _check_cli(parser, ["{data build|teacher}", "--out", "D"], "x")  # teacher has no --out
    assert not _check_cli(parser, ["{data build|data import}", "--out", "D"], "x")
    assert not _check_cli(parser, ["data", "import", "[--text-column", "C]"], "x")
    assert not _check_cli(parser, ["launch", "stage", "{data,teacher,eval,fit}", "CONFIG"], "x")
    targets = _make_targets()
    assert {"quickstart", "test"} <= targets
    assert _make_problems([("x", ["quickstrat"])], targets)
    assert not _make_problems([("x", ["PYTHON312=/usr/bin/python3.12", "test"])], targets)
    assert "--sweep" in _launcher_flags(REPO / "launchers" / "sweep.sh")
    assert "--config" in _launcher_flags(REPO / "launchers" / "prune_distill.sh")
    assert "--config" not in _launcher_flags(REPO / "launchers" / "sweep.sh")

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# Here it is\n\n## data.dedup_backend\n")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/missing.md) [b](docs/there.md#here-it-is) [c](docs/there.md#gone)\n"
                    "[d](https://example.org/x) [e](docs/there.md#datadedup_backend)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    problems = _broken_links(page)
    assert len(problems) == 2, problems
    assert "docs/missing.md does not exist" in problems[0] and "#gone" in problems[1]
