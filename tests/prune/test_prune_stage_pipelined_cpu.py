"""The prune stage's PP > 1 path (`stages/prune.py` `prune_pipelined`) on CPU: a tiny random Qwen3
HF teacher pruned on two gloo ranks (PP 2, `python THIS_FILE --worker`) into a stage folder, then
read back in this process at PP 1 the way later stages read a pruned folder: `checkpoint/`
(megatron-core's `dist/` checkpoint + `arch.json`) by `models/checkpoint.py` `load_model`, and
`hf/` by transformers. Both give the student the PP 1 stage path (`prune_minitron` on the teacher
as the teacher stage imports it) prunes from the same calibration batches.

Not a full stage run on two ranks (data, teacher and runner stages on gloo would not fit a short
test): `_body_pipelined` only adds the config's calibration rows and metrics around this call.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from gloo_ranks import run_ranks

TARGET = {"hidden_size": 48, "ffn_hidden_size": 128, "num_layers": 2}
SEQ = 16


def _batches(vocab: int, seed: int, batches: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, SEQ), generator=g) for _ in range(batches)]


def _worker(teacher: Path, out: Path) -> None:
    from distillscale.models.hf_io import arch_from_hf_config
    from distillscale.models.megatron_gpt import init_distributed
    from distillscale.stages.prune import prune_pipelined

    init_distributed(pipeline_parallel=int(os.environ["WORLD_SIZE"]))
    arch, vocab = arch_from_hf_config(teacher)
    (probe,) = _batches(vocab, seed=2, batches=1, batch=3)
    metrics = prune_pipelined(teacher, arch, vocab, TARGET, _batches(vocab, 1, 3, 2),
                              out / "pruned", probe=probe, scores_dir=out / "scores")
    if int(os.environ["RANK"]) == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny_hf import build_checkpoint, build_tokenizer

    tok = build_tokenizer([f"w{i} alpha beta gamma delta" for i in range(64)], vocab_size=256)
    return build_checkpoint("qwen3", tmp_path_factory.mktemp("teacher") / "qwen3", tok, layers=4)


@pytest.mark.slow
def test_pp2_stage_folder_loads_as_the_pp1_stage_student(teacher, tmp_path, megatron):
    from transformers import AutoModelForCausalLM

    from distillscale.models.checkpoint import load_model
    from distillscale.models.hf_io import load_hf
    from distillscale.models.megatron_gpt import (
        count_params,
        forward_logits,
        init_distributed,
        use_model_parallel_layout,
    )
    from distillscale.prune.minitron import prune_minitron
    from distillscale.prune.shapes import pruned_arch

    run_ranks([sys.executable, __file__, "--worker", str(teacher), str(tmp_path)], world=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    folder = tmp_path / "pruned"
    assert (folder / "checkpoint" / "dist" / "metadata.json").is_file()

    use_model_parallel_layout(1, 1)
    init_distributed()
    # The PP 1 stage path: the teacher as the teacher stage imports it, pruned by prune_minitron.
    source, arch, vocab = load_hf(teacher)
    calib = _batches(vocab, 1, 3, 2)

    def forward_loop(model):
        with torch.no_grad():
            for batch in calib:
                forward_logits(model, batch)

    info: dict = {}
    pp1, pp1_arch = prune_minitron(source, arch, TARGET, forward_loop, info=info)
    (probe,) = _batches(vocab, seed=2, batches=1, batch=3)

    student, student_arch, student_vocab = load_model(folder)  # resharded from PP 2 to PP 1
    assert student_arch == pp1_arch == pruned_arch(arch, TARGET) and student_vocab == vocab
    assert metrics["arch"] == json.loads(json.dumps(pp1_arch.model_dump(mode="json")))
    assert metrics["params"] == count_params(student) == count_params(pp1)
    assert metrics["dropped_layers"] == info["dropped_layers"]
    assert metrics["hf_max_abs_logit_diff"] <= 1e-4
    with torch.no_grad():
        got, want = forward_logits(student, probe).float(), forward_logits(pp1, probe).float()
        hf = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
        hf_logits = hf(probe).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert (hf_logits - got).abs().max().item() <= 1e-4


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
