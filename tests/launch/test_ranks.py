"""Several ranks (gloo, two processes, as srun starts them): only rank 0 writes stage folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distillscale.config import ConfigError, load_config
from distillscale.launch.allocation import check_world_size, plan_launch

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "conf/experiments/quickstart.yaml"

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch.distributed as dist
    from distillscale.launch.ranks import is_rank_zero, wait_for_stage
    from distillscale.manifest import atomic_stage, read_manifest

    root = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    # A stage only rank 0 computes, before any process group exists (as pipeline.run_data):
    # rank 0 builds it, the others wait for its manifest.
    src = root / "source.txt"
    src.write_text("rows")
    if is_rank_zero():
        time.sleep(1.0)  # rank 1 must really wait
        with atomic_stage(root / "data", "data", "h0", {"source": src}, collective=False) as out:
            (out.path / "train.jsonl").write_text("{}")
    else:
        wait_for_stage(root / "data", "h0", {"source": src}, poll_s=0.1)
    seen = {"data_rows": (root / "data" / "train.jsonl").read_text()}
    dist.init_process_group("gloo")
    with atomic_stage(root / "stage", "train", "h1", {"data": root / "data"}) as out:
        # every rank writes its own state (as a training loop's checkpoint would)
        (out.path / "state.txt").write_text(f"rank {rank}")
        seen["wrote_to"] = str(out.path.relative_to(root))
    # after the stage every rank sees the finished folder, written by rank 0 alone
    seen["state"] = (root / "stage" / "state.txt").read_text()
    seen["scratch_left"] = sorted(p.name for p in (root / "stage").glob(".rank*"))
    seen["manifest_stage"] = read_manifest(root / "stage")["stage"]
    print(json.dumps(seen))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_each_stage_once(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DISTILLSCALE_STAGE_WAIT_S": "120", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert seen[0]["wrote_to"] == "stage.tmp" and seen[1]["wrote_to"] == "stage.tmp/.rank1"
    assert all(s["state"] == "rank 0" for s in seen)
    assert all(s["scratch_left"] == [] and s["manifest_stage"] == "train" for s in seen)
    assert all(s["data_rows"] == "{}" for s in seen)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["data", "stage"]


def test_plan_layouts(tmp_path):
    # A run folder of its own: a trained quickstart teacher in runs/ would have its students'
    # shapes checked against PP 2 (the 1-layer depth student does not split in two).
    cfg = load_config(QUICKSTART, ["launch.tensor_parallel=2", "launch.pipeline_parallel=2",
                                   f"output_dir={tmp_path}"])
    plan = plan_launch(cfg, "prune_distill", nodes=4, gpus_per_node=8, repo=REPO)
    assert (plan.world_size, plan.data_parallel, plan.tasks_per_node) == (32, 8, 8)
    assert plan.mounts.split(",")[0] == f"{REPO}:{REPO}"
    cpu = plan_launch(load_config(QUICKSTART), "prune_distill", repo=REPO)
    assert (cpu.world_size, cpu.tasks_per_node, cpu.gpus_per_node) == (1, 1, 0)
    with pytest.raises(ConfigError, match="must stay inside a node"):
        plan_launch(load_config(QUICKSTART, ["launch.tensor_parallel=2"]), "prune_distill",
                    nodes=2, gpus_per_node=1)
    with pytest.raises(ConfigError, match="runs on one node"):
        plan_launch(cfg, "data", nodes=2)
    with pytest.raises(ConfigError, match="does not divide WORLD_SIZE=3"):
        check_world_size(cfg, 3)
    check_world_size(cfg, 8)


def test_launch_section_rejects_bad_values():
    with pytest.raises(ConfigError, match="launch.time"):
        load_config(QUICKSTART, ["launch.time=4 hours"])
    with pytest.raises(ConfigError, match="launch.container_mounts.0"):
        load_config(QUICKSTART, ["launch.container_mounts=[/only/source]"])
