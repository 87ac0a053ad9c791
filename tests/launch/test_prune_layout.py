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


def _big(**changes) -> dict:
    big = json.loads((ROOT / "tests/fixtures/qwen3_8b_config.json").read_text())
    big.update(num_hidden_layers=80, hidden_size=8192, intermediate_size=29568,
               num_attention_heads=64)  # ~70B: 140 GB in bf16
    return {**big, **changes}


def test_an_hf_teacher_too_large_for_one_gpu_prunes_over_pipeline_stages(tmp_path):
    # 140 GB at 40 GiB a GPU: PP 4 (the smallest divisor of 8 GPUs that also divides 80 layers),
    # pruned through its Bridge provider (`prune/bridge_prune.py`); DP = 16 / 4.
    cfg = _cfg(tmp_path, _big())
    assert prune_layout(cfg, 16, 8) == (1, 4, 4)
    plan = plan_launch(cfg, "prune_distill", nodes=2, gpus_per_node=8)
    assert (plan.prune_tensor_parallel, plan.prune_pipeline_parallel,
            plan.prune_data_parallel) == (1, 4, 4)
    # The PP must also divide the layers: 40 layers (70 GB) fit PP 2; 20 layers' 35 GB, PP 1.
    assert prune_layout(_cfg(tmp_path, _big(num_hidden_layers=40)), 16, 8) == (1, 2, 8)


@pytest.mark.parametrize("gpus, layers, why", [
    (2, 80, "does not fit 2 GPU(s)"),   # PP 2 = every GPU of the node: 70 GB a GPU
    (8, 81, "does not fit 8 GPU(s)"),   # 81 layers: no divisor of 8 but 1 divides them
])
def test_a_teacher_no_pipeline_of_one_node_can_hold_is_refused_in_one_line(tmp_path, gpus, layers,
                                                                            why):
    cfg = _cfg(tmp_path, _big(num_hidden_layers=layers))
    with pytest.raises(ConfigError) as e:
        prune_layout(cfg, 2 * gpus, gpus)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prune: the teacher") and why in msg


def test_a_scratch_teacher_that_would_need_pp_is_refused_in_one_line(tmp_path):
    from distillscale.config import ModelArch

    cfg = _cfg(tmp_path, _big())
    arch = ModelArch(num_layers=80, hidden_size=8192, ffn_hidden_size=29568,
                     num_attention_heads=64, num_query_groups=8, seq_length=4096)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"source": "scratch", "hf_path": None, "arch": arch})})
    with pytest.raises(ConfigError) as e:
        prune_layout(cfg, 16, 8)
    msg = str(e.value)
    assert "\n" not in msg and "needs pipeline_parallel=4" in msg and "HF teacher" in msg


def test_vllm_jobs_get_the_vllm_image_and_training_the_nemo_image(tmp_path):
    cfg = _cfg(tmp_path, None, "launch.vllm_container=/images/vllm.sqsh")
    assert plan_launch(cfg, "teacher").image == "/images/vllm.sqsh"
    assert plan_launch(cfg, "eval").image == "/images/vllm.sqsh"
    assert plan_launch(cfg, "prune_distill").image == cfg.launch.container
    assert plan_launch(cfg, "fit").image == cfg.launch.container
    assert plan_launch(cfg, "eval", image="mine.sqsh").image == "mine.sqsh"  # --image wins
