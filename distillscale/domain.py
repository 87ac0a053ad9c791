"""A domain's taxonomy: the only file a new domain has to write (see conf/domains/finance.yaml)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillscale.config import ConfigError

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


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    task: str
    classes: list[EventClass]
    slots: dict[str, list[Any] | RangeSlot] = {}

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


def load_taxonomy(path: str | Path) -> Taxonomy:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: taxonomy file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return Taxonomy.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "<top>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{path}: {key}: {msg.removeprefix('Value error, ')}") from None
