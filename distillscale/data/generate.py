"""Minimal offline headline generator: fill each class's templates from the taxonomy's slots.

The full data recipe (`generator: designer`: Data Designer synthesis + NeMo-Curator curation,
see `recipe.py`) uses the same templates; this generator keeps the quickstart fast and
dependency-light (no Ray, no embedding model).
"""

from __future__ import annotations

import numpy as np

from distillscale.domain import SLOT, RangeSlot, Taxonomy


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


def render(template: str, slots: dict, rng: np.random.Generator) -> str:
    return SLOT.sub(lambda m: _fill(m.group(1), slots[m.group(1)], rng), template)


def generate_headlines(
    taxonomy: Taxonomy, n: int, target_distribution: str, min_per_class: int, seed: int
) -> list[dict]:
    rng = np.random.default_rng(seed)
    slots = taxonomy.slot_values(seed)
    rows = []
    for name, count in class_counts(taxonomy, n, target_distribution, min_per_class).items():
        cls = next(c for c in taxonomy.classes if c.name == name)
        if not cls.templates:
            raise ValueError(f"class {name} has no templates for the template generator")
        for _ in range(count):
            t = cls.templates[int(rng.integers(len(cls.templates)))]
            text = (
                taxonomy.prefixes[int(rng.integers(len(taxonomy.prefixes)))]
                + render(t, slots, rng)
                + taxonomy.suffixes[int(rng.integers(len(taxonomy.suffixes)))]
            )
            rows.append({"text": text, "label": name, "gold_label": name})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]
