"""conf/experiments/gpu_8b.yaml as far as a CPU takes it: the config loads, the teacher's
architecture comes from its config.json (Qwen3-8B's, no weights), every student's pruned
shape is planned on it, and the launch plans are checked. Loading the 8B weights, vLLM
supervision and Bridge distillation need the GPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path):
    from distillscale.config import load_config

    folder = tmp_path / "Qwen3-8B"
    folder.mkdir()
    shutil.copy(ROOT / "tests/fixtures/qwen3_8b_config.json", folder / "config.json")
    return load_config(ROOT / "conf/experiments/gpu_8b.yaml",
                       [f"teacher.hf_path={folder}", f"output_dir={tmp_path / 'runs'}",
                        f"domain.taxonomy={ROOT / 'conf/domains/finance.yaml'}"])


def test_teacher_arch_and_student_plans_from_config_json(cfg):
    from distillscale.models.hf_io import arch_from_hf_config
    from distillscale.models.megatron_gpt import arch_params
    from distillscale.models.shape import hf_family
    from distillscale.pipeline import student_steps

    arch, vocab = arch_from_hf_config(cfg.teacher.hf_path)
    assert (arch.num_layers, arch.hidden_size, arch.num_query_groups, arch.head_dim) == (
        36, 4096, 8, 128)
    assert arch.qk_layernorm and not arch.add_qkv_bias and hf_family(arch) == "qwen3"
    assert arch.rotary_base == 1e6 and arch.rope_scaling is None and vocab == 151936
    teacher = arch_params(arch, vocab)
    assert 8.0e9 < teacher < 8.4e9  # Qwen3-8B: 8.19B with untied embeddings
    for s in cfg.students:
        steps = student_steps(cfg, s)
        final = steps[-1].arch
        assert final.qk_layernorm  # the family survives pruning
        assert final.num_attention_heads % arch.num_query_groups == 0
        assert final.hidden_size % cfg.prune.hidden_size_divisor == 0
        assert final.ffn_hidden_size % cfg.prune.ffn_hidden_size_divisor == 0
        assert abs(steps[-1].ratio - s.compression_ratio) < 0.05, (s.name, steps[-1])


def test_launch_plans_check_the_layout(cfg):
    from distillscale.config import ConfigError
    from distillscale.launch.allocation import plan_launch

    plan = plan_launch(cfg, "prune_distill")
    assert (plan.world_size, plan.tensor_parallel, plan.pipeline_parallel,
            plan.data_parallel) == (16, 4, 1, 4)  # PP 1: depth_0.16 has 1 layer
    assert plan_launch(cfg, "teacher").gpus_per_node == cfg.launch.vllm_tensor_parallel
    with pytest.raises(ConfigError):
        plan_launch(cfg, "prune_distill", nodes=1, gpus_per_node=6)  # 6 ranks: not a multiple of TP 4 x PP 2
