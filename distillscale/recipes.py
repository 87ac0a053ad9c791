"""Recipes: the method as a short script over the stages (`recipes/*.py` in the repository).

A recipe module holds a docstring (its first line is what `distillscale recipes` lists), an
optional `REQUIRES` — config keys and the values the recipe is written for, checked before
anything runs — `VERIFIED` (the shipped configs it runs end to end in the tests), and
`main(run)`, which calls `run(stage, **kw)` (`distillscale.runner.Runner`) in the method's
order. A config picks its recipe with `recipe:` (a name in `recipes/`, or a path to your own
`.py` file); `distillscale run CONFIG` runs it, and so does `python recipes/<name>.py CONFIG`
(`distillscale.cli.recipe_script`).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

from distillscale.config import ConfigError, ExperimentConfig

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def available() -> dict[str, Path]:
    """Name -> file of every recipe shipped in `recipes/`."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.py")) if not p.stem.startswith("_")}


def recipe_path(name: str) -> Path:
    """The file of recipe `name` (a shipped recipe's name, or a path to a `.py` file)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"recipe: {name}: no such file")
        return path
    known = available()
    if name not in known:
        raise ConfigError(f"recipe: unknown recipe {name!r} (one of {sorted(known)}, or a path "
                          "to a .py file)")
    return known[name]


def load(name: str) -> ModuleType:
    path = recipe_path(name)
    module_name = f"distillscale_recipe_{path.stem}"
    if module_name in sys.modules and Path(sys.modules[module_name].__file__) == path.resolve():
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ConfigError(f"recipe: {path}: has no main(run) function")
    return module


def summary(module: ModuleType) -> str:
    """The first line of a recipe's docstring."""
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def check_requirements(module: ModuleType, cfg: ExperimentConfig, name: str) -> None:
    """Refuse a config the recipe is not written for, naming the key: one line."""
    for key, allowed in getattr(module, "REQUIRES", {}).items():
        value: object = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"recipe {name}: {key} must be one of {list(allowed)} "
                              f"(got {value!r}); set {key} or pick another recipe")


def run_recipe(cfg: ExperimentConfig, name: str | None = None) -> Path:
    """Run the config's recipe (or `name`) over `cfg`'s experiment; returns the report path."""
    from distillscale.runner import Runner, console  # heavy: torch (the launch plan needs neither)

    name = name or cfg.recipe
    module = load(name)
    check_requirements(module, cfg, name)
    t0 = time.time()
    run = Runner(cfg)
    run.record_config()
    module.main(run)
    report = cfg.run_dir / "report.md"
    console.print(f"[bold green]done[/bold green] in {time.time() - t0:.0f}s: {report}")
    return report
