"""Request / response mapping of the vLLM and OpenAI-compatible backends, on CPU.

vLLM is not installed on CPU machines; its outputs are replayed from data in vLLM's own object
layout (tests/teacher/data/vllm_request_outputs.json)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from distillscale.teacher.backends import cut_at_stop
from distillscale.teacher.backends.openai_compat import completions_from_response
from distillscale.teacher.backends.vllm import (
    completion_from_output,
    sampling_kwargs,
    topk_from_prompt_logprobs,
)

DATA = json.loads((Path(__file__).parent / "data" / "vllm_request_outputs.json").read_text())


def _request_output(d):
    return SimpleNamespace(**{**d, "outputs": [SimpleNamespace(**o) for o in d["outputs"]]})


def _prompt_logprobs(entries):
    return [None if e is None else {int(t): SimpleNamespace(**lp) for t, lp in e.items()}
            for e in entries]


def test_without_vllm_the_backend_says_what_is_missing():
    import importlib.util

    from distillscale.teacher.backends import make_backend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(RuntimeError, match="needs vLLM"):
        make_backend("vllm", "/nonexistent")


def test_sampling_kwargs_greedy_and_sampled():
    kw = sampling_kwargs(40, ["</think>"], 0.0, 3)
    assert kw == {"max_tokens": 40, "temperature": 0.0, "skip_special_tokens": False,
                  "stop": ["</think>"]}
    assert sampling_kwargs(8, None, 0.7, 3)["seed"] == 3


def test_completion_mapping():
    a, b = (completion_from_output(_request_output(d)) for d in DATA["generate"])
    assert (a.text, a.n_tokens, a.finish) == ("cue tops . results above expectations .", 7, "stop")
    assert (b.n_tokens, b.finish) == (4, "length")


def test_prompt_logprobs_mapping_keeps_the_top_k_by_rank():
    d = DATA["prompt_logprobs"]
    top = topk_from_prompt_logprobs(_prompt_logprobs(d["prompt_logprobs"]), d["k"])
    # Position t holds the distribution of token t+1: one row per prompt token but the first.
    assert top.ids.tolist() == [[5, 11], [12, 13], [9, 14]]
    np.testing.assert_allclose(top.logprobs, [[-0.1, -2.5], [-0.3, -1.6], [-0.05, -3.2]])
    with pytest.raises(ValueError, match="max_logprobs"):
        topk_from_prompt_logprobs(_prompt_logprobs(d["prompt_logprobs"]), 4)


def test_openai_choices_are_put_back_in_prompt_order():
    resp = SimpleNamespace(choices=[
        SimpleNamespace(index=1, text=" earnings_miss", finish_reason="stop"),
        SimpleNamespace(index=0, text=" cue", finish_reason="length"),
    ])
    a, b = completions_from_response(resp, 2)
    assert (a.text, a.finish, b.text, b.finish) == (" cue", "length", " earnings_miss", "stop")
    with pytest.raises(ValueError, match="no choice"):
        completions_from_response(resp, 3)


def test_cut_at_stop():
    assert cut_at_stop("cue a . </think> event : x", ["</think>"]) == ("cue a . ", True)
    assert cut_at_stop("cue a", ["</think>"]) == ("cue a", False)
