"""A domain's taxonomy: the only file a new domain has to write (see conf/domains/finance.yaml)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillscale.config import ConfigError, load_yaml_model

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
SLOT = re.compile(r"\{([a-z_0-9]+)\}")


class EventClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=SNAKE.pattern)]
    definition: Annotated[str, Field(min_length=3)]
    aliases: list[str] = []
    prior: Annotated[float, Field(gt=0)]
    templates: list[str] = []


class RangeSlot(BaseModel):
    """`{int: [lo, hi]}` or `{float: [lo, hi]}`: a number drawn uniformly from the range."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    int_range: tuple[int, int] | None = Field(None, alias="int")
    float_range: tuple[float, float] | None = Field(None, alias="float")


class FakerSlot(BaseModel):
    """`{faker: company, pool: 4000}`: a fixed pool of values from one Faker provider.

    The pool is drawn once per seed (offline, deterministic), so a slot can name thousands
    of plausible companies or people while every sampler still picks from a finite list.
    """

    model_config = ConfigDict(extra="forbid")
    faker: Annotated[str, Field(pattern=r"^[a-z_]+$")]
    pool: Annotated[int, Field(gt=0, le=200_000)] = 1000
    args: dict[str, Any] = {}
    locale: str = "en_US"
    # Values containing any of these substrings are skipped (e.g. Faker's "A, B and C" firms).
    exclude: list[str] = []

    def values(self, seed: int) -> list[str]:
        from faker import Faker

        fake = Faker(self.locale)
        fake.seed_instance(seed)
        fn = getattr(fake, self.faker, None)
        if not callable(fn):
            raise ConfigError(f"faker slot: Faker has no provider {self.faker!r}")
        # Unique values, in a stable order: a pool with repeats would bias the sampler.
        out: dict[str, None] = {}
        for _ in range(self.pool * 3):
            value = str(fn(**self.args))
            if not any(x in value for x in self.exclude):
                out.setdefault(value, None)
            if len(out) >= self.pool:
                break
        return list(out)


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    task: str
    classes: list[EventClass]
    slots: dict[str, list[Any] | RangeSlot | FakerSlot] = {}
    # Source-style decorations drawn around every generated text (e.g. wire tags); an empty
    # string in the list is "no decoration", so repeats set how often one appears.
    prefixes: list[str] = [""]
    suffixes: list[str] = [""]

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        names = [c.name for c in self.classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names: {dup}")
        for i, c in enumerate(self.classes):
            for t in c.templates:
                missing = sorted(set(SLOT.findall(t)) - set(self.slots))
                if missing:
                    raise ValueError(
                        f"classes.{i} ({c.name}): template {t!r} uses undefined slots {missing}"
                    )
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

    def slot_values(self, seed: int) -> dict[str, list[Any] | RangeSlot]:
        """Every slot as a list of values, or a range; Faker pools are drawn with `seed`."""
        return {
            name: spec.values(seed + i) if isinstance(spec, FakerSlot) else spec
            for i, (name, spec) in enumerate(sorted(self.slots.items()))
        }


def load_taxonomy(path: str | Path) -> Taxonomy:
    return load_yaml_model(path, Taxonomy, "taxonomy")
