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


def _llama(path, layers, hidden=32, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=16, tie_word_embeddings=tie)
    torch.manual_seed(layers)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_generation_rounds_make_exactly_the_tokens_asked_for(tmp_path):
    from distillscale.distill.speed import (
        load_hf_causal_lm,
        non_embedding_params,
        time_generation_rounds,
    )

    models = {"t": load_hf_causal_lm(_llama(tmp_path / "t", 2)),
              "s": load_hf_causal_lm(_llama(tmp_path / "s", 1, tie=True))}
    times = time_generation_rounds(models, torch.ones(1, 5, dtype=torch.long), 6, repeats=2)
    assert {k: len(v) for k, v in times.items()} == {"t": 2, "s": 2}
    assert all(t > 0 for ts in times.values() for t in ts)
    # Untied: embedding and head both left out; tied: the shared matrix once.
    t, s = models["t"], models["s"]
    assert non_embedding_params(t) == sum(p.numel() for p in t.parameters()) - 2 * 64 * 32
    assert non_embedding_params(s) == sum(p.numel() for p in s.parameters()) - 64 * 32
    with pytest.raises(ValueError, match="new_tokens"):
        time_generation_rounds(models, torch.ones(1, 2, dtype=torch.long), 0, repeats=1)


def test_bench_student_speed_reports_both_modes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    _llama(run / "teacher" / "hf", 2)
    _llama(run / "students" / "d" / "pruned" / "hf", 1)
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, str(repo / "tools" / "bench_student_speed.py"), "--run", str(run),
         "--stage", "pruned", "--batch", "2", "--seq", "8", "--repeats", "2",
         "--gen-prompt", "4", "--new-tokens", "3", "--gen-repeats", "2"],
        capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    last = dict(kv.split("=") for kv in res.stdout.strip().splitlines()[-1].split())
    assert set(last) == {f"{m}_min_speedup_over_{k}_ratio" for m in ("prefill", "generate")
                         for k in ("param", "nonemb")}
    assert all(float(v) > 0 for v in last.values())
    speed = json.loads((run / "speed.json").read_text())
    assert speed["stage"] == "pruned"
    assert [r["model"] for r in speed["generate"]["rows"]] == ["teacher", "d"]
    assert speed["prefill"]["rows"][1]["param_ratio"] > 1
    # --students picks students by name, and an unknown name is refused in one line.
    res = subprocess.run(
        [sys.executable, str(repo / "tools" / "bench_student_speed.py"), "--run", str(run),
         "--stage", "pruned", "--mode", "generate", "--gen-prompt", "4", "--new-tokens", "2",
         "--gen-repeats", "1", "--cache", "static", "--students", "e"],
        capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0 and "--students: no pruned export of ['e']" in res.stderr


@pytest.mark.slow
def test_static_cache_and_compiled_generation_make_the_same_tokens(tmp_path):
    """`--cache static` and `--compile` (the bench's decoding options) generate the eager
    dynamic-cache tokens: greedy, so the same ids whatever the cache and the kernels."""
    from distillscale.distill.speed import (
        compile_for_decoding,
        load_hf_causal_lm,
        time_generation_rounds,
    )

    path = _llama(tmp_path / "t", 2)
    prompt = torch.tensor([[3, 9, 4, 17, 5]])
    mask = torch.ones_like(prompt)

    def tokens(model, **kw):
        return model.generate(input_ids=prompt, attention_mask=mask, do_sample=False,
                              max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **kw)

    eager = load_hf_causal_lm(path)
    ref = tokens(eager)
    assert torch.equal(tokens(eager, cache_implementation="static"), ref)
    compiled = compile_for_decoding(load_hf_causal_lm(path))
    times = time_generation_rounds({"c": compiled}, prompt, 6, repeats=1, cache="static")
    assert len(times["c"]) == 1 and times["c"][0] > 0
    with torch.inference_mode():  # the static cache the timed rounds made is an inference one
        assert torch.equal(tokens(compiled, cache_implementation="static"), ref)
