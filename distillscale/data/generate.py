"""Minimal offline headline generator: fill each class's templates from the taxonomy's slots.

The full data recipe (Data Designer synthesis + NeMo-Curator curation) replaces this behind the
same `data` stage; this generator keeps the quickstart fast and dependency-light.
"""

from __future__ import annotations

import numpy as np

from distillscale.domain import SLOT, RangeSlot, Taxonomy

# Wire-style decorations that add noise without changing the event: a classifier must read
# the whole headline, not one prefix.
PREFIXES = ["", "", "", "", "UPDATE 1-", "BRIEF-", "RPT-", "EXCLUSIVE-"]
SUFFIXES = ["", "", "", "", " - filing", " - sources", " - statement", " - report"]


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


def render(template: str, taxonomy: Taxonomy, rng: np.random.Generator) -> str:
    return SLOT.sub(lambda m: _fill(m.group(1), taxonomy.slots[m.group(1)], rng), template)


def generate_headlines(
    taxonomy: Taxonomy, n: int, target_distribution: str, min_per_class: int, seed: int
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, count in class_counts(taxonomy, n, target_distribution, min_per_class).items():
        cls = next(c for c in taxonomy.classes if c.name == name)
        if not cls.templates:
            raise ValueError(f"class {name} has no templates for the template generator")
        for _ in range(count):
            t = cls.templates[int(rng.integers(len(cls.templates)))]
            text = (
                PREFIXES[int(rng.integers(len(PREFIXES)))]
                + render(t, taxonomy, rng)
                + SUFFIXES[int(rng.integers(len(SUFFIXES)))]
            )
            rows.append({"text": text, "label": name, "gold_label": name})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]
