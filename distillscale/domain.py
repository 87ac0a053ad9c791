"""A domain's taxonomy: the only file a new domain has to write (see conf/domains/).

Every field carries a description: `docs/domains.md`'s schema reference is generated from them
(`python -m distillscale.domain_docs`), so the reference and the loader cannot disagree.
Problems are reported one per line as `<file>:<line>: <dotted key>: <what is wrong>`.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from distillscale.config import ConfigError, _error_loc, _error_message, _read_yaml

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
SLOT = re.compile(r"\{([a-z_0-9]+)\}")
# A `{` or `}` left in a template once its `{slot}` references are removed: it would end up
# verbatim inside generated text.
STRAY_BRACE = re.compile(r"[{}]")


def norm_label(text: str) -> str:
    """A label as matching compares it: case, spaces, hyphens and underscores folded."""
    return "_".join(re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split())


class EventClass(BaseModel):
    """One class of the task."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=SNAKE.pattern, description=(
        "Class name in snake_case: what the teacher answers and the metrics report."))]
    definition: Annotated[str, Field(min_length=3, description=(
        "One line saying what belongs to the class; shown to LLM teachers and writers, used "
        "in the scratch teacher's rationales and in the dataset card."))]
    aliases: list[str] = Field([], description=(
        "Other names for the class: an imported label or a teacher's answer that matches one "
        "(case, spaces and hyphens ignored) counts as this class."))
    prior: Annotated[float, Field(gt=0, description=(
        "The class's natural share of the data, in percent (all priors should sum to 100); "
        "`data.target_distribution: natural` draws classes in these proportions."))]
    templates: list[str] = Field([], description=(
        "Phrasings of the class for the offline generators, with `{slot}` references filled "
        "from `slots`. Required (at least one) unless the taxonomy is `for_import_only`."))
    confusable_with: list[str] = Field([], description=(
        "Classes whose events a headline of this class is easily confused with (either way "
        "round: listing a pair once is enough). The template generator's second event "
        "(`data.second_event_rate`) is drawn from them; unset, from any other class."))


class RangeSlot(BaseModel):
    """`{int: [lo, hi]}` or `{float: [lo, hi]}`: a number drawn uniformly from the range."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    int_range: tuple[int, int] | None = Field(None, alias="int", description=(
        "`int: [lo, hi]`: a whole number from lo to hi, both included."))
    float_range: tuple[float, float] | None = Field(None, alias="float", description=(
        "`float: [lo, hi]`: a number from lo to hi, written with two decimals."))

    @model_validator(mode="after")
    def _one_range(self) -> RangeSlot:
        if (self.int_range is None) == (self.float_range is None):
            raise ValueError("give exactly one of `int: [lo, hi]` or `float: [lo, hi]`")
        lo, hi = self.int_range or self.float_range
        if lo > hi:
            raise ValueError(f"range [{lo}, {hi}] has lo > hi")
        return self


@functools.lru_cache(maxsize=8)
def _faker(locale: str):
    # heavy: Faker loads its providers on import, only for slots drawn from it
    from faker import Faker

    return Faker(locale)


class FakerSlot(BaseModel):
    """`{faker: company, pool: 4000}`: a fixed pool of values from one Faker provider.

    The pool is drawn once per seed (offline, deterministic), so a slot can name thousands
    of plausible companies or people while every sampler still picks from a finite list.
    """

    model_config = ConfigDict(extra="forbid")
    faker: Annotated[str, Field(pattern=r"^[a-z_]+$", description=(
        "A Faker provider method (`company`, `name`, `city`, `lexify`, ...); checked at load."))]
    pool: Annotated[int, Field(gt=0, le=200_000, description=(
        "How many distinct values the pool holds."))] = 1000
    args: dict[str, Any] = Field({}, description="Keyword arguments of the provider call.")
    locale: str = Field("en_US", description="Faker locale the values are drawn in.")
    exclude: list[str] = Field([], description=(
        "Values containing any of these substrings are skipped (e.g. `\", \"` drops Faker's "
        "\"A, B and C\" firm names)."))

    @model_validator(mode="after")
    def _provider_exists(self) -> FakerSlot:
        try:
            fake = _faker(self.locale)
        except AttributeError:
            raise ValueError(f"Faker has no locale {self.locale!r}") from None
        if not callable(getattr(fake, self.faker, None)):
            names = [n for n in dir(fake) if not n.startswith("_")]
            close = difflib.get_close_matches(self.faker, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"faker: Faker ({self.locale}) has no provider "
                             f"{self.faker!r}{hint}")
        return self

    def values(self, seed: int) -> list[str]:
        # heavy: Faker loads its providers on import, only for slots drawn from it
        from faker import Faker

        fake = Faker(self.locale)
        fake.seed_instance(seed)
        fn = getattr(fake, self.faker)
        # Unique values, in a stable order: a pool with repeats would bias the sampler.
        out: dict[str, None] = {}
        for _ in range(self.pool * 3):
            value = str(fn(**self.args))
            if not any(x in value for x in self.exclude):
                out.setdefault(value, None)
            if len(out) >= self.pool:
                break
        return list(out)


def _slot_kind(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return "<values>"
    if isinstance(value, dict):
        return "<faker>" if "faker" in value else "<range>"
    if isinstance(value, (RangeSlot, FakerSlot)):
        return "<range>" if isinstance(value, RangeSlot) else "<faker>"
    return None


# One slot is exactly one of three shapes; the discriminator picks it from the value, so an
# error names the slot's own key instead of listing why each of the three shapes failed.
SlotSpec = Annotated[
    Annotated[list[Any], Tag("<values>")] | Annotated[RangeSlot, Tag("<range>")]
    | Annotated[FakerSlot, Tag("<faker>")],
    Discriminator(_slot_kind, custom_error_type="slot_shape", custom_error_message=(
        "a slot is a list of values, {int: [lo, hi]}, {float: [lo, hi]} or {faker: provider}")),
]


class Taxonomy(BaseModel):
    """A domain: its task, its classes and what the offline generators fill templates with."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short name of the domain (dataset card, reports).")
    task: str = Field(description=(
        "One sentence saying what is classified, e.g. \"Classify the news headline into one "
        "event class.\" Every teacher and writer prompt is built from it and the classes."))
    classes: list[EventClass] = Field(min_length=2, description="The classes (at least two).")
    slots: dict[str, SlotSpec] = Field({}, description=(
        "Values templates draw from, by slot name: a list of values, `{int: [lo, hi]}`, "
        "`{float: [lo, hi]}`, or `{faker: provider, pool: N}`."))
    prefixes: list[str] = Field([""], description=(
        "Source-style decorations drawn before every generated text (e.g. wire tags); an "
        "empty string is \"no decoration\", so repeats set how often one appears."))
    suffixes: list[str] = Field([""], description="As `prefixes`, drawn after the text.")
    knowledge_slot: str | None = Field(None, description=(
        "A list slot whose values are countries: they are always among the countries of the "
        "scratch teacher's general-knowledge facts and probe, and rationales cite a fact "
        "about the country a headline names. Unset: the facts are a seeded draw and "
        "rationales cite none."))
    for_import_only: bool = Field(False, description=(
        "True: the taxonomy describes labelled data brought in a file (`data import`, "
        "`data.generator: file`); classes need no templates and the generators refuse it."))

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        problems: list[str] = []
        names = [c.name for c in self.classes]
        for n in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"classes.{names.index(n)}.name: duplicate class name {n!r}")
        owner: dict[str, str] = {}
        for i, c in enumerate(self.classes):
            if not c.templates and not self.for_import_only:
                problems.append(f"classes.{i}.templates: class {c.name} has no templates (the "
                                "generators need at least one; set for_import_only: true for "
                                "a taxonomy of imported data)")
            for j, t in enumerate(c.templates):
                missing = sorted(set(SLOT.findall(t)) - set(self.slots))
                if missing:
                    problems.append(f"classes.{i}.templates.{j}: template {t!r} uses undefined "
                                    f"slots {missing}")
            for j, other in enumerate(c.confusable_with):
                if other == c.name:
                    problems.append(f"classes.{i}.confusable_with.{j}: class {c.name} lists "
                                    "itself (name the other classes it is confused with)")
                elif other not in names:
                    close = difflib.get_close_matches(other, names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    problems.append(f"classes.{i}.confusable_with.{j}: {other!r} is not a "
                                    f"class{hint}")
            for j, a in enumerate(c.aliases):
                key = norm_label(a)
                if key in owner and owner[key] != c.name:
                    problems.append(f"classes.{i}.aliases.{j}: alias {a!r} of {c.name} is also "
                                    f"an alias of {owner[key]} (a label cannot mean both)")
                owner.setdefault(key, c.name)
        if self.knowledge_slot is not None:
            spec = self.slots.get(self.knowledge_slot)
            if not isinstance(spec, list):
                problems.append(f"knowledge_slot: {self.knowledge_slot!r} is not a slot with a "
                                "list of values (countries)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def labels(self) -> list[str]:
        return [c.name for c in self.classes]

    def priors(self) -> dict[str, float]:
        total = sum(c.prior for c in self.classes)
        return {c.name: c.prior / total for c in self.classes}

    def index(self) -> dict[str, int]:
        return {c.name: i for i, c in enumerate(self.classes)}

    def by_name(self, name: str) -> EventClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)

    def confusable(self, name: str) -> list[str]:
        """The classes `name` is declared confusable with, in either direction, in class
        order; empty when no class declares a pair with it."""
        own = set(self.by_name(name).confusable_with)
        return [c.name for c in self.classes
                if c.name != name and (c.name in own or name in c.confusable_with)]

    def label_lookup(self) -> dict[str, str]:
        """Folded name or alias -> class name. A class's own name wins over another class's
        alias of the same spelling (`domain check` warns about such aliases)."""
        out = {norm_label(a): c.name for c in self.classes for a in c.aliases}
        out.update({norm_label(c.name): c.name for c in self.classes})
        return out

    def match_label(self, label: Any) -> str | None:
        """The class a label from a file names (by name or alias, in any case), or None."""
        text = str(label or "").strip()
        if text in set(self.labels):
            return text
        return self.label_lookup().get(norm_label(text))

    def slot_values(self, seed: int) -> dict[str, list[Any] | RangeSlot]:
        """Every slot as a list of values, or a range; Faker pools are drawn with `seed`."""
        return {
            name: spec.values(seed + i) if isinstance(spec, FakerSlot) else spec
            for i, (name, spec) in enumerate(sorted(self.slots.items()))
        }


# ---------------------------------------------------------------------------------------------
# Loading with line numbers
# ---------------------------------------------------------------------------------------------


def key_lines(path: Path) -> dict[tuple, int]:
    """Dotted key (as a tuple of str) -> 1-based line of that key's value in the YAML file."""
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return {}
    out: dict[tuple, int] = {}

    def walk(node, at: tuple) -> None:
        out[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = at + (str(k.value),)
                walk(v, key)
                out[key] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, at + (str(i),))

    if root is not None:
        walk(root, ())
    return out


def _where(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            return f"{path}:{lines[key[:n]]}"
    return str(path)


_KEYED = re.compile(r"^([A-Za-z0-9_.]+): (.*)$")


def taxonomy_errors(path: str | Path) -> tuple[Taxonomy | None, list[str]]:
    """(the taxonomy, []) or (None, every problem as `<file>:<line>: <key>: <message>`)."""
    path = Path(path)
    if not path.is_file():
        return None, [f"{path}: taxonomy file not found"]
    try:
        data = _read_yaml(path)
    except ConfigError as e:
        return None, [str(e)]
    try:
        return Taxonomy.model_validate(data), []
    except ValidationError as e:
        lines = key_lines(path)
        out = []
        for err in e.errors():
            loc = tuple(str(x) for x in _error_loc(err) if not str(x).startswith("<"))
            for msg in _error_message(err).split("\n"):
                key = loc
                m = _KEYED.match(msg)
                if m and not loc:
                    # A check across keys names the key itself at the start of its message.
                    key, msg = tuple(m.group(1).split(".")), m.group(2)
                elif msg.startswith(("faker: ",)):
                    key, msg = loc + ("faker",), msg.removeprefix("faker: ")
                out.append(f"{_where(path, lines, key)}: {'.'.join(key) or '<top>'}: {msg}")
        return None, out


def load_taxonomy(path: str | Path) -> Taxonomy:
    taxonomy, problems = taxonomy_errors(path)
    if taxonomy is None:
        raise ConfigError("\n".join(problems))
    return taxonomy
