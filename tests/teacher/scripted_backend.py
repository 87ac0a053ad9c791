"""A deterministic stand-in engine for the generation driver's resume and retry tests: it
answers with the class named in the headline after a fixed trace, optionally slowly, and can
be told to answer garbage first or time out. Runnable as a script (the kill test's child)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from distillscale.teacher.backends import Completion


class ScriptedTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
        return f"{messages[-1]['content']} ||{kw.get('thinking', 'none')}||"

    def encode(self, text, add_special_tokens=False):
        return text.split()


class ScriptedBackend:
    vocab_size = 100

    def __init__(self, delay_s: float = 0.0, garbage_first: int = 0, timeouts: int = 0,
                 log: Path | None = None):
        self.tokenizer = ScriptedTokenizer()
        self.delay_s, self.garbage_left, self.timeouts_left = delay_s, garbage_first, timeouts
        self.log = log
        self.calls = 0

    def complete(self, prompts, max_tokens, stop=None, temperature=0.0, seed=0):
        self.calls += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps([p.split()[0] for p in prompts]) + "\n")
        if self.timeouts_left:
            self.timeouts_left -= 1
            raise TimeoutError("engine did not answer in time")
        time.sleep(self.delay_s)
        out = []
        for p in prompts:
            head = p.split("||")[0]
            if stop:  # trace phase
                out.append(Completion(f"because {head.split()[-1]} .", 3, "stop"))
            elif self.garbage_left and temperature == 0.0:
                self.garbage_left -= 1
                out.append(Completion("i do not know", 4, "stop"))
            else:
                out.append(Completion(head.split()[-1], 1, "stop"))
        return out


if __name__ == "__main__":
    from distillscale.domain import load_taxonomy
    from distillscale.teacher.adapters import load_adapter
    from distillscale.teacher.generate import GenerationSettings, generate_supervision

    root, work, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    tax = load_taxonomy(root / "conf/domains/finance.yaml")
    rows = [{"id": f"r{i}", "text": f"h{i} {tax.labels[i % 5]}", "label": tax.labels[i % 5]}
            for i in range(n)]
    generate_supervision(ScriptedBackend(delay_s=0.3, log=work / "calls.log"),
                         load_adapter(root / "conf/teachers/tiny.yaml"), tax, rows, work,
                         GenerationSettings(depths=["label", "cot_short"], shard_size=4), "test")
