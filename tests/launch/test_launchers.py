"""The shell launchers against fake Slurm tools (tests/launch/conftest.py): what they submit,
what each rank sees, the allocation check, sweeps as dependent job arrays, and requeue."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distillscale.config import load_config
from distillscale.launch.sweep import mark_done, plan_sweep

REPO = Path(__file__).resolve().parents[2]

QUICKSTART = "conf/experiments/quickstart.yaml"
LAUNCHERS = sorted((REPO / "launchers").glob("*.sh"))


def launch(script: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", f"launchers/{script}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def in_job(**extra) -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
            "SLURM_JOB_NODELIST": "gpu-node-[007-008]", "SLURM_SUBMIT_DIR": str(REPO), **extra}


def option(argv: list[str], name: str) -> str | None:
    hits = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return hits[-1] if hits else None


def test_submission_outside_a_job_calls_sbatch_with_flag_overrides(fake_slurm):
    res = launch("prune_distill.sh", "--config", QUICKSTART, "--nodes", "2", "--gpus-per-node",
                 "8", "--time", "01:30:00", "--partition", "h100", "launch.tensor_parallel=2",
                 env=fake_slurm.env())
    assert res.stdout.strip() == "1000"  # the job id, for dependencies
    (sub,) = fake_slurm.records("sbatch")
    argv = sub["argv"]
    assert option(argv, "nodes") == "2"
    assert option(argv, "ntasks-per-node") == "8"  # one task per GPU
    assert option(argv, "gpus-per-node") == "8"
    assert option(argv, "time") == "01:30:00"
    assert option(argv, "partition") == "h100"
    assert option(argv, "signal") == "B:USR1@120"
    assert "--requeue" in argv
    # the launcher re-runs itself as the batch shell, with the same arguments and without
    # the file's #SBATCH defaults
    assert shlex.split(option(argv, "wrap")) == [
        "exec", "bash", str(REPO / "launchers" / "prune_distill.sh"), "--config", QUICKSTART,
        "--nodes", "2", "--gpus-per-node", "8", "--time", "01:30:00", "--partition", "h100",
        "launch.tensor_parallel=2"]
    assert fake_slurm.records("srun") == []


def test_environment_overrides_config_and_flags_override_environment(fake_slurm):
    env = fake_slurm.env(DISTILLSCALE_NODES=3, DISTILLSCALE_GPUS_PER_NODE=2,
                         DISTILLSCALE_TIME="00:10:00")
    launch("prune_distill.sh", "--config", QUICKSTART, "--nodes", "4", env=env)
    argv = fake_slurm.records("sbatch")[0]["argv"]
    assert (option(argv, "nodes"), option(argv, "gpus-per-node"), option(argv, "time")) == (
        "4", "2", "00:10:00")


def test_inside_the_job_srun_native_ranks_in_the_container(fake_slurm):
    env = fake_slurm.env(**in_job())
    launch("prune_distill.sh", "--config", QUICKSTART, "--image", "/images/nemo.sqsh",
           "--mount", "/lustre/data:/data:ro", "launch.tensor_parallel=2", env=env)
    (step,) = fake_slurm.records("srun")
    opts = step["options"]
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "4"
    assert opts["container-image"] == "/images/nemo.sqsh"
    assert opts["container-mounts"].split(",") == [f"{REPO}:{REPO}", "/lustre/data:/data:ro"]
    assert opts["container-workdir"] == str(REPO)
    assert opts["kill-on-bad-exit"] == "1"
    assert "torchrun" not in " ".join(step["argv"])
    tasks = fake_slurm.tasks()
    assert [t["env"]["RANK"] for t in tasks] == [str(r) for r in range(8)]
    assert [t["env"]["LOCAL_RANK"] for t in tasks] == [str(r % 4) for r in range(8)]
    assert {t["env"]["WORLD_SIZE"] for t in tasks} == {"8"}
    assert {t["env"]["LOCAL_WORLD_SIZE"] for t in tasks} == {"4"}
    assert {t["env"]["MASTER_ADDR"] for t in tasks} == {"gpu-node-007"}
    assert {t["env"]["MASTER_PORT"] for t in tasks} == {str(20000 + 4242)}
    assert {t["env"]["HF_HUB_OFFLINE"] for t in tasks} == {"1"}
    assert tasks[0]["argv"] == ["-m", "distillscale.cli", "run", QUICKSTART, "launch.tensor_parallel=2"]
    assert fake_slurm.records("scontrol")[0]["argv"] == ["show", "hostnames", "gpu-node-[007-008]"]


@pytest.mark.parametrize("inside", [False, True])
def test_parallel_layout_that_does_not_fit_fails_before_any_gpu_work(fake_slurm, inside):
    env = fake_slurm.env(**(in_job() if inside else {}))
    args = ["--config", QUICKSTART, "launch.tensor_parallel=2", "launch.pipeline_parallel=3"]
    if not inside:
        args += ["--nodes", "1", "--gpus-per-node", "8"]
    res = launch("prune_distill.sh", *args, env=env, check=False)
    assert res.returncode == 2
    assert "launch.tensor_parallel=2 x launch.pipeline_parallel=3 = 6 does not divide" in res.stderr
    assert fake_slurm.records("sbatch") == [] and fake_slurm.records("srun") == []


def test_flag_that_contradicts_the_allocation_is_an_error(fake_slurm):
    res = launch("prune_distill.sh", "--config", QUICKSTART, "--nodes", "3",
                 env=fake_slurm.env(**in_job()), check=False)
    assert res.returncode == 2 and "allocation has 2 node(s)" in res.stderr
    assert fake_slurm.records("srun") == []


def test_unknown_option_and_missing_config_are_one_line_errors(fake_slurm):
    res = launch("eval.sh", "--config", QUICKSTART, "--nodse", "2", env=fake_slurm.env(),
                 check=False)
    assert res.returncode == 2 and "unknown option --nodse" in res.stderr
    res = launch("data.sh", env=fake_slurm.env(), check=False)
    assert res.returncode == 2 and "--config (or --config-list) is required" in res.stderr
    res = launch("teacher.sh", "--config", "conf/experiments/nope.yaml", env=fake_slurm.env(),
                 check=False)
    assert res.returncode == 2 and "nope.yaml: config file not found" in res.stderr


@pytest.mark.parametrize("script", ["prune_distill.sh", "data.sh", "teacher.sh", "eval.sh",
                                    "fit.sh", "local.sh"])
def test_dry_run_prints_commands_without_slurm(script, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DISTILLSCALE_PYTHON":
           str(REPO / ".venv" / "bin" / "python")}
    assert shutil.which("sbatch", path=env["PATH"]) is None
    res = launch(script, "--dry-run", "--config", QUICKSTART, "seed=3", env=env)
    out = res.stdout
    if script == "local.sh":
        assert "-m distillscale.cli run conf/experiments/quickstart.yaml seed=3" in out
        assert "srun" not in out and "sbatch" not in out
    else:
        assert out.count("\nsbatch ") + out.startswith("sbatch ") == 1
        assert "srun --kill-on-bad-exit=1" in out and "--container-image=" in out
        assert "export WORLD_SIZE=" in out and "RANK=$SLURM_PROCID" in out
        assert "seed=3" in out


def test_teacher_job_sizes_gpus_by_vllm_tensor_parallel(fake_slurm):
    launch("teacher.sh", "--config", QUICKSTART, "launch.gpus_per_node=8",
           "launch.vllm_tensor_parallel=4", env=fake_slurm.env())
    argv = fake_slurm.records("sbatch")[0]["argv"]
    assert option(argv, "gpus-per-node") == "4" and option(argv, "ntasks-per-node") == "1"
    res = launch("teacher.sh", "--config", QUICKSTART, "--gpus-per-node", "2",
                 "launch.vllm_tensor_parallel=4", env=fake_slurm.env(), check=False)
    assert res.returncode == 2 and "vllm_tensor_parallel=4 needs 4 GPUs" in res.stderr


def _sweep_file(tmp_path: Path) -> Path:
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(
        f"name: grid\nbase: {REPO / QUICKSTART}\noutput_dir: {tmp_path / 'sweep'}\n"
        "overrides: [teacher.train.steps=20]\n"
        "dataset_sizes: [400, 800]\ncompression_ratios: [0.5, 0.25]\naxes: [width]\n"
        "methods: [logit_kd]\nsupervisions: [label]\nschedules: [one_shot]\n"
    )
    return sweep


def test_sweep_submits_dependent_arrays_and_skips_finished_cells(fake_slurm, tmp_path):
    sweep = _sweep_file(tmp_path)
    res = launch("sweep.sh", "--sweep", str(sweep), "--partition", "batch", "--gpus-per-node",
                 "8", env=fake_slurm.env())
    subs = fake_slurm.records("sbatch")
    names = [option(s["argv"], "job-name") for s in subs]
    assert names == ["distillscale-data", "distillscale-teacher", "distillscale-prune-distill",
                     "distillscale-eval", "distillscale-fit"]
    ids = [s["job_id"] for s in subs]
    arrays = [option(s["argv"], "array") for s in subs]
    deps = [option(s["argv"], "dependency") for s in subs]
    assert arrays == ["0-1", "0-1", "0-3", "0-3", None]  # 2 dataset sizes, 4 cells
    assert deps == [None, f"aftercorr:{ids[0]}", f"afterok:{ids[1]}", f"aftercorr:{ids[2]}",
                    f"afterok:{ids[3]}"]
    assert all(option(s["argv"], "partition") == "batch" for s in subs)
    assert option(subs[2]["argv"], "gpus-per-node") == "8"
    assert option(subs[0]["argv"], "gpus-per-node") is None  # data: CPU, no #SBATCH GPU default
    assert f"prune_distill={ids[2]}" in res.stdout

    # The array task's config is its line of the list; cells share their dataset's upstream.
    cells = (tmp_path / "sweep" / "plan" / "cells.txt").read_text().split()
    assert len(cells) == 4
    cell0 = Path(cells[0]).parent
    assert (cell0 / "data").is_symlink() and (cell0 / "teacher").is_symlink()
    cfg = load_config(cells[0])
    assert cfg.data.num_examples == 400 and len(cfg.students) == 1

    # A finished cell is skipped on the next submission, the others keep their order.
    mark_done(cfg)
    for up in (tmp_path / "sweep" / "upstream").iterdir():  # finished data/teacher/supervision
        for stage in ("data", "teacher", "supervision"):
            (up / stage).mkdir(parents=True, exist_ok=True)
            (up / stage / "manifest.json").write_text("{}")
    launch("sweep.sh", "--sweep", str(sweep), env=fake_slurm.env())
    subs2 = fake_slurm.records("sbatch")[5:]
    assert [option(s["argv"], "job-name") for s in subs2] == [
        "distillscale-prune-distill", "distillscale-eval", "distillscale-fit"]
    assert option(subs2[0]["argv"], "array") == "0-2"
    assert option(subs2[0]["argv"], "dependency") is None
    assert (tmp_path / "sweep" / "plan" / "cells.txt").read_text().split() == cells[1:]

    # Everything done: nothing is submitted.
    for c in cells[1:]:
        mark_done(load_config(c))
    res = launch("sweep.sh", "--sweep", str(sweep), env=fake_slurm.env())
    assert len(fake_slurm.records("sbatch")) == 8 and "nothing to submit" in res.stderr


def test_sweep_dry_run_prints_every_stage(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "DISTILLSCALE_PYTHON": str(REPO / ".venv" / "bin" / "python")}
    res = launch("sweep.sh", "--dry-run", "--sweep", str(_sweep_file(tmp_path)), env=env)
    assert res.stderr.count("\nsbatch ") == 5
    assert "--dependency=aftercorr:\\<data-job\\>" in res.stderr
    plan = plan_sweep(_sweep_file(tmp_path))  # re-planning is idempotent
    assert plan["pending_cells"] == 4


def test_preempted_step_is_requeued(fake_slurm):
    """USR1 to the batch shell -> forwarded to the tasks -> they exit 75 -> scontrol requeue."""
    env = fake_slurm.env(**in_job(SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2"),
                         FAKE_PY_WAIT_SIGNAL=1)
    proc = subprocess.Popen(["bash", "launchers/prune_distill.sh", "--config", QUICKSTART],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while len(list(fake_slurm.log.glob("ready.*"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(list(fake_slurm.log.glob("ready.*"))) == 2, "tasks never started"
    proc.send_signal(signal.SIGUSR1)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert ["requeue", "4242"] in [r["argv"] for r in fake_slurm.records("scontrol")]
    assert "requeueing 4242" in err


def test_failed_step_is_not_requeued_and_keeps_its_exit_code(fake_slurm):
    env = fake_slurm.env(**in_job(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0"), FAKE_PY_RC=3)
    res = launch("eval.sh", "--config", QUICKSTART, env=env, check=False)
    assert res.returncode == 3
    assert all(r["argv"][0] != "requeue" for r in fake_slurm.records("scontrol"))


def test_array_task_requeues_itself_by_array_id(fake_slurm):
    env = fake_slurm.env(**in_job(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0"), FAKE_PY_RC=75)
    launch("eval.sh", "--config", QUICKSTART, env=env)
    assert ["requeue", "77_0"] in [r["argv"] for r in fake_slurm.records("scontrol")]


def test_local_launcher_starts_ranks_itself(fake_slurm):
    """Same arguments as the Slurm launchers; it exports the rank variables srun would."""
    env = fake_slurm.env(DISTILLSCALE_PYTHON=fake_slurm.bin_dir / "python", MASTER_PORT=29999)
    launch("local.sh", "--config", QUICKSTART, "--gpus-per-node", "2", "--partition", "ignored",
           "seed=1", env=env)
    tasks = fake_slurm.tasks()
    assert [t["env"]["RANK"] for t in tasks] == ["0", "1"]
    assert [t["env"]["LOCAL_RANK"] for t in tasks] == ["0", "1"]
    assert {(t["env"]["WORLD_SIZE"], t["env"]["MASTER_ADDR"], t["env"]["MASTER_PORT"])
            for t in tasks} == {("2", "127.0.0.1", "29999")}
    assert tasks[0]["argv"] == ["-m", "distillscale.cli", "run", QUICKSTART, "seed=1"]
    res = launch("local.sh", "--config", QUICKSTART, "--nodes", "2", env=env, check=False)
    assert res.returncode == 2 and "this machine only" in res.stderr


def test_local_launcher_passes_the_requeue_code_on(fake_slurm):
    env = fake_slurm.env(DISTILLSCALE_PYTHON=fake_slurm.bin_dir / "python", FAKE_PY_RC=75)
    res = launch("local.sh", "--kind", "teacher", "--config", QUICKSTART, env=env, check=False)
    assert res.returncode == 75 and "run the same command again to resume" in res.stderr
    assert fake_slurm.tasks()[0]["argv"][:4] == ["-m", "distillscale.cli", "launch", "stage"]


def test_shellcheck_passes_on_every_launcher():
    exe = shutil.which("shellcheck")
    if exe is None:
        message = "shellcheck is not installed: run `make lint-shell` (installs it from Debian)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    res = subprocess.run([exe, "-x", *[str(p.relative_to(REPO)) for p in LAUNCHERS]], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout
    assert len(LAUNCHERS) >= 7


def test_sweep_local_runs_the_same_chain_in_order(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "DISTILLSCALE_PYTHON": str(REPO / ".venv" / "bin" / "python")}
    res = launch("sweep.sh", "--local", "--dry-run", "--sweep", str(_sweep_file(tmp_path)),
                 env=env)
    stages = [line.split()[5] if " stage " in line else "prune_distill"
              for line in res.stdout.splitlines()]
    assert stages == ["data"] * 2 + ["teacher"] * 2 + ["prune_distill"] * 4 + ["eval"] * 4 + ["fit"]
    assert "sbatch" not in res.stdout + res.stderr


def test_sweep_local_passes_a_command_line_the_cli_accepts(tmp_path):
    # The python sweep.sh --local execs parses its arguments with the real CLI parser and stops
    # there (running the sweep is the end-to-end tests' business).
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nshift 2\nexec %s -c 'import sys; from distillscale.cli import "
                    "_parser; a = _parser().parse_args(sys.argv[1:]); "
                    "print(\"parsed\", a.run_here, a.overrides)' \"$@\"\n"
                    % (REPO / ".venv" / "bin" / "python"))
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DISTILLSCALE_PYTHON": str(fake)}
    sweep = str(_sweep_file(tmp_path))
    assert launch("sweep.sh", "--local", "--sweep", sweep, env=env).stdout.strip() == \
        "parsed True []"
    res = launch("sweep.sh", "--local", "--sweep", sweep, "seed=3", env=env)
    assert res.stdout.strip() == "parsed True ['seed=3']"


def test_data_job_sizes_gpus_by_its_served_generator(fake_slurm):
    served = ["data.generator=designer", "data.llm.endpoint=serve", "data.llm.model=/models/gen",
              "data.llm.serve_tensor_parallel=4", "launch.gpus_per_node=8"]
    launch("data.sh", "--config", QUICKSTART, *served, env=fake_slurm.env())
    argv = fake_slurm.records("sbatch")[0]["argv"]
    assert option(argv, "gpus-per-node") == "4" and option(argv, "ntasks-per-node") == "1"
    # Without a served generator: one GPU for Curator's dedup, none when forced to CPU.
    launch("data.sh", "--config", QUICKSTART, "data.generator=designer",
           "launch.gpus_per_node=8", env=fake_slurm.env())
    assert option(fake_slurm.records("sbatch")[1]["argv"], "gpus-per-node") == "1"
    res = launch("data.sh", "--config", QUICKSTART, "--gpus-per-node", "2", *served,
                 env=fake_slurm.env(), check=False)
    assert res.returncode == 2 and "serve_tensor_parallel=4 needs 4 GPUs" in res.stderr
