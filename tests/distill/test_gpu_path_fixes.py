"""What a first GPU run of the Bridge path would hit, checked on CPU: Bridge's positive seed,
one SFT dataset for every rank, Bridge's exit-signal stop requeued, LoRA targets anchored at
the student, and vLLM's engine sizes for lm-eval."""

import threading

import pytest

from distillscale.distill import bridge


def test_bridge_seed_is_positive_and_distinct():
    assert [bridge.bridge_seed(s) for s in (0, 1, 2)] == [1, 2, 3]


def test_every_rank_reads_the_dataset_rank0_writes(tmp_path):
    rows = [{"id": "a", "text": "t one", "label": "x"}, {"id": "b", "text": "t two", "label": "y"}]
    got = {}

    def rank1():
        got[1] = bridge.shared_sft_dataset(rows, rows[:1], tmp_path / "sft", "label", 1,
                                           timeout_s=60)

    t = threading.Thread(target=rank1)
    t.start()  # waits for rank 0's marker
    got[0] = bridge.shared_sft_dataset(rows, rows[:1], tmp_path / "sft", "label", 0)
    t.join(60)
    assert got[0] == got[1] == tmp_path / "sft"
    assert len((tmp_path / "sft" / "training.jsonl").read_text().splitlines()) == 2
    with pytest.raises(TimeoutError, match="rank 0 did not write"):
        bridge.shared_sft_dataset(rows * 2, rows, tmp_path / "sft", "label", 1, timeout_s=0.5)


def test_bridge_exit_signal_stop_is_a_requeue(tmp_path):
    from distillscale.train import preemption

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40\n")

    def stopped():  # what Bridge does on USR1: checkpoint, then sys.exit(0)
        raise SystemExit(0)

    with pytest.raises(SystemExit) as e:
        bridge.run_or_requeue(stopped, tmp_path, 100)
    assert e.value.code == preemption.REQUEUE_EXIT_CODE == 75
    bridge.run_or_requeue(stopped, tmp_path, 40)  # finished: no requeue
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(RuntimeError, match="no checkpoint"):
        bridge.run_or_requeue(stopped, tmp_path, 100)


def test_lora_targets_match_the_student_and_not_the_teacher():
    from distillscale.compat.cpu import activate

    activate()
    from megatron.bridge.peft.utils import wildcard_match

    student = "decoder.layers.3.self_attention.linear_qkv"
    teacher = "_teacher_model.decoder.layers.3.self_attention.linear_qkv"
    assert any(wildcard_match(t, student) for t in bridge.MEGATRON_LORA_TARGETS)
    assert not any(wildcard_match(t, teacher) for t in bridge.MEGATRON_LORA_TARGETS)


def test_vllm_engine_gets_tensor_parallel_and_max_len():
    from distillscale.eval.general import model_spec

    name, args = model_spec("/m", "vllm", 8, tensor_parallel=2, max_model_len=4096)
    assert name == "vllm" and args["tensor_parallel_size"] == 2 and args["max_model_len"] == 4096
