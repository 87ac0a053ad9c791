"""A small general-knowledge world, built offline: the facts a tiny teacher learns besides its
task, and the held-out multiple-choice knowledge probe that measures whether a compressed
student kept them. The probe is a synthetic quiz, not MMLU: results call it `probe`
(`eval.general.probe_path`), and only real MMLU data is reported as `mmlu`.

Facts come from data packages, never from a hub: country names and currency / language names
from `pycountry` (ISO 3166 / 4217 / 639), which currency and which official language each
country uses from Babel's copy of the Unicode CLDR territory data (pycountry has no
country -> currency link), plus arithmetic and unit conversions computed here. Everything is a
pure function of `(seed, sizes)`, so the corpus the teacher trains on and the probe the
evaluation reads are drawn from the same facts by construction.

The probe asks about the very facts of the corpus in a form the teacher never saw (a question
with four choices): it measures retained knowledge, not format learning. Its files borrow the
HF `cais/mmlu` schema (`question` str, `subject` str, `choices` list of 4 str, `answer` int),
one Parquet file per split: `<out_dir>/test.parquet` and `<out_dir>/dev.parquet` (dev holds
a few questions per subject for few-shot prompts), and `<out_dir>/probe.json` marks the folder
as this synthetic probe, so that it cannot pass for a copy of MMLU.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUBJECTS = ("currency", "language", "arithmetic", "unit_conversion")
# Where the teacher stage writes the probe (`{run_dir}/teacher/knowledge_probe`), the marker
# file in it, and its choices per question (chance: 1 / PROBE_CHOICES).
PROBE_DIR = "knowledge_probe"
PROBE_MARKER = "probe.json"
PROBE_CHOICES = 4
# Conversions whose factor is an integer, so every fact is exact and a word-level tokenizer
# sees whole numbers.
CONVERSIONS = (
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("years", "months", 12), ("litres", "millilitres", 1000), ("tonnes", "kg", 1000),
)


@dataclass(frozen=True)
class Fact:
    """One fact: the sentence the teacher trains on and the question / answer the probe asks."""

    subject: str
    subject_entity: str  # what the fact is about (country, expression) - a probe is unique on it
    sentence: str
    question: str
    answer: str
    # Other values of the same relation: where the probe draws its distractors.
    pool: tuple[str, ...] = ()


def _simple(name: str) -> str:
    """Lowercase, ASCII-ish, no parenthesised qualifiers: names as a word tokenizer sees them."""
    name = re.sub(r"\s*\(.*?\)", "", name).split(",")[0]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9 ]+", " ", name.lower()).strip()


def _reordered(name: str) -> str:
    """ISO's inverted form the other way round: "Virgin Islands, British" -> "British Virgin
    Islands", "Congo, The Democratic Republic of the" -> "The Democratic Republic of the Congo"."""
    head, _, tail = name.partition(", ")
    return f"{tail} {head}" if tail else name


@functools.lru_cache(maxsize=1)
def country_names() -> dict[str, str]:
    """ISO alpha-2 code -> the country's name as the facts spell it, distinct for every country.

    The short form is pycountry's common name where it has one ("South Korea", "Laos"), else
    its name without the inverted qualifier ("Bolivia, Plurinational State of" -> "bolivia").
    Where two countries' short forms meet ("korea" for both Koreas, "congo" for both Congos,
    "virgin islands"), each of them is spelled out in full instead, so no fact is ever about
    two countries at once.
    """
    # heavy: pycountry loads its ISO data, only when country facts are built
    import pycountry

    short = {c.alpha_2: _simple(getattr(c, "common_name", None) or c.name)
             for c in pycountry.countries}
    taken = Counter(short.values())
    out = {}
    for c in pycountry.countries:
        name = short[c.alpha_2]
        if taken[name] > 1:
            name = " ".join(_simple(_reordered(c.name)).split())
        out[c.alpha_2] = name
    clash = sorted(n for n, k in Counter(out.values()).items() if k > 1)
    if clash:  # a pycountry release with new names: fail loudly rather than merge countries
        raise RuntimeError(f"country names shared by two countries: {clash}")
    return out


def country_facts() -> list[tuple[str, str, str]]:
    """(country, currency, language) for every ISO country whose CLDR data names both (the
    official or, like English in the US, de facto language), sorted."""
    # heavy: babel / pycountry load CLDR and ISO data, only when facts are built
    import babel.languages
    import babel.numbers
    import pycountry

    names = country_names()
    out = []
    for c in pycountry.countries:
        cur = babel.numbers.get_territory_currencies(c.alpha_2)
        langs = babel.languages.get_official_languages(c.alpha_2, de_facto=True)
        if not cur or not langs:
            continue
        currency = pycountry.currencies.get(alpha_3=cur[0])
        code = langs[0].split("_")[0]
        language = pycountry.languages.get(alpha_2=code) or pycountry.languages.get(alpha_3=code)
        if currency is None or language is None:
            continue
        row = (names[c.alpha_2], _simple(currency.name), _simple(language.name))
        if all(row):
            out.append(row)
    return sorted(set(out))


def build_facts(
    seed: int = 0,
    countries: int = 60,
    arithmetic: int = 120,
    conversions: int = 40,
    include: tuple[str, ...] = (),
) -> list[Fact]:
    """The deterministic fact set: `countries` countries (currency and language each; the
    countries named in `include`, e.g. those a domain's headlines mention, always among them),
    `arithmetic` additions / subtractions of numbers below 20, `conversions` unit conversions."""
    rng = np.random.default_rng([seed, 7])
    table = country_facts()
    if countries > len(table):
        raise ValueError(f"countries={countries}: only {len(table)} countries have CLDR data")
    forced = sorted(i for i, row in enumerate(table) if row[0] in set(include))
    if len(forced) > countries:
        raise ValueError(f"countries={countries} is fewer than the {len(forced)} included ones")
    rest = [i for i in range(len(table)) if i not in set(forced)]
    # The seeded draw is over the sorted table, so the same seed gives the same countries.
    drawn = rng.choice(len(rest), countries - len(forced), replace=False)
    chosen = [table[i] for i in sorted(forced + [rest[j] for j in drawn])]
    currencies = tuple(sorted({c for _, c, _ in chosen}))
    languages = tuple(sorted({lang for _, _, lang in chosen}))
    facts: list[Fact] = []
    for country, currency, language in chosen:
        facts.append(Fact(
            "currency", country, f"fact : the currency of {country} is the {currency} .",
            f"what is the currency of {country} ?", currency, currencies,
        ))
        facts.append(Fact(
            "language", country, f"fact : people in {country} speak {language} .",
            f"which language is spoken in {country} ?", language, languages,
        ))
    pairs = [(a, b, op) for a in range(1, 20) for b in range(1, 20) for op in ("plus", "minus")
             if op == "plus" or a > b]
    numbers = tuple(str(n) for n in range(40))
    for i in sorted(rng.choice(len(pairs), min(arithmetic, len(pairs)), replace=False)):
        a, b, op = pairs[i]
        r = a + b if op == "plus" else a - b
        facts.append(Fact(
            "arithmetic", f"{a} {op} {b}", f"fact : {a} {op} {b} is {r} .",
            f"what is {a} {op} {b} ?", str(r), numbers,
        ))
    conv = [(q, src, dst, f) for src, dst, f in CONVERSIONS for q in range(1, 13)]
    for i in sorted(rng.choice(len(conv), min(conversions, len(conv)), replace=False)):
        q, src, dst, f = conv[i]
        pool = tuple(str(q2 * f) for q2 in range(1, 13))
        facts.append(Fact(
            "unit_conversion", f"{q} {src} {dst}", f"fact : {q} {src} is {q * f} {dst} .",
            f"how many {dst} are in {q} {src} ?", str(q * f), pool,
        ))
    return facts


def knowledge_corpus(facts: list[Fact]) -> list[str]:
    """The sentences the teacher trains on (one per fact)."""
    return [f.sentence for f in facts]


# ISO 3166 reserves "UK" for the United Kingdom without assigning it; headlines use it anyway.
_NON_ISO = {"uk": "GB"}


def country_name(word: str) -> str | None:
    """A headline's country mention ("US", "Germany", "UK") as the name the facts use."""
    # heavy: pycountry loads its ISO data, only when country facts are built
    import pycountry

    try:
        code = pycountry.countries.lookup(_NON_ISO.get(word.lower(), word)).alpha_2
    except LookupError:
        # CLDR's English names are the ones news uses ("Russia", "Czechia", "Bosnia &
        # Herzegovina"), where ISO has "Russian Federation".
        code = _cldr_english().get(word.strip().lower())
    return country_names().get(code) if code else None


@functools.lru_cache(maxsize=1)
def _cldr_english() -> dict[str, str]:
    # heavy: babel / pycountry load CLDR and ISO data, only when facts are built
    import babel

    return {name.lower(): code for code, name in babel.Locale("en").territories.items()
            if len(code) == 2 and code.isalpha()}


def country_lookup(facts: list[Fact]) -> dict[str, list[str]]:
    """Country name -> its fact sentences, for rationales that cite a fact about a country a
    headline names."""
    out: dict[str, list[str]] = {}
    for f in facts:
        if f.subject in ("currency", "language"):
            out.setdefault(f.subject_entity, []).append(f.sentence)
    return out


def probe_rows(facts: list[Fact], seed: int, n: int | None = None) -> list[dict]:
    """Multiple-choice rows in the `cais/mmlu` schema, one per fact (at most `n`, drawn evenly
    across subjects); PROBE_CHOICES - 1 distractors from the same relation, answer position
    seeded."""
    rng = np.random.default_rng([seed, 11])
    by_subject = {s: [f for f in facts if f.subject == s] for s in SUBJECTS}
    order: list[Fact] = []
    # Round-robin over subjects so a small `n` still covers each of them.
    queues = {s: [fs[i] for i in rng.permutation(len(fs))] for s, fs in by_subject.items()}
    while any(queues.values()):
        for s in SUBJECTS:
            if queues[s]:
                order.append(queues[s].pop(0))
    if n is not None:
        order = order[:n]
    rows = []
    for f in order:
        others = sorted(set(f.pool) - {f.answer})
        k = PROBE_CHOICES - 1
        if len(others) < k:
            raise ValueError(f"fact {f.sentence!r}: fewer than {k} distractors in its relation")
        wrong = [others[i] for i in rng.choice(len(others), k, replace=False)]
        pos = int(rng.integers(PROBE_CHOICES))
        choices = wrong[:pos] + [f.answer] + wrong[pos:]
        rows.append({"question": f.question, "subject": f.subject, "choices": choices,
                     "answer": pos})
    return rows


def write_knowledge_probe(
    out_dir: str | Path, seed: int = 0, n: int | None = None, dev_per_subject: int = 5,
    **fact_sizes: int,
) -> dict[str, int]:
    """Write the probe as `<out_dir>/test.parquet` and `<out_dir>/dev.parquet` (cais/mmlu
    schema) with its marker `<out_dir>/probe.json`.

    `fact_sizes` (`countries`, `arithmetic`, `conversions`) must be those the teacher trained
    with (see `build_facts`); dev takes `dev_per_subject` questions per subject for few-shot
    prompts and test the rest (at most `n`). Files are written atomically. Returns split sizes.
    """
    # heavy: pandas / pyarrow, only where a table is read or written
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    facts = build_facts(seed, **fact_sizes)
    rows = probe_rows(facts, seed)
    dev, test, taken = [], [], {s: 0 for s in SUBJECTS}
    for r in rows:
        if taken[r["subject"]] < dev_per_subject:
            taken[r["subject"]] += 1
            dev.append(r)
        else:
            test.append(r)
    if n is not None:
        test = test[:n]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("question", pa.string()), ("subject", pa.string()),
                        ("choices", pa.list_(pa.string())), ("answer", pa.int64())])
    for name, split in (("test", test), ("dev", dev)):
        table = pa.Table.from_pandas(pd.DataFrame(split, columns=schema.names), schema=schema,
                                     preserve_index=False)
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(out / f"{name}.parquet")
    sizes = {"test": len(test), "dev": len(dev)}
    marker = {"synthetic": True, "what": "distillscale knowledge probe (not MMLU)",
              "metric": "probe", "config_key": "eval.general.probe_path",
              "choices": PROBE_CHOICES, "subjects": list(SUBJECTS), "seed": seed, "splits": sizes}
    tmp = out / f".{PROBE_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(out / PROBE_MARKER)
    return sizes


def is_knowledge_probe(path: str | Path) -> bool:
    """Whether `path` is a probe of this module: its marker file, or the teacher stage's probe
    folder by its place (`.../teacher/knowledge_probe`, also before it exists and for probes
    written before the marker was)."""
    p = Path(path)
    return p.parts[-2:] == ("teacher", PROBE_DIR) or (p / PROBE_MARKER).is_file()
