import pytest
import torch

from distillscale.distill.speed import median_speedup, student_speed, time_rounds


def test_median_speedup_is_the_median_within_round_ratio():
    # Round 2 is disturbed for the student only; the median ignores it.
    assert median_speedup([2.0, 2.0, 2.2], [1.0, 4.0, 1.1]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        median_speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        median_speedup([], [])


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, input_ids, logits_to_keep=0):
        self.calls.append(logits_to_keep)
        return input_ids


def test_time_rounds_warms_up_then_times_every_model_each_round():
    a, b = _Counting(), _Counting()
    times = time_rounds({"a": a, "b": b}, torch.zeros(2, 3, dtype=torch.long), repeats=4)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert a.calls == [1] * 5 and b.calls == [1] * 5  # warm-up + 4 rounds, last logits only
    with pytest.raises(ValueError, match="repeats"):
        time_rounds({"a": a}, torch.zeros(1, 1, dtype=torch.long), repeats=0)


def test_student_speed_reads_two_hf_exports(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(layers, name, context=16):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=context)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
        return tmp_path / name

    got = student_speed(save(1, "s"), save(2, "t"), batch=2, repeats=2)
    assert got["speed_seq"] == 16 and got["speed_batch"] == 2  # seq from the teacher's context
    assert got["cpu_tokens_per_s"] > 0 and got["teacher_cpu_tokens_per_s"] > 0
    assert got["cpu_speedup"] > 0
    # A real model's context (8k for SmolLM2) is not what a task's prompt is: the check times
    # prompts of SPEED_SEQ tokens in batches of at most SPEED_TOKENS tokens.
    got = student_speed(save(1, "s"), save(2, "long", context=4096), repeats=2)
    assert got["speed_seq"] == 256 and got["speed_batch"] == 2
