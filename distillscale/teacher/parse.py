"""Parse a teacher's free-text answer into one taxonomy class, or say why not.

Accepted: the class name in any case, with spaces / hyphens for underscores, or one of its
aliases, anywhere in the answer (extra words and punctuation around it are fine). Rejected,
with the reason kept: an empty answer, no known class, or two different classes. A mention
inside a longer mention (an alias "refund" inside another class's "partial refund") counts once.
"""

from __future__ import annotations

import re

from distillscale.domain import Taxonomy


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


class LabelParser:
    def __init__(self, taxonomy: Taxonomy):
        patterns: list[tuple[str, str]] = []
        for c in taxonomy.classes:
            for surface in [c.name, *c.aliases]:
                n = _norm(surface)
                if n:
                    patterns.append((n, c.name))
        # Longest first, so a class name wins over an alias that is part of it.
        patterns.sort(key=lambda p: -len(p[0]))
        self.patterns = [(re.compile(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])"), label)
                         for n, label in patterns]

    def __call__(self, answer: str | None) -> tuple[str | None, str | None]:
        """(label, None) or (None, reason)."""
        text = _norm(answer or "")
        if not text:
            return None, "empty answer"
        taken: list[tuple[int, int]] = []
        found: list[str] = []
        for rx, label in self.patterns:
            for m in rx.finditer(text):
                if any(s <= m.start() and m.end() <= e for s, e in taken):
                    continue
                taken.append((m.start(), m.end()))
                if label not in found:
                    found.append(label)
        if not found:
            return None, f"unknown class: {answer.strip()[:60]!r}"
        if len(found) > 1:
            return None, f"two labels: {', '.join(found)}"
        return found[0], None
