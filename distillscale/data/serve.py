"""A local OpenAI-compatible server for the recipe's LLM column, started for one data build.

With `data.llm.endpoint: serve` the data stage starts the server itself (by default vLLM's
`vllm serve` on this node, `data.llm.serve_tensor_parallel` GPUs), waits until it answers
`GET /v1/models`, points Data Designer at it, and stops it when the build ends, on error too.
So the same config runs on a GPU node under `launchers/data.sh` and, with an endpoint URL
instead of `serve`, against any server a user already has.

Process supervision is ours (a few lines over `subprocess`; vLLM has no "serve for the
duration of this Python block" API): the server's output goes to `<work>/llm_server.log`; if
the process exits before it is ready, or is not ready within `startup_timeout_s`, the build
stops with the exit code and the log's last lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SERVE = "serve"
# `{model}`, `{port}`, `{tp}` are filled in; the served model name is the config's `model`,
# which is what Data Designer asks for.
VLLM_COMMAND = (
    "vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}",
    "--tensor-parallel-size", "{tp}", "--served-model-name", "{model}",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(base: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(model: str, port: int, tp: int, command: list[str] | None,
                   extra_args: list[str]) -> list[str]:
    template = list(command) if command else list(VLLM_COMMAND)
    filled = [a.format(model=model, port=port, tp=tp) for a in template]
    return filled + list(extra_args)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    # The server runs in its own process group: vLLM's engine and worker processes go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def llm_endpoint(llm, work_dir: Path, *, poll_s: float = 2.0,
                 grace_s: float = 30.0) -> Iterator[str]:
    """The endpoint URL to use for `llm` (a `data.llm` section): its own, or that of a server
    started here for the duration of the block."""
    if llm.endpoint != SERVE:
        yield llm.endpoint
        return
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = server_command(llm.model, port, llm.serve_tensor_parallel, llm.serve_command,
                         llm.serve_args)
    log_path = work_dir / "llm_server.log"
    base = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError as e:
            raise RuntimeError(
                f"data.llm.endpoint=serve: cannot start {cmd[0]!r} ({e.strerror}); install vLLM "
                "(the `gpu` extra / the NGC image) or set data.llm.serve_command") from None
    try:
        deadline = time.monotonic() + llm.startup_timeout_s
        while not _ready(base):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"data.llm.endpoint=serve: the LLM server exited with code {code} before it "
                    f"was ready: {' '.join(cmd)}\nlast lines of {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"data.llm.endpoint=serve: the LLM server did not answer {base}/models within "
                    f"data.llm.startup_timeout_s={llm.startup_timeout_s} s: {' '.join(cmd)}\n"
                    f"last lines of {log_path}:\n{_tail(log_path)}")
            time.sleep(poll_s)
        yield base
    finally:
        _stop(proc, grace_s)
