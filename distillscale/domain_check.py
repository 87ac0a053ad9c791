"""`distillscale domain check FILE`: what is wrong with a taxonomy, in seconds, before any build.

Three parts, none of which starts Ray or loads an embedding model:

1. **errors**: every schema problem the loader finds (`distillscale.domain.taxonomy_errors`),
   one line each with file, line and key;
2. **warnings**: things the loader accepts but that are almost always mistakes - priors that do
   not sum to 100 or are written as fractions, an alias that is another class's name, stray
   braces that would end up inside generated text, slots no template uses, classes with few
   templates, a template shared by two classes, countries the knowledge slot cannot resolve;
3. **what the generator makes**: a sample of headlines per class, and how separable the task
   is - cross-validated TF-IDF + logistic-regression macro F1 (scikit-learn), the most
   confused class pairs and each class's giveaway n-grams (n-grams that occur in a large share
   of the class's rows and almost never elsewhere). A task a bag of words solves leaves
   nothing for compression to lose: every student's curve is flat.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from distillscale.config import ConfigError, LLMEndpointConfig, load_config, parse_override
from distillscale.data.dedup import char_shingles, normalize
from distillscale.data.generate import generate_headlines
from distillscale.data.io import read_table_rows
from distillscale.data.serve import llm_endpoint
from distillscale.domain import (
    SLOT,
    SNAKE,
    STRAY_BRACE,
    Taxonomy,
    key_lines,
    norm_label,
    taxonomy_errors,
)
from distillscale.knowledge.general import country_name
from distillscale.manifest import write_text_atomic

# Fewer phrasings than this per class and the offline generators repeat one structure.
MIN_TEMPLATES = 4
# Above this cross-validated macro F1, a bag of words solves the task.
TRIVIAL_F1 = 0.95
# An n-gram is a giveaway of a class when at least GIVEAWAY_PRECISION of the rows holding it
# are of that class and it occurs in at least GIVEAWAY_COVERAGE of the class's rows.
GIVEAWAY_PRECISION = 0.95
GIVEAWAY_COVERAGE = 0.25
# Character 5-gram Jaccard from which two templates count as near duplicates (the recipe's
# default `data.near_dup_threshold`).
NEAR_TEMPLATE = 0.8


@dataclass
class Separability:
    rows: int
    folds: int
    source: str
    macro_f1: float
    accuracy: float
    confusable: list[dict] = field(default_factory=list)   # a, b, rate, a_as_b, b_as_a
    giveaways: dict[str, list[dict]] = field(default_factory=dict)  # class -> ngram, coverage
    giveaway_share: float = 0.0  # rows holding a giveaway n-gram of their own class


@dataclass
class CheckReport:
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    samples: dict[str, list[str]] = field(default_factory=dict)
    separability: Separability | None = None
    # The generated rows' `data.second_event_rate`, and the share of them that got one.
    second_event_rate: float = 0.0
    second_event_share: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def taxonomy_warnings(path: Path, tax: Taxonomy) -> list[str]:
    """The loader's accepted-but-suspicious cases, each `<file>:<line>: <key>: <message>`."""
    lines = key_lines(path)

    def at(*key) -> str:
        key = tuple(str(k) for k in key)
        for n in range(len(key), -1, -1):
            if key[:n] in lines:
                return f"{path}:{lines[key[:n]]}: {'.'.join(key)}"
        return f"{path}: {'.'.join(key)}"

    out: list[str] = []
    priors = [c.prior for c in tax.classes]
    total = float(sum(priors))
    if max(priors) <= 1 and abs(total - 1) <= 0.05:
        out.append(f"{at('classes')}: priors sum to {total:.3g}: they look like fractions, but "
                   "a prior is a percentage (the priors should sum to 100)")
    elif abs(total - 100) > 1:
        out.append(f"{at('classes')}: priors sum to {total:.4g}, not 100 (they are rescaled, "
                   f"so each class gets prior / {total:.4g} of the data)")
    names = {norm_label(c.name): c.name for c in tax.classes}
    for i, c in enumerate(tax.classes):
        for j, a in enumerate(c.aliases):
            other = names.get(norm_label(a))
            if other is not None and other != c.name:
                out.append(f"{at('classes', i, 'aliases', j)}: alias {a!r} of {c.name} is the "
                           f"name of class {other}: a label {a!r} means {other}, never {c.name}")
        if not tax.for_import_only and 0 < len(c.templates) < MIN_TEMPLATES:
            out.append(f"{at('classes', i, 'templates')}: class {c.name} has only "
                       f"{len(c.templates)} template(s); fewer than {MIN_TEMPLATES} phrasings "
                       "make near-identical rows that dedup removes and a student memorises")
        for j, t in enumerate(c.templates):
            rest = SLOT.sub("", t)
            if STRAY_BRACE.search(rest):
                out.append(f"{at('classes', i, 'templates', j)}: template {t!r} has a stray "
                           "brace (a slot is `{lowercase_name}`): it would appear verbatim in "
                           "generated text")
    for key in ("prefixes", "suffixes"):
        for j, s in enumerate(getattr(tax, key)):
            if STRAY_BRACE.search(s):
                out.append(f"{at(key, j)}: {s!r} has a brace: decorations are not templates, "
                           "it would appear verbatim")
    seen: dict[str, tuple[int, int, str]] = {}
    for i, c in enumerate(tax.classes):
        for j, t in enumerate(c.templates):
            key = " ".join(t.lower().split())
            if key in seen and seen[key][2] != c.name:
                out.append(f"{at('classes', i, 'templates', j)}: template {t!r} of {c.name} is "
                           f"also a template of {seen[key][2]}: their rows are identical text "
                           "with different labels")
            seen.setdefault(key, (i, j, c.name))
    out += _cross_class_near_templates(tax, at)
    used = {s for c in tax.classes for t in c.templates for s in SLOT.findall(t)}
    for name in sorted(set(tax.slots) - used - {tax.knowledge_slot}):
        out.append(f"{at('slots', name)}: slot {name!r} is used by no template")
    out += _knowledge_warnings(tax, at)
    return out


def _cross_class_near_templates(tax: Taxonomy, at, threshold: float = NEAR_TEMPLATE) -> list[str]:
    """Template pairs of two classes that the near-duplicate pass would see as one text.

    Jaccard similarity of the character 5-gram sets the near-duplicate index hashes (slots
    read as their names): the contrast an author writes on purpose ("shows benefit" / "shows
    no benefit") is what `data.cross_class_duplicates` then decides about."""
    shingles = [(i, j, c.name, t, set(char_shingles(SLOT.sub(lambda m: m.group(1), t))))
                for i, c in enumerate(tax.classes) for j, t in enumerate(c.templates)]
    out = []
    for n, (i, j, name, t, a) in enumerate(shingles):
        for i2, _, name2, t2, b in shingles[n + 1:]:
            if name2 == name or not a or not b:
                continue
            jac = len(a & b) / len(a | b)
            if threshold <= jac < 1.0:
                out.append(f"{at('classes', i, 'templates', j)}: template {t!r} of {name} and "
                           f"{t2!r} of {name2} are near duplicates (Jaccard {jac:.2f}): their "
                           "rows meet in the near-duplicate pass, where "
                           "data.cross_class_duplicates keeps (default) or rejects them")
    return out


def _knowledge_warnings(tax: Taxonomy, at) -> list[str]:
    out = []
    if tax.knowledge_slot is not None:
        values = tax.slots[tax.knowledge_slot]
        bad = [str(v) for v in values if country_name(str(v)) is None]
        if bad:
            out.append(f"{at('slots', tax.knowledge_slot)}: knowledge_slot values that are not "
                       f"countries (no facts about them): {bad[:8]}")
        return out
    for name, spec in sorted(tax.slots.items()):
        if isinstance(spec, list) and spec and all(country_name(str(v)) for v in spec):
            out.append(f"{at('slots', name)}: slot {name!r} holds countries but knowledge_slot "
                       "is unset: the teacher's general-knowledge facts will not include them "
                       f"(set `knowledge_slot: {name}` if they should)")
    return out


def sample_headlines(rows: list[dict], labels: list[str],
                     per_class: int = 3) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in labels}
    for r in rows:
        if len(out[r["label"]]) < per_class:
            out[r["label"]].append(r["text"])
    return out


def bag_of_words_model():
    """TF-IDF (word 1-2-grams) + logistic regression, the baseline every figure here uses."""
    # heavy: scikit-learn (about a second to import), only where it fits or scores
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # saga reaches the lbfgs solution's F1 here (0.991 on 2,000 rows of a shipped domain) in
    # a twelfth of the time; a mild penalty (C=10) lets the baseline use rare but decisive n-grams.
    # saga visits rows in a random order: seeded, the dataset card's figure is the same each build.
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                         LogisticRegression(solver="saga", C=10.0, max_iter=100, tol=1e-3,
                                            random_state=0))


def heldout_baseline(train: list[dict], test: list[dict], *, max_train: int = 20_000,
                     seed: int = 0) -> dict | None:
    """The bag-of-words baseline fitted on a data set's train split (at most `max_train` rows,
    a seeded sample) and scored on its test split: the figure to hold next to the teacher's
    in-domain scores on the same split. None when either split is too small to say."""
    from sklearn.metrics import accuracy_score, f1_score  # heavy: scikit-learn

    if len({r["label"] for r in train}) < 2 or not test:
        return None
    if len(train) > max_train:
        pick = np.random.default_rng(seed).choice(len(train), max_train, replace=False)
        train = [train[i] for i in sorted(pick)]
    model = bag_of_words_model().fit([r["text"] for r in train], [r["label"] for r in train])
    pred = model.predict([r["text"] for r in test])
    gold = [r["label"] for r in test]
    return {"train_rows": len(train), "test_rows": len(test),
            "macro_f1": float(f1_score(gold, pred, average="macro")),
            "accuracy": float(accuracy_score(gold, pred))}


def separability(texts: list[str], labels: list[str], *, folds: int = 5, seed: int = 0,
                 source: str = "templates", top_pairs: int = 5,
                 top_ngrams: int = 3) -> Separability:
    """Cross-validated TF-IDF + logistic regression, confusions and giveaway n-grams."""
    # heavy: scikit-learn (about a second to import), only where it fits or scores
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    # Exact duplicates would sit on both sides of a fold and flatter the baseline.
    keep: dict[str, int] = {}
    for i, t in enumerate(texts):
        keep.setdefault(normalize(t), i)
    idx = sorted(keep.values())
    texts = [texts[i] for i in idx]
    y = np.asarray([labels[i] for i in idx])
    counts = Counter(y.tolist())
    ok = np.array([counts[v] >= folds for v in y])
    texts, y = [t for t, k in zip(texts, ok) if k], y[ok]
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise ValueError(f"separability needs two classes with at least {folds} distinct rows")
    model = bag_of_words_model()
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, texts, y, cv=cv, n_jobs=1)
    cm = confusion_matrix(y, pred, labels=classes)
    support = cm.sum(axis=1)
    pairs = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            wrong = int(cm[a, b] + cm[b, a])
            if wrong:
                pairs.append({"a": classes[a], "b": classes[b],
                              "rate": wrong / float(support[a] + support[b]),
                              "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a])})
    pairs.sort(key=lambda p: (-p["rate"], p["a"], p["b"]))
    # Giveaways: document frequencies of word 1-3-grams per class.
    vec = CountVectorizer(ngram_range=(1, 3), binary=True, min_df=2)
    x = vec.fit_transform(texts)
    vocab = np.asarray(vec.get_feature_names_out())
    df_all = np.asarray(x.sum(axis=0)).ravel()
    giveaways: dict[str, list[dict]] = {}
    has_giveaway = np.zeros(len(texts), dtype=bool)
    for c in classes:
        rows = np.flatnonzero(y == c)
        df_c = np.asarray(x[rows].sum(axis=0)).ravel()
        cover = df_c / len(rows)
        prec = np.divide(df_c, df_all, out=np.zeros_like(cover), where=df_all > 0)
        hit = np.flatnonzero((prec >= GIVEAWAY_PRECISION) & (cover >= GIVEAWAY_COVERAGE))
        hit = hit[np.argsort(-cover[hit], kind="stable")]
        giveaways[c] = [{"ngram": str(vocab[h]), "coverage": float(cover[h]),
                         "precision": float(prec[h])} for h in hit[:top_ngrams]]
        if len(hit):
            has_giveaway[rows] |= np.asarray(x[rows][:, hit].sum(axis=1)).ravel() > 0
    return Separability(
        rows=len(texts), folds=folds, source=source,
        macro_f1=float(f1_score(y, pred, average="macro")),
        accuracy=float(accuracy_score(y, pred)), confusable=pairs[:top_pairs],
        giveaways=giveaways, giveaway_share=float(has_giveaway.mean()),
    )


def labelled_rows(tax: Taxonomy, path: Path, text_column: str = "text",
                  label_column: str = "label") -> tuple[list[str], list[str], int]:
    """(texts, class names, rows whose label matches no class) of a user's labelled file."""
    texts, labels, unknown = [], [], 0
    for r in read_table_rows(path, text_column, label_column):
        label = tax.match_label(r.get("label"))
        text = str(r.get("text") or "").strip()
        if "_error" in r or not text:
            continue
        if label is None:
            unknown += 1
            continue
        texts.append(text)
        labels.append(label)
    return texts, labels, unknown


def check_domain(path: str | Path, *, rows: int = 2000, seed: int = 0, folds: int = 5,
                 separability_check: bool = True, data: Path | None = None,
                 text_column: str = "text", label_column: str = "label",
                 second_event_rate: float = 0.0) -> CheckReport:
    """Errors, warnings, samples and separability of a taxonomy. The rows come from the data
    stage's own template generator, with `second_event_rate` as `data.second_event_rate`."""
    path = Path(path)
    report = CheckReport(str(path), second_event_rate=second_event_rate)
    tax, report.errors = taxonomy_errors(path)
    if tax is None:
        return report
    report.warnings = taxonomy_warnings(path, tax)
    generates = not tax.for_import_only
    gen: list[dict] = []
    if generates:
        # One generation serves the samples and the baseline (the Faker pools are the cost).
        n = rows if separability_check and data is None else 3 * len(tax.classes)
        gen = generate_headlines(tax, n, "balanced", 0, seed,
                                 second_event_rate=second_event_rate)
        report.second_event_share = sum("second_event" in r for r in gen) / max(len(gen), 1)
        report.samples = sample_headlines(gen, tax.labels)
    if not separability_check:
        return report
    if data is not None:
        texts, labels, unknown = labelled_rows(tax, Path(data), text_column, label_column)
        if unknown:
            report.warnings.append(f"{data}: {unknown} row(s) have a label that is no class's "
                                   "name or alias (left out of the separability check)")
        source = str(data)
    elif generates:
        texts, labels = [r["text"] for r in gen], [r["label"] for r in gen]
        source = f"template generator, {rows:,} rows, balanced"
        if second_event_rate > 0:
            source += (f", second event in {report.second_event_share:.0%} "
                       f"(data.second_event_rate={second_event_rate:g})")
    else:
        return report
    report.separability = separability(texts, labels, folds=folds, seed=seed, source=source)
    sep = report.separability
    if sep.macro_f1 >= TRIVIAL_F1:
        report.warnings.append(
            f"{path}: separability: a TF-IDF + logistic-regression baseline scores macro F1 "
            f"{sep.macro_f1:.3f}: the task is (nearly) solved by word counts, so compressed "
            "students will all look as good as the teacher; share phrasings across confusable "
            "classes, mention a second event (data.second_event_rate; measure it here with "
            "--second-event-rate), vary the structure")
    return report


def format_report(report: CheckReport) -> str:
    out = [f"domain check: {report.path}"]
    if report.errors:
        out += ["", f"errors ({len(report.errors)}):"] + [f"  {e}" for e in report.errors]
    if report.warnings:
        out += ["", f"warnings ({len(report.warnings)}):"] + [f"  {w}" for w in report.warnings]
    if report.samples:
        out += ["", "sample headlines:"]
        for c, texts in report.samples.items():
            out.append(f"  {c}:")
            out += [f"    - {t}" for t in texts]
    sep = report.separability
    if sep is not None:
        out += ["", f"separability ({sep.source}; {sep.rows:,} distinct rows, {sep.folds}-fold):",
                (f"  TF-IDF + logistic regression: macro F1 {sep.macro_f1:.3f}, "
                 f"accuracy {sep.accuracy:.3f}"),
                f"  rows holding a giveaway n-gram of their own class: {sep.giveaway_share:.1%}"]
        if sep.confusable:
            out.append("  most confused pairs (share of both classes' rows):")
            out += [f"    {p['a']} <-> {p['b']}: {p['rate']:.1%} ({p['a_as_b']} + {p['b_as_a']})"
                    for p in sep.confusable]
        gv = {c: g for c, g in sep.giveaways.items() if g}
        if gv:
            out.append("  giveaway n-grams (share of the class's rows holding it):")
            for c, g in gv.items():
                out.append(f"    {c}: " + ", ".join(f"'{x['ngram']}' {x['coverage']:.0%}"
                                                     for x in g))
    verdict = "FAILED" if report.errors else "ok"
    out += ["", f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# `distillscale domain draft CLASSES.csv`: a first taxonomy from class definitions
# ---------------------------------------------------------------------------------------------

# A class list's columns: `name` and `definition` are required; `prior` (percent; missing:
# equal shares), `aliases` and `examples` (several values separated by `|`) are optional.
DRAFT_COLUMNS = ("name", "definition", "prior", "aliases", "examples")
# One template or value per reply line; bullets, numbering and quotes are dropped.
_LINE_MARK = re.compile(r'^\s*(?:[-*•]+|\(?\d{1,3}[.):])\s*')
_EDGE_QUOTES = re.compile(r'^[\s"\'“”‘’`]+|[\s"\'“”‘’`]+$')
_PLACEHOLDER = re.compile(r"\{([^{}]{1,40})\}")
# A drafting reply holds several lines: the per-headline `data.llm.max_tokens` is too short.
DRAFT_MAX_TOKENS = 1024


@dataclass
class DraftClass:
    name: str
    definition: str
    prior: float | None
    aliases: list[str]
    examples: list[str]


def read_class_list(path: str | Path) -> list[DraftClass]:
    """The classes of a CSV class list; a bad row is a one-line error naming file and line."""

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: class list not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [norm_label(h) for h in reader.fieldnames or []]
        missing = [c for c in ("name", "definition") if c not in header]
        if missing:
            raise ConfigError(f"{path}:1: the class list needs columns name and definition "
                              f"(missing: {', '.join(missing)}; found: {reader.fieldnames})")
        reader.fieldnames = header
        out: list[DraftClass] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            get = {k: (v or "").strip() for k, v in row.items() if k is not None}
            name = norm_label(get.get("name", ""))
            if not name:
                raise ConfigError(f"{path}:{line}: name: empty class name")
            if not SNAKE.match(name):
                raise ConfigError(f"{path}:{line}: name: {get['name']!r} does not make a class "
                                  "name (letters first, then letters, digits, underscores)")
            if name in seen:
                raise ConfigError(f"{path}:{line}: name: class {name!r} is also on line "
                                  f"{seen[name]}")
            seen[name] = line
            definition = get.get("definition", "")
            if len(definition) < 3:
                raise ConfigError(f"{path}:{line}: definition: class {name} needs a definition")
            prior = None
            if get.get("prior"):
                try:
                    prior = float(get["prior"].rstrip("%"))
                except ValueError:
                    raise ConfigError(f"{path}:{line}: prior: {get['prior']!r} is not a "
                                      "number (percent)") from None
                if prior <= 0:
                    raise ConfigError(f"{path}:{line}: prior: must be above 0 (got {prior})")
            split = [s.strip() for s in get.get("examples", "").split("|")]
            aliases = [s.strip() for s in get.get("aliases", "").split("|") if s.strip()]
            out.append(DraftClass(name, definition, prior, aliases, [s for s in split if s]))
    if len(out) < 2:
        raise ConfigError(f"{path}: a class list needs at least two classes (found {len(out)})")
    given = [c.prior for c in out if c.prior is not None]
    if given and len(given) < len(out):
        raise ConfigError(f"{path}: prior: give a prior for every class or for none")
    return out


def draft_system_prompt(task: str, classes: list[DraftClass]) -> str:
    listed = "; ".join(f"{c.name}: {c.definition}" for c in classes)
    return (f"You help write a labelled data set for a text classifier. The task: {task} "
            f"The classes: {listed}. Follow the requested reply format exactly.")


def draft_template_prompt(c: DraftClass, others: list[DraftClass], n: int) -> str:
    examples = "\n".join(f"- {e}" for e in c.examples) or "- (none given)"
    near = ", ".join(o.name for o in others)
    return (f"Class: {c.name} ({c.definition}).\n"
            f"Example texts of this class:\n{examples}\n"
            f"Write {n} different templates of texts of this class, one per line. In each, "
            "replace names, organisations, places, products and numbers with placeholders in "
            "braces written in snake_case, e.g. {company}, {country}, {amount}; reuse the "
            "same placeholder names across templates. Vary the structure. Use wording that "
            f"texts of the other classes ({near}) could share: the class must follow from "
            "what happened, not from one giveaway word. Reply with the templates only, one per "
            "line.")


def draft_slot_prompt(slot: str, uses: list[str], n: int) -> str:
    shown = "\n".join(f"- {t}" for t in uses[:4])
    return (f"Placeholder: {{{slot}}}\nIt is used in templates like:\n{shown}\n"
            f"Write {n} different realistic values for {{{slot}}}, one per line, exactly as "
            "they would appear in the text. Reply with the values only, one per line.")


def _reply_lines(text: str) -> list[str]:
    out = []
    for line in (text or "").splitlines():
        line = _EDGE_QUOTES.sub("", _LINE_MARK.sub("", _EDGE_QUOTES.sub("", line)))
        if line:
            out.append(line)
    return out


def clean_template(line: str) -> str | None:
    """A reply line as a template: placeholders folded to snake_case slot names; None for a
    preamble ("Here are the templates:"), a line without a placeholder (it would generate
    one text, over and over) or one that would leave a stray brace in the generated text."""
    if line.endswith(":"):
        return None
    fixed = _PLACEHOLDER.sub(lambda m: "{" + norm_label(m.group(1)) + "}", line)
    names = SLOT.findall(fixed)
    if not names or any(not SNAKE.match(s) for s in names):
        return None
    return None if STRAY_BRACE.search(SLOT.sub("", fixed)) else fixed


def draft_taxonomy(
    class_list: str | Path,
    out: str | Path,
    *,
    task: str,
    llm,
    name: str | None = None,
    templates_per_class: int = 8,
    values_per_slot: int = 24,
    seed: int = 0,
    work_dir: str | Path | None = None,
) -> Taxonomy:
    """Draft a taxonomy from a class list through an OpenAI-compatible endpoint and write it.

    `llm` is a `data.llm` section (`LLMEndpointConfig`): an endpoint URL, or `serve` to start
    the server for the draft. Every prompt is built from `task` and the classes' definitions
    and examples: one request per class for its templates, then one per placeholder the
    templates use for its values. A list slot whose values are all countries becomes the
    `knowledge_slot`. The file is validated like any taxonomy before it is written
    (atomically); `domain check` on it shows what the draft still needs.
    """

    from openai import OpenAI  # heavy/optional: the openai client, only for drafting


    classes = read_class_list(class_list)
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.parent / f".{out.stem}.draft"
    system = draft_system_prompt(task, classes)
    api_key = (os.environ.get(llm.api_key_env, "") if llm.api_key_env else "") or "none"

    with llm_endpoint(llm, work) as url:
        client = OpenAI(base_url=url, api_key=api_key, timeout=llm.timeout_s, max_retries=2)

        def ask(prompt: str) -> str:
            r = client.chat.completions.create(
                model=llm.model, temperature=llm.temperature, top_p=llm.top_p, seed=seed,
                max_tokens=max(llm.max_tokens, DRAFT_MAX_TOKENS),
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": prompt}])
            return r.choices[0].message.content or ""

        with ThreadPoolExecutor(max_workers=llm.max_parallel_requests) as pool:
            replies = list(pool.map(ask, [
                draft_template_prompt(c, [o for o in classes if o is not c], templates_per_class)
                for c in classes]))
            templates: dict[str, list[str]] = {}
            for c, reply in zip(classes, replies):
                kept = [t for t in map(clean_template, _reply_lines(reply)) if t]
                kept = list(dict.fromkeys(kept))[:templates_per_class]
                if not kept:
                    raise RuntimeError(f"domain draft: class {c.name}: the model's reply held "
                                       f"no usable template: {reply[:200]!r}")
                templates[c.name] = kept
            uses: dict[str, list[str]] = {}
            for ts in templates.values():
                for t in ts:
                    for s in dict.fromkeys(SLOT.findall(t)):
                        uses.setdefault(s, []).append(t)
            slots = sorted(uses)
            replies = list(pool.map(ask, [draft_slot_prompt(s, uses[s], values_per_slot)
                                          for s in slots]))
    values: dict[str, list[str]] = {}
    for s, reply in zip(slots, replies):
        vals = [v for v in _reply_lines(reply) if not STRAY_BRACE.search(v)]
        vals = list(dict.fromkeys(vals))[:values_per_slot]
        if not vals:
            raise RuntimeError(f"domain draft: slot {s}: the model's reply held no value: "
                               f"{reply[:200]!r}")
        values[s] = vals

    countries = [s for s in slots if all(country_name(v) for v in values[s])]
    equal = 100.0 / len(classes)
    tree: dict[str, Any] = {
        "name": name or norm_label(Path(class_list).stem) or "domain",
        "task": task,
        "classes": [{"name": c.name, "definition": c.definition, "aliases": c.aliases,
                     "prior": round(c.prior if c.prior is not None else equal, 2),
                     "templates": templates[c.name]} for c in classes],
        "slots": {s: values[s] for s in slots},
    }
    if countries:
        tree["knowledge_slot"] = max(countries, key=lambda s: len(values[s]))
    tax = Taxonomy.model_validate(tree)
    header = (f"# Drafted by `distillscale domain draft {class_list}` with {llm.model}.\n"
              f"# Review it: `distillscale domain check {out}` shows errors, warnings, sample\n"
              "# texts and how separable the classes are.\n")
    write_text_atomic(out, header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True,
                                                   width=100))
    return tax


def draft_command(args) -> int:
    """`domain draft`: write the drafted taxonomy, then print its check (no separability)."""
    fields: dict[str, Any] = {}
    if args.config is not None:
        llm = load_config(args.config).data.llm
        fields = llm.model_dump() if llm is not None else {}
    for text in args.overrides or []:
        keys, value = parse_override(text)
        if keys[:2] != ["data", "llm"] or len(keys) != 3:
            raise ConfigError(f"command line: {text!r}: domain draft takes data.llm.KEY=VALUE "
                              "settings only")
        fields[keys[2]] = value
    for flag in ("templates", "values"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"command line: --{flag} must be at least 1")
    try:
        llm = LLMEndpointConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"command line: data.llm.{key}: {err['msg']} (give the endpoint "
                          "with --config or data.llm.endpoint=URL data.llm.model=NAME)") from None
    tax = draft_taxonomy(args.classes, args.out, task=args.task, llm=llm, name=args.name,
                         templates_per_class=args.templates, values_per_slot=args.values,
                         seed=args.seed)
    print(f"drafted {len(tax.classes)} classes, {len(tax.slots)} slots -> {args.out}")
    print(format_report(check_domain(args.out, separability_check=False)))
    return 0
