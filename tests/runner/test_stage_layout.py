"""A stage's own parallel layout: the prune stage runs at TP 1 and distillation at launch.*
in one process of a 2-rank world (two gloo processes: `python THIS_FILE --worker`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from gloo_ranks import run_ranks


def _worker(out: Path) -> None:
    from megatron.core import parallel_state as ps

    from distillscale.config import load_config
    from distillscale.runner import setup_process

    cfg = load_config(ROOT / "conf/experiments/quickstart.yaml", [
        "launch.tensor_parallel=2", f"output_dir={out / 'run'}"])
    seen = []
    for layout in (None, (1, 1), None):  # distill layout, prune layout, distill again
        setup_process(cfg, layout)
        seen.append([ps.get_tensor_model_parallel_world_size(),
                     ps.get_data_parallel_world_size()])
    if int(os.environ["RANK"]) == 0:
        (out / "seen.json").write_text(json.dumps(seen))


def test_the_model_parallel_groups_follow_each_stages_layout(tmp_path):
    run_ranks([sys.executable, __file__, "--worker", str(tmp_path)], world=2)
    # TP 2 (DP 1) for distillation, TP 1 (DP 2) for pruning, and back.
    assert json.loads((tmp_path / "seen.json").read_text()) == [[2, 1], [1, 2], [2, 1]]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
