"""Install the wheels `make gpu-wheels` downloaded into a folder on a machine with no registry.

    python tools/gpu_wheels.py install --wheels build/gpu-wheels --target build/gpu-check-site
    python tools/gpu_wheels.py missing          # the check's imports this Python cannot resolve

Run by the Python that will run the check (its own torch and whatever its image ships). Only the
standard library is used: the machine may lack `packaging`, and even pip (then the wheels are
unpacked directly, which is what pip does for these pure-Python / platlib-only wheels).

Which wheel is installed:
- `PINNED` distributions (the NVIDIA stack and the HF stack Megatron-Bridge converts through)
  whenever the image does not already have that exact version: our code is written against
  these versions (constraints/cpu.txt), and Bridge 0.6.2 reads transformers' internals;
- every other wheel only when the image has no such distribution at all (its own numpy, yaml,
  tqdm ... are kept).
Installed with `--no-deps` into `--target`, which the check puts first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

PINNED = {"megatron-core", "nvidia-modelopt", "megatron-bridge", "transformers", "tokenizers",
          "huggingface-hub", "safetensors"}

# What tools/gpu_check.py imports, directly or through megatron-core, ModelOpt, Megatron-Bridge
# and transformers at import time (measured in a torch-only environment; docs/gpu_path.md).
CHECK_IMPORTS = ("megatron.core", "modelopt.torch.prune", "modelopt.torch.distill",
                 "megatron.bridge", "transformers", "pydantic", "yaml", "rich", "safetensors")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_tags(path: Path) -> tuple[str, str, str, str]:
    """(distribution, version, python tag, abi tag) from a wheel file name."""
    parts = path.name[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path}: not a wheel file name")
    return norm(parts[0]), parts[1], parts[-3], parts[-2]


def fits_this_python(py_tag: str, abi_tag: str) -> bool:
    major, minor = sys.version_info[:2]
    pys = py_tag.split(".")
    if abi_tag == "abi3":  # the stable ABI: built for cp3X, loads on every later CPython 3
        return any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= minor for p in pys)
    v = f"{major}{minor}"
    return (f"cp{v}" in pys or "py3" in pys or f"py{v}" in pys) and abi_tag in ("none", f"cp{v}")


def installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def to_install(wheels: list[Path]) -> list[Path]:
    picked: dict[str, Path] = {}
    for w in sorted(wheels):
        dist, version, py, abi = wheel_tags(w)
        if not fits_this_python(py, abi):
            continue
        have = installed_version(dist)
        if have is None or (dist in PINNED and have.split("+")[0] != version):
            picked[dist] = w
    return list(picked.values())


def unpack(wheel: Path, target: Path) -> None:
    """pip's install of a wheel without scripts: its files at the root, `*.data/purelib|platlib`
    merged into it (other `.data` parts are headers and scripts, not needed to import)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            m = re.match(r"[^/]+\.data/(purelib|platlib)/(.*)", name)
            if m:
                name = m.group(2)
            elif re.match(r"[^/]+\.data/", name):
                continue
            dest = target / name
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))


def install(wheels_dir: Path, target: Path) -> int:
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        print(f"gpu_wheels: no wheels in {wheels_dir} (run `make gpu-wheels` where a registry is "
              "reachable, then carry that folder)", file=sys.stderr)
        return 2
    # What an earlier run installed counts as present (importlib.metadata reads sys.path).
    sys.path.insert(0, str(target))
    todo = to_install(wheels)
    target.mkdir(parents=True, exist_ok=True)
    if not todo:
        print("gpu_wheels: nothing to install (every needed wheel is present)")
        return 0
    names = " ".join(w.name for w in todo)
    if importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
               "--disable-pip-version-check", "--upgrade", "--target", str(target),
               *map(str, todo)]
        res = subprocess.run(cmd, check=False)
        if res.returncode:
            print(f"gpu_wheels: pip failed installing {names}", file=sys.stderr)
            return res.returncode
    else:
        for w in todo:
            unpack(w, target)
    print(f"gpu_wheels: installed into {target}: {names}")
    return 0


def missing() -> list[str]:
    """The check's imports that fail here, each with its error (one process: the imports share
    most of their dependencies, and the TE stub must be in place first, as in the check)."""
    import traceback

    try:
        from distillscale.compat.cpu import activate

        activate()
    except Exception as e:  # noqa: BLE001  (reported, not raised: the point is the list)
        return [f"distillscale.compat.cpu: {type(e).__name__}: {e}"]
    bad = []
    for mod in CHECK_IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            last = traceback.format_exception_only(e)[-1].strip()
            bad.append(f"{mod}: {last}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install")
    i.add_argument("--wheels", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True)
    sub.add_parser("missing")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        print(f"gpu_wheels: python {sys.version.split()[0]} ({sysconfig.get_platform()})")
        return install(args.wheels, args.target)
    bad = missing()
    for line in bad:
        print(f"gpu_wheels: cannot import {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
