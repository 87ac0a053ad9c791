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

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distillscale.data.dedup import char_shingles, normalize
from distillscale.data.generate import generate_headlines
from distillscale.data.io import read_table_rows
from distillscale.domain import (
    SLOT,
    STRAY_BRACE,
    Taxonomy,
    key_lines,
    norm_label,
    taxonomy_errors,
)
from distillscale.knowledge.general import country_name

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


def separability(texts: list[str], labels: list[str], *, folds: int = 5, seed: int = 0,
                 source: str = "templates", top_pairs: int = 5,
                 top_ngrams: int = 3) -> Separability:
    """Cross-validated TF-IDF + logistic regression, confusions and giveaway n-grams."""
    # heavy: scikit-learn (about a second to import), only where it fits or scores
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

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
    # saga reaches the lbfgs solution's F1 here (0.991 on finance, 2,000 rows) in a twelfth
    # of the time; a mild penalty (C=10) lets the baseline use rare but decisive n-grams.
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(solver="saga", C=10.0, max_iter=100, tol=1e-3))
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
                 text_column: str = "text", label_column: str = "label") -> CheckReport:
    path = Path(path)
    report = CheckReport(str(path))
    tax, report.errors = taxonomy_errors(path)
    if tax is None:
        return report
    report.warnings = taxonomy_warnings(path, tax)
    generates = not tax.for_import_only
    gen: list[dict] = []
    if generates:
        # One generation serves the samples and the baseline (the Faker pools are the cost).
        n = rows if separability_check and data is None else 3 * len(tax.classes)
        gen = generate_headlines(tax, n, "balanced", 0, seed)
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
    else:
        return report
    report.separability = separability(texts, labels, folds=folds, seed=seed, source=source)
    sep = report.separability
    if sep.macro_f1 >= TRIVIAL_F1:
        report.warnings.append(
            f"{path}: separability: a TF-IDF + logistic-regression baseline scores macro F1 "
            f"{sep.macro_f1:.3f}: the task is (nearly) solved by word counts, so compressed "
            "students will all look as good as the teacher; share phrasings across confusable "
            "classes, mention a second event, vary the structure")
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
                f"  TF-IDF + logistic regression: macro F1 {sep.macro_f1:.3f}, "
                f"accuracy {sep.accuracy:.3f}",
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
