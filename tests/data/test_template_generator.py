"""The template generator: at `second_event_rate` 0 it is the generator without second events,
draw for draw; above 0 a share of headlines goes on to name a second event, labelled by the
first."""

import re

import numpy as np
import pytest

from distillscale.data.generate import (
    SECOND_EVENT_JOINERS,
    _fill,
    as_clause,
    class_counts,
    generate_headlines,
)
from distillscale.domain import SLOT, Taxonomy

TREE = {
    "name": "mini",
    "task": "Classify the headline into one event class.",
    "classes": [
        {"name": "upgrade", "definition": "an analyst raised the rating", "prior": 40,
         "confusable_with": ["downgrade"],
         "templates": ["{bank} upgrades {company} to buy", "Shares of {company} rise on upgrade",
                       "{company} lifted to buy at {bank}, target ${price}"]},
        {"name": "downgrade", "definition": "an analyst cut the rating", "prior": 35,
         "templates": ["{bank} downgrades {company} to sell", "Shares of {company} fall on cut",
                       "{company} cut to sell at {bank}, sees {pct}% downside"]},
        {"name": "earnings", "definition": "quarterly results", "prior": 25,
         "templates": ["{company} profit tops estimates", "EU unit of {company} posts loss",
                       "{company} revenue up {pct}% to ${price} million"]},
    ],
    "slots": {"company": {"faker": "company", "pool": 40, "exclude": [", "]},
              "bank": ["Goldman Sachs", "UBS", "Citi"], "pct": {"int": [1, 60]},
              "price": {"float": [1, 90]}},
    "prefixes": ["", "", "UPDATE 1-", "BRIEF-"],
    "suffixes": ["", "", " - filing", " - sources"],
}


@pytest.fixture(scope="module")
def tax():
    return Taxonomy.model_validate(TREE)


def reference_headlines(tax, n, distribution, min_per_class, seed):
    """The generator as it was before second events existed, kept as the reference."""
    rng = np.random.default_rng(seed)
    slots = tax.slot_values(seed)
    rows = []
    for name, count in class_counts(tax, n, distribution, min_per_class).items():
        cls = next(c for c in tax.classes if c.name == name)
        for _ in range(count):
            t = cls.templates[int(rng.integers(len(cls.templates)))]
            text = (tax.prefixes[int(rng.integers(len(tax.prefixes)))]
                    + SLOT.sub(lambda m: _fill(m.group(1), slots[m.group(1)], rng), t)
                    + tax.suffixes[int(rng.integers(len(tax.suffixes)))])
            rows.append({"text": text, "label": name, "gold_label": name})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


@pytest.mark.parametrize("distribution, min_per_class, seed",
                         [("natural", 20, 0), ("balanced", 0, 7)])
def test_rate_zero_is_the_generator_without_second_events(tax, distribution, min_per_class, seed):
    want = reference_headlines(tax, 300, distribution, min_per_class, seed)
    assert generate_headlines(tax, 300, distribution, min_per_class, seed) == want
    assert generate_headlines(tax, 300, distribution, min_per_class, seed,
                              second_event_rate=0.0) == want


def _clause_pattern(template: str) -> re.Pattern:
    parts = SLOT.split(template)  # literal, slot, literal, ...
    body = "".join(re.escape(p) if i % 2 == 0 else ".+?" for i, p in enumerate(parts))
    # the clause may have lost its first capital
    return re.compile(f"(?i:{body[:1]}){body[1:]}" if body[:1].isalpha() else body)


def test_second_event_keeps_the_primary_label_and_writes_it_first(tax):
    base = generate_headlines(tax, 600, "natural", 20, 3)
    rows = generate_headlines(tax, 600, "natural", 20, 3, second_event_rate=0.5)
    assert len(rows) == len(base)
    doubled = 0
    for a, b in zip(base, rows):
        assert b["label"] == b["gold_label"] == a["label"]
        if "second_event" not in b:
            assert b == a
            continue
        doubled += 1
        assert b["second_event"] != b["label"]
        # prefix + primary first, then a joiner and the other class's clause, then the suffix
        suffix = max((s for s in tax.suffixes if a["text"].endswith(s) and b["text"].endswith(s)),
                     key=len)
        stem = a["text"][: len(a["text"]) - len(suffix)]
        assert b["text"].startswith(stem), (a, b)
        rest = b["text"][len(stem): len(b["text"]) - len(suffix)]
        joiner = next(j for j in SECOND_EVENT_JOINERS if rest.startswith(j))
        clause = rest[len(joiner):]
        assert any(_clause_pattern(t).fullmatch(clause)
                   for t in tax.by_name(b["second_event"]).templates), (b, clause)
    assert abs(doubled / len(rows) - 0.5) < 0.07
    every = generate_headlines(tax, 200, "balanced", 0, 3, second_event_rate=1.0)
    assert all("second_event" in r for r in every)


def test_second_event_comes_from_declared_partners_and_names_the_same_company(tax):
    rows = generate_headlines(tax, 400, "balanced", 0, 1, second_event_rate=1.0)
    # upgrade declares downgrade, so the pair holds both ways; earnings declares none and is
    # declared by none: any other class
    seen = {c: {r["second_event"] for r in rows if r["label"] == c} for c in tax.labels}
    assert seen == {"upgrade": {"downgrade"}, "downgrade": {"upgrade"},
                    "earnings": {"upgrade", "downgrade"}}
    # a Faker slot names an entity: the second event is about the same company
    pool = tax.slot_values(1)["company"]
    assert all(any(r["text"].count(v) >= 2 for v in pool) for r in rows)


def test_clause_drops_a_plain_capital_but_keeps_names_and_acronyms():
    assert as_clause("Shares of Acme fall", "Shares of {company} fall") == "shares of Acme fall"
    assert as_clause("Acme Corp beats", "{company} beats") == "Acme Corp beats"
    assert as_clause("EU fines Acme", "EU fines {company}") == "EU fines Acme"
    assert as_clause("Q3 sales at Acme", "Q{qnum} sales at {company}") == "Q3 sales at Acme"
    assert as_clause("A unit of Acme", "A unit of {company}") == "a unit of Acme"

