"""Fake `sbatch` / `srun` / `scontrol` / container `python` executables that record what the
launchers ask of them, so the launchers run here without Slurm.

- sbatch prints increasing job ids and records its argv;
- srun runs its command once per task (nodes x ntasks-per-node) with the SLURM_PROCID /
  SLURM_LOCALID / SLURM_NTASKS a real srun sets, forwards USR1 / TERM to the tasks, and returns
  the highest task exit code;
- scontrol answers `show hostnames` and records `requeue`;
- python (the container's, or local.sh's tasks) records its argv and the rank environment; FAKE_PY_RC sets its exit
  code; FAKE_PY_WAIT_SIGNAL=1 makes it wait for USR1 and then exit 75, like a preempted run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SBATCH = r'''
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
counter = os.path.join(log, "next_job_id")
n = int(open(counter).read()) if os.path.exists(counter) else 1000
open(counter, "w").write(str(n + 1))
with open(os.path.join(log, "sbatch.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "job_id": n}) + "\n")
print(n)
'''

SRUN = r'''
import json, os, signal, subprocess, sys
log = os.environ["FAKE_SLURM_LOG"]
argv = sys.argv[1:]
opts, i = {}, 0
while i < len(argv) and argv[i].startswith("--"):
    k, _, v = argv[i][2:].partition("=")
    opts[k] = v
    i += 1
cmd = argv[i:]
with open(os.path.join(log, "srun.jsonl"), "a") as f:
    f.write(json.dumps({"argv": argv, "options": opts, "command": cmd,
                        "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT",
                                "WORLD_SIZE", "LOCAL_WORLD_SIZE", "HF_HUB_OFFLINE")}}) + "\n")
nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local),
                   SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                   SLURM_NTASKS=str(nodes * per_node))
        procs.append(subprocess.Popen(cmd, env=env))
def forward(sig, frame):
    for p in procs:
        p.send_signal(sig)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(p.wait() for p in procs))
'''

SCONTROL = r'''
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
with open(os.path.join(log, "scontrol.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("gpu-node-007\ngpu-node-008")
'''

PYTHON = r'''
import json, os, signal, sys, time
if sys.argv[1:5] == ["-m", "distillscale.cli", "launch", "plan"]:  # the plan needs the real one
    os.execv(os.environ["FAKE_REAL_PYTHON"], [os.environ["FAKE_REAL_PYTHON"], *sys.argv[1:]])
log = os.environ["FAKE_SLURM_LOG"]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "HF_HUB_OFFLINE", "SLURM_PROCID")
with open(os.path.join(log, "python.%d.json" % os.getpid()), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
if os.environ.get("FAKE_PY_WAIT_SIGNAL") == "1":
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(os.path.join(log, "ready.%s" % os.environ.get("RANK", "0")), "w").close()
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(75 if got else 1)
sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """PATH with fake Slurm tools first; returns a helper to read what they recorded."""
    bin_dir = tmp_path / "fakebin"
    log = tmp_path / "slurmlog"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL),
                       ("python", PYTHON)):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n{body}")
        exe.chmod(0o755)
    return FakeSlurm(bin_dir, log)


class FakeSlurm:
    def __init__(self, bin_dir: Path, log: Path):
        self.bin_dir, self.log = bin_dir, log

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "DISTILLSCALE_REPO"):
            env.pop(k, None)
        env.update(PATH=f"{self.bin_dir}:{env['PATH']}", FAKE_SLURM_LOG=str(self.log),
                   DISTILLSCALE_PYTHON=sys.executable, FAKE_REAL_PYTHON=sys.executable)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def records(self, tool: str) -> list[dict]:
        path = self.log / f"{tool}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def tasks(self) -> list[dict]:
        out = [json.loads(p.read_text()) for p in self.log.glob("python.*.json")]
        return sorted(out, key=lambda r: int(r["env"]["RANK"] or 0))
