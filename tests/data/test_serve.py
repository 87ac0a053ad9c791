"""`data.llm.endpoint: serve`: the data stage starts an OpenAI-compatible server for the build,
waits for it, and stops it after; a server that dies or never answers is a clear error. The
server here is a stdlib stand-in for `vllm serve` (tests/fixtures/fake_openai_server.py)."""

import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from distillscale.config import ConfigError, load_config
from distillscale.data.serve import VLLM_COMMAND, llm_endpoint, server_command

ROOT = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(ROOT / "tests/fixtures/fake_openai_server.py"),
        "--model", "{model}", "--port", "{port}"]


def _llm(**kw):
    base = {"endpoint": "serve", "model": "gen-model", "serve_tensor_parallel": 1,
                "serve_command": FAKE, "serve_args": [], "startup_timeout_s": 60}
    return SimpleNamespace(**(base | kw))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_vllm_command_is_filled_in():
    cmd = server_command("/models/nemotron", 8123, 4, None, ["--max-model-len", "4096"])
    assert cmd[:3] == ["vllm", "serve", "/models/nemotron"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--served-model-name") + 1] == "/models/nemotron"
    assert cmd[-2:] == ["--max-model-len", "4096"] and len(cmd) == len(VLLM_COMMAND) + 2


def test_server_runs_for_the_block_and_is_stopped_after(tmp_path):
    extra = ["--startup-delay", "1", "--max-model-len", "64"]  # a slow start is waited for
    with llm_endpoint(_llm(serve_args=extra), tmp_path, poll_s=0.2) as url:
        port = int(url.split(":")[2].split("/")[0])
        assert url == f"http://127.0.0.1:{port}/v1" and _port_open(port)
    assert not _port_open(port)
    log = (tmp_path / "llm_server.log").read_text()
    assert "extra args ['--max-model-len', '64']" in log


def test_server_is_stopped_when_the_build_fails(tmp_path):
    with pytest.raises(ValueError, match="boom"), \
            llm_endpoint(_llm(), tmp_path, poll_s=0.2) as url:
        port = int(url.split(":")[2].split("/")[0])
        raise ValueError("boom")
    assert not _port_open(port)


def test_a_server_that_exits_early_names_its_code_and_log(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*CUDA out of memory"), \
            llm_endpoint(_llm(serve_command=crash), tmp_path, poll_s=0.1):
        pass


def test_a_server_that_never_answers_times_out(tmp_path):
    silent = [sys.executable, "-c", ("import time; print('loading weights', flush=True); "
              "time.sleep(60)")]
    with pytest.raises(TimeoutError, match=r"(?s)startup_timeout_s=1 s.*loading weights"), \
            llm_endpoint(_llm(serve_command=silent, startup_timeout_s=1), tmp_path, poll_s=0.2,
                         grace_s=5):
        pass


def test_a_missing_server_program_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot start 'no-such-vllm'"), \
            llm_endpoint(_llm(serve_command=["no-such-vllm", "{model}"]), tmp_path):
        pass


def test_an_url_endpoint_is_used_as_given(tmp_path):
    with llm_endpoint(_llm(endpoint="http://gpu-node:8000/v1"), tmp_path) as url:
        assert url == "http://gpu-node:8000/v1"
    assert not (tmp_path / "llm_server.log").exists()


def test_endpoint_must_be_a_url_or_serve(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ndomain: {taxonomy: conf/domains/cyber.yaml}\nteacher: {arch: {num_layers: 2, hidden_size: 64, "
                   "ffn_hidden_size: 128, num_attention_heads: 4, num_query_groups: 2}}\n"
                   "data: {generator: designer, llm: {endpoint: localhost:8000, model: m}}\n")
    with pytest.raises(ConfigError, match="neither an http"):
        load_config(cfg)


@pytest.mark.slow
def test_llm_recipe_with_a_served_model(tmp_path):
    """A whole LLM-mode build against a server the stage starts itself."""
    from distillscale.cli import main
    from distillscale.data.build import read_jsonl

    out = tmp_path / "data"
    rc = main(["data", "build", "--domain", str(ROOT / "conf/domains/finance.yaml"),
               "--rows", "400", "--out", str(out), "max_rounds=2", "semantic_dedup=false",
               "min_per_class=4", "card_umap_points=0",
               "llm.endpoint=serve", "llm.model=gen-model", "llm.max_parallel_requests=4",
               f"llm.serve_command={json.dumps(FAKE)}"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["rows_in"] == man["rows_kept"] + man["rows_rejected"]
    rows = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert len(rows) == man["rows_kept"] >= 350
    assert all(r["gold_label"] == r["label"] for r in rows)
    assert "LLM gen-model" in (out / "dataset_card.md").read_text()
