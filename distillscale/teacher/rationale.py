"""Training rationales for the tiny teacher: headline -> rationale -> label, from the taxonomy.

A hub teacher (Qwen3-32B in the paper) already reasons; the tiny from-scratch teacher has to be
taught to. It trains on sequences whose rationale is built from the taxonomy and the data, so
that at supervision time its traces at each depth are *generated* by the model (and can be
wrong), never copied from here:

    cot_short  cue {w1} {w2} . {definition of the class} .
    cot_long   cue {w1} {w2} {w3} . {definition} . not {runner-up class} : {its definition} .
               [fact : {a general-knowledge fact about a country the headline names} .]

Cue words are the headline's words with the highest smoothed log-odds for the class against
the rest of the training split (a Naive-Bayes style evidence score, computed here because it is
a dozen lines of counting); the runner-up is the other class the headline's words support most,
the contrast a careful annotator would rule out. Facts come from `distillscale.knowledge`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from distillscale.domain import Taxonomy
from distillscale.knowledge.general import country_name

WORD = re.compile(r"[a-z][a-z0-9_']*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class RationaleBuilder:
    def __init__(self, taxonomy: Taxonomy, train_rows: list[dict],
                 country_facts: dict[str, list[str]] | None = None):
        self.taxonomy = taxonomy
        self.definition = {c.name: c.definition.lower() for c in taxonomy.classes}
        self.country_facts = country_facts or {}
        self._names: dict[str, str | None] = {}
        per_class: dict[str, Counter] = {c: Counter() for c in taxonomy.labels}
        total: Counter = Counter()
        for r in train_rows:
            ws = set(words(r["text"]))
            per_class[r["label"]].update(ws)
            total.update(ws)
        n_class = Counter(r["label"] for r in train_rows)
        n = len(train_rows)
        self.log_odds: dict[str, dict[str, float]] = {}
        for c, counts in per_class.items():
            nc, rest = n_class[c], n - n_class[c]
            self.log_odds[c] = {
                w: math.log((counts[w] + 0.5) / (nc + 1)) - math.log(
                    (total[w] - counts[w] + 0.5) / (rest + 1))
                for w in total
            }

    def cues(self, text: str, label: str, n: int) -> list[str]:
        lo = self.log_odds[label]
        ws = list(dict.fromkeys(words(text)))
        best = sorted(ws, key=lambda w: -lo.get(w, 0.0))[:n]
        return [w for w in ws if w in best]  # headline order reads more naturally

    def runner_up(self, text: str, label: str) -> str:
        ws = set(words(text))
        scores = {c: sum(max(lo.get(w, 0.0), 0.0) for w in ws)
                  for c, lo in self.log_odds.items() if c != label}
        return max(sorted(scores), key=lambda c: scores[c])

    def fact(self, text: str) -> str | None:
        for raw in re.findall(r"[A-Za-z]+", text):
            if not raw[0].isupper():
                continue
            if raw not in self._names:
                self._names[raw] = country_name(raw)
            name = self._names[raw]
            if name and name in self.country_facts:
                return self.country_facts[name][0]
        return None

    def short(self, row: dict) -> str:
        cue = " ".join(self.cues(row["text"], row["label"], 2))
        return f"cue {cue} . {self.definition[row['label']]} ."

    def long(self, row: dict) -> str:
        label = row["label"]
        cue = " ".join(self.cues(row["text"], label, 3))
        other = self.runner_up(row["text"], label)
        text = (f"cue {cue} . {self.definition[label]} . not {other} : "
                f"{self.definition[other]} .")
        fact = self.fact(row["text"])
        return f"{text} {fact}" if fact else text

    def traces(self, row: dict) -> dict[str, str]:
        return {"cot_short": self.short(row), "cot_long": self.long(row)}
