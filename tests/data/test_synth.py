"""Data Designer synthesis: offline sampler/template columns, and the LLM column against a
fake OpenAI-compatible endpoint (no model server is reachable here)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from distillscale.data.synth import LLMSettings, RoundSpec, clean_llm_headline, synthesize
from distillscale.domain import SLOT, load_taxonomy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy(ROOT / "conf/domains/finance.yaml")


def test_offline_round_follows_class_weights_and_fills_every_slot(tmp_path, taxonomy):
    weights = {"bankruptcy": 3.0, "stock_split": 1.0}
    df = synthesize(taxonomy, taxonomy.slot_values(0), RoundSpec(400, weights), tmp_path,
                    name="r1", seed=0)
    assert len(df) == 400
    counts = df["label"].value_counts()
    assert set(counts.index) == {"bankruptcy", "stock_split"}
    assert 2.0 < counts["bankruptcy"] / counts["stock_split"] < 4.5
    assert not df["text"].str.contains(r"\{[a-z_0-9]+\}").any()  # no unfilled slot
    # each row's draft is one of its class's phrasings, filled in
    for label, pattern, draft in zip(df["label"], df["pattern"], df["draft"]):
        template = taxonomy.by_name(label).templates[int(pattern)]
        fixed = [p for p in SLOT.split(template)[::2] if p.strip()]
        assert all(part in draft for part in fixed)
    assert df["text"].nunique() > 380  # Faker pools and numbers make headlines distinct
    assert (tmp_path / "designer-home").is_dir()  # DATA_DESIGNER_HOME inside the run folder


class _FakeChat(BaseHTTPRequestHandler):
    prompts: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        if isinstance(prompt, list):  # OpenAI content parts
            prompt = "".join(part.get("text", "") for part in prompt)
        type(self).prompts.append(prompt)
        n = len(type(self).prompts)
        reply = {
            "id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f'Headline: "Acme Corp files for bankruptcy {n}"'}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_round_prompts_with_definition_and_fewshot(tmp_path, taxonomy):
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = LLMSettings(endpoint=f"http://127.0.0.1:{server.server_port}/v1",
                          model="nemotron-test", max_parallel_requests=2, timeout_s=10)
        spec = RoundSpec(6, {"bankruptcy": 1.0},
                         fewshot={"bankruptcy": ["Zeta Ltd seeks court protection from creditors"]})
        df = synthesize(taxonomy, taxonomy.slot_values(0), spec, tmp_path, name="llm",
                        seed=0, llm=llm)
    finally:
        server.shutdown()
    assert len(df) == 6
    assert all(t.startswith("Acme Corp files for bankruptcy") for t in df["text"])  # cleaned
    assert len(_FakeChat.prompts) == 6
    p = _FakeChat.prompts[0]
    assert "bankruptcy (insolvency filing)" in p
    assert "Zeta Ltd seeks court protection from creditors" in p
    assert "{{" not in p  # the Jinja prompt was rendered


def test_clean_llm_headline():
    assert clean_llm_headline('  "Acme beats Q2 estimates"\n') == "Acme beats Q2 estimates"
    assert clean_llm_headline("Headline: Acme cuts dividend\nExplanation: ...") == "Acme cuts dividend"
    assert clean_llm_headline("\n\n- **Acme to cut 300 jobs**") == "Acme to cut 300 jobs"
    assert clean_llm_headline(None) == ""
