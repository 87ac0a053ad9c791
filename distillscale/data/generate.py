"""Minimal offline headline generator: fill each class's templates from the taxonomy's slots.

The full data recipe (`generator: designer`: Data Designer synthesis + NeMo-Curator curation,
see `recipe.py`) uses the same templates; this generator keeps the quickstart fast and
dependency-light (no Ray, no embedding model). `data.second_event_rate` makes some headlines
name a second event after the one they are labelled by (docs/domains.md).
"""

from __future__ import annotations

import numpy as np

from distillscale.domain import SLOT, FakerSlot, RangeSlot, Taxonomy


def class_counts(
    taxonomy: Taxonomy, n: int, target_distribution: str, min_per_class: int
) -> dict[str, int]:
    k = len(taxonomy.classes)
    if target_distribution == "balanced":
        shares = {c.name: 1.0 / k for c in taxonomy.classes}
    else:
        shares = taxonomy.priors()
    counts = {name: max(min_per_class, round(share * n)) for name, share in shares.items()}
    # Trim the largest classes so the total matches n where the floor allows it.
    excess = sum(counts.values()) - n
    for name in sorted(counts, key=counts.get, reverse=True):
        if excess <= 0:
            break
        take = min(excess, counts[name] - min_per_class)
        counts[name] -= take
        excess -= take
    return counts


def _fill(slot: str, spec, rng: np.random.Generator) -> str:
    if isinstance(spec, RangeSlot):
        if spec.int_range is not None:
            return str(int(rng.integers(spec.int_range[0], spec.int_range[1] + 1)))
        return f"{rng.uniform(*spec.float_range):.2f}"
    return str(spec[int(rng.integers(len(spec)))])


def render(template: str, slots: dict, rng: np.random.Generator,
           drawn: dict[str, str] | None = None, reuse: dict[str, str] | None = None) -> str:
    """Fill `template`'s slots from `rng`. `drawn` collects the first value each slot took;
    a slot named in `reuse` takes that value instead of a draw."""

    def fill(m) -> str:
        name = m.group(1)
        if reuse is not None and name in reuse:
            return reuse[name]
        value = _fill(name, slots[name], rng)
        if drawn is not None:
            drawn.setdefault(name, value)
        return value

    return SLOT.sub(fill, template)


# How a wire headline attaches a second event to the first: "<primary>; <second>",
# "<primary> as <second>", ... The primary event is always the one written first.
SECOND_EVENT_JOINERS = ("; ", " as ", " after ", " - ", " while ")


def as_clause(text: str, template: str) -> str:
    """A rendered template as the clause after a joiner: a template that opens with a plain
    capitalised word ("Shares of {company} ...") loses the capital; one that opens with a slot
    (a company's name) or an acronym ("EU", "IPO") keeps it."""
    first = template.split(" ", 1)[0]
    plain = first[:1].isupper() and (len(first) == 1 or first[1:].islower())
    if SLOT.search(first) or not plain:
        return text
    return text[:1].lower() + text[1:]


def generate_headlines(
    taxonomy: Taxonomy, n: int, target_distribution: str, min_per_class: int, seed: int,
    second_event_rate: float = 0.0,
) -> list[dict]:
    """`n` rows of `{text, label, gold_label}`, each a class's template filled from the slots
    between a drawn prefix and suffix, in a seeded random order.

    With `second_event_rate` > 0, that share of the headlines goes on to mention a second
    event: a joiner (`SECOND_EVENT_JOINERS`) and a template of another class (one the
    taxonomy declares confusable with the primary class where it declares any, else any
    other), which names the same entities (Faker-pool slots) and draws every other slot
    afresh. `label` and `gold_label` stay the primary class, the event written first; the row
    carries the other class as `second_event`. Those draws come from a stream of their own,
    so the primary headlines (prefix, template, slots, suffix) and the row order are those of
    rate 0, which is the generator without the mechanism, draw for draw.
    """
    rng = np.random.default_rng(seed)
    slots = taxonomy.slot_values(seed)
    counts = class_counts(taxonomy, n, target_distribution, min_per_class)
    second = None
    if second_event_rate > 0:
        second = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        entities = {name for name, spec in taxonomy.slots.items() if isinstance(spec, FakerSlot)}
        partners = {c: taxonomy.confusable(c) or [o for o in taxonomy.labels if o != c]
                    for c in counts}
    for cls in taxonomy.classes:
        if not cls.templates:
            raise ValueError(f"class {cls.name} has no templates for the template generator")
    rows = []
    for name, count in counts.items():
        cls = taxonomy.by_name(name)
        for _ in range(count):
            t = cls.templates[int(rng.integers(len(cls.templates)))]
            drawn: dict[str, str] = {}
            prefix = taxonomy.prefixes[int(rng.integers(len(taxonomy.prefixes)))]
            body = render(t, slots, rng, drawn)
            suffix = taxonomy.suffixes[int(rng.integers(len(taxonomy.suffixes)))]
            row = {"text": "", "label": name, "gold_label": name}
            if second is not None and second.random() < second_event_rate:
                other = partners[name][int(second.integers(len(partners[name])))]
                templates = taxonomy.by_name(other).templates
                t2 = templates[int(second.integers(len(templates)))]
                joiner = SECOND_EVENT_JOINERS[int(second.integers(len(SECOND_EVENT_JOINERS)))]
                reuse = {k: v for k, v in drawn.items() if k in entities}
                body += joiner + as_clause(render(t2, slots, second, reuse=reuse), t2)
                row["second_event"] = other
            row["text"] = prefix + body + suffix
            rows.append(row)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]
