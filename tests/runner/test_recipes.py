"""Recipes: listed, chosen by the config's `recipe:`, refused when the config does not fit."""

import subprocess
import sys
from pathlib import Path

import pytest

from distillscale import recipes
from distillscale.cli import main as cli_main
from distillscale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "conf/experiments/quickstart.yaml"


def test_every_recipe_loads_with_a_one_line_summary_and_verified_configs():
    names = set(recipes.available())
    assert {"prune_distill", "iterative_prune", "lora_kd", "cot_distill"} <= names
    for name in names:
        module = recipes.load(name)
        assert recipes.summary(module) and "\n" not in recipes.summary(module)
        for config in module.VERIFIED:  # each verified config loads and names this recipe
            cfg = load_config(ROOT / config)
            assert cfg.recipe == name or name == "prune_distill", (name, config)
            recipes.check_requirements(module, cfg, name)


def test_distillscale_recipes_lists_one_line_each(capsys):
    assert cli_main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipes.available())
    row = next(ln for ln in lines if ln.startswith("iterative_prune"))
    assert "prune.schedule in ['uniform', 'decayed']" in row


def test_an_unknown_recipe_and_a_config_it_does_not_fit_are_refused_in_one_line(tmp_path, capsys):
    assert cli_main(["run", str(QUICKSTART), "recipe=nope", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: recipe: unknown recipe 'nope'") and "\n" not in err
    # The quickstart is one-shot: the iterative recipe refuses it before anything runs.
    assert cli_main(["run", "--recipe", "iterative_prune", str(QUICKSTART),
                     f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: recipe iterative_prune: prune.schedule must be one of ['uniform', "
                   "'decayed'] (got 'one_shot'); set prune.schedule or pick another recipe")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"recipe: .*missing.py: no such file"):
        recipes.recipe_path(str(tmp_path / "missing.py"))


def test_your_own_recipe_file_runs_through_distillscale_run(tmp_path):
    own = tmp_path / "data_only.py"
    own.write_text(
        '"""Only the data stage."""\n'
        "from distillscale import stages\n"
        "def main(run):\n"
        "    run(stages.data)\n")
    rc = subprocess.run(
        [sys.executable, "-m", "distillscale.cli", "run", str(QUICKSTART), f"recipe={own}",
         f"output_dir={tmp_path / 'run'}", "data.num_examples=60", "data.generator=templates"],
        capture_output=True, text=True, cwd=ROOT)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert (tmp_path / "run" / "data" / "manifest.json").is_file()
    assert (tmp_path / "run" / "config.yaml").read_text().count(f"recipe: {own}") == 1
    assert not (tmp_path / "run" / "teacher").exists()  # only what the recipe names runs


def test_a_recipe_script_runs_its_own_recipe(tmp_path):
    rc = subprocess.run(
        [sys.executable, "recipes/iterative_prune.py", str(QUICKSTART),
         f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert rc.returncode == 2
    assert "recipe" in rc.stderr and "prune.schedule must be one of" in rc.stderr
