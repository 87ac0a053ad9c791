"""Teacher families: how each one is asked to think at a given depth, as data (conf/teachers/).

A family adapter says how to render a request with the family's own chat template and how deep
to think, per supervision depth: the chat-template keyword arguments (Qwen3 `enable_thinking`,
gpt-oss `reasoning_effort`, the tiny teacher's `thinking`), an optional system prompt (Nemotron's
`/think` / `/no_think` switch), and a thinking-token budget. Budgets are enforced the same way
for every family: generation of the trace stops at `max_trace_tokens`; if the model has not
closed its trace by then, `budget_cut_text` (which closes it) is appended and the answer is
generated after it — the "thinking budget" recipe Qwen3 documents. Adding a family is one YAML
file; no code branches on the model name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from distillscale.config import ConfigError, load_yaml_model


class DepthSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Passed to `tokenizer.apply_chat_template(..., **chat_template_kwargs)`.
    chat_template_kwargs: dict[str, Any] = {}
    # Overrides the family's system prompt for this depth (e.g. Nemotron "/think").
    system_prompt: str | None = None
    # 0: no thinking phase, the answer is generated right after the prompt.
    max_trace_tokens: Annotated[int, Field(ge=0)] = 0


class FamilyAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: str
    # `{task}` and `{classes}` are filled from the taxonomy; None: no system message.
    system_prompt: str | None = None
    # The user message; `{text}` is the headline, `{task}` and `{classes}` come from the
    # taxonomy (for families whose system prompt is a switch, e.g. Nemotron's /think).
    user_template: str = "{text}"
    depths: dict[str, DepthSetting]
    # Markers of the reasoning trace in the generated text (stripped from the stored trace).
    trace_start: str | None = None
    trace_end: str | None = None
    # Appended when the budget runs out before `trace_end`: must close the trace.
    budget_cut_text: str = ""
    max_answer_tokens: Annotated[int, Field(gt=0)] = 16
    # Text the answer may start with (e.g. the tiny family's "event :"), removed before parsing.
    answer_prefix: str | None = None

    def messages(self, text: str, depth: str, task: str, classes: list[str]) -> list[dict]:
        setting = self.depth(depth)
        system = setting.system_prompt if setting.system_prompt is not None else self.system_prompt
        msgs = []
        if system:
            msgs.append({"role": "system",
                         "content": system.format(task=task, classes=", ".join(classes))})
        msgs.append({"role": "user", "content": self.user_template.format(
            text=text, task=task, classes=", ".join(classes))})
        return msgs

    def render(self, tokenizer, text: str, depth: str, task: str, classes: list[str]) -> str:
        """The prompt string for one headline at one depth, by the family's chat template."""
        return tokenizer.apply_chat_template(
            self.messages(text, depth, task, classes), tokenize=False,
            add_generation_prompt=True, **self.depth(depth).chat_template_kwargs,
        )

    def depth(self, depth: str) -> DepthSetting:
        if depth not in self.depths:
            raise ConfigError(f"teacher family {self.family!r}: no depth {depth!r} "
                              f"(has {sorted(self.depths)})")
        return self.depths[depth]


def load_adapter(path: str | Path) -> FamilyAdapter:
    return load_yaml_model(path, FamilyAdapter, "teacher family")
