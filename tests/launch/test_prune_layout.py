"""The prune stage's own layout (TP 1, PP from the teacher's size), distinct from the distill
layout, in the plan and in the launcher's dry run."""

import json
import shutil
from pathlib import Path

import pytest

from distillscale.config import ConfigError, load_config
from distillscale.launch.allocation import plan_launch, prune_layout

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, config_json: dict | None = None, *overrides):
    folder = tmp_path / "teacher"
    folder.mkdir(exist_ok=True)
    if config_json is None:
        shutil.copy(ROOT / "tests/fixtures/qwen3_8b_config.json", folder / "config.json")
    else:
        (folder / "config.json").write_text(json.dumps(config_json))
    return load_config(ROOT / "conf/experiments/gpu_8b.yaml",
                       [f"teacher.hf_path={folder}", f"output_dir={tmp_path / 'runs'}", *overrides])


def test_an_8b_teacher_prunes_at_tp1_pp1_while_distill_runs_tp4(tmp_path):
    cfg = _cfg(tmp_path)
    assert prune_layout(cfg, 16, 8) == (1, 1, 16)
    plan = plan_launch(cfg, "prune_distill", nodes=2, gpus_per_node=8)
    assert (plan.tensor_parallel, plan.pipeline_parallel) == (4, 1)
    assert (plan.prune_tensor_parallel, plan.prune_pipeline_parallel,
            plan.prune_data_parallel) == (1, 1, 16)


def test_a_teacher_too_large_for_one_gpu_is_refused_in_one_line(tmp_path):
    big = json.loads((ROOT / "tests/fixtures/qwen3_8b_config.json").read_text())
    big.update(num_hidden_layers=80, hidden_size=8192, intermediate_size=29568,
               num_attention_heads=64)  # ~70B: 140 GB in bf16
    cfg = _cfg(tmp_path, big)
    with pytest.raises(ConfigError) as e:
        prune_layout(cfg, 16, 8)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prune: the teacher")
    assert "needs pipeline_parallel=4" in msg


def test_vllm_jobs_get_the_vllm_image_and_training_the_nemo_image(tmp_path):
    cfg = _cfg(tmp_path, None, "launch.vllm_container=/images/vllm.sqsh")
    assert plan_launch(cfg, "teacher").image == "/images/vllm.sqsh"
    assert plan_launch(cfg, "eval").image == "/images/vllm.sqsh"
    assert plan_launch(cfg, "prune_distill").image == cfg.launch.container
    assert plan_launch(cfg, "fit").image == cfg.launch.container
    assert plan_launch(cfg, "eval", image="mine.sqsh").image == "mine.sqsh"  # --image wins
