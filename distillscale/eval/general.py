"""General knowledge (MMLU, MMLU-Pro, the synthetic knowledge probe) and the in-domain task
through lm-eval 0.4.

Models are evaluated from their HF exports (`<stage>/hf/`, tokenizer included) with lm-eval's
`hf` backend on CPU or `vllm` on GPU, on local benchmark copies read by the shipped task folder
(`lm_eval_tasks/`). A CI comes from lm-eval's standard error of the mean (normal approximation).

One engine per process, nothing else resident: with vLLM each export is scored in a fresh
child process (`python -m distillscale.eval.general`, results back as JSON), so the engine
that takes 0.8 of the GPU memory never shares a process with Megatron models or an earlier
engine; the `hf` backend on CPU runs in process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from distillscale.config import GeneralEvalConfig
from distillscale.eval.lm_eval_tasks import TASKS_DIR
from distillscale.knowledge.general import is_knowledge_probe

Z95 = 1.959964
# results-table metric -> (letter-format task, cloze task, metadata key = eval.general key).
# `probe` is the synthetic quiz the teacher stage writes; `mmlu` is real MMLU only.
BENCHMARKS = {
    "mmlu": ("distillscale_mmlu", "distillscale_mmlu_cloze", "mmlu_path"),
    "mmlu_pro": ("distillscale_mmlu_pro", "distillscale_mmlu_pro_cloze", "mmlu_pro_path"),
    "probe": ("distillscale_probe", "distillscale_probe_cloze", "probe_path"),
}
# The eval.general keys that name a benchmark copy.
PATH_KEYS = tuple(key for *_, key in BENCHMARKS.values())


def task_manager(metadata: dict):
    # optional: lm-eval (the `eval` extra), only when the general benchmarks run
    from lm_eval.tasks import TaskManager

    # Our tasks are self-contained YAMLs (no `include:` of lm-eval's own): indexing lm-eval's
    # thousands of built-in task files as well cost 12-15 s per evaluated model on 2 cores.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def model_spec(model_dir: Path, backend: str, batch_size: int, tensor_parallel: int = 1,
               max_model_len: int | None = None) -> tuple[str, dict]:
    """lm-eval model name and args for an HF export folder. For vLLM, `tensor_parallel` is
    `launch.vllm_tensor_parallel` and `max_model_len` bounds the KV cache to what is scored
    (lm-eval 0.4.13's vLLM wrapper passes neither unless given); the engine must be the only
    model on its GPUs (it takes 0.8 of their memory)."""
    path = Path(model_dir)
    if backend == "hf":
        return "hf", {"pretrained": str(path), "dtype": "float32", "batch_size": batch_size,
                      "device": "cpu" if not _cuda() else "cuda"}
    if backend == "vllm":
        args = {"pretrained": str(path), "dtype": "auto", "gpu_memory_utilization": 0.8,
                "tensor_parallel_size": int(tensor_parallel)}
        if max_model_len is not None:
            args["max_model_len"] = int(max_model_len)
        return "vllm", args
    raise ValueError(f"eval.general.backend: unknown backend {backend!r} (hf or vllm)")


def _cuda() -> bool:
    # heavy: torch, only on the path that needs it; the rest of this module stays light
    import torch

    return torch.cuda.is_available()


def evaluate(
    model, tasks: dict[str, str], metadata: dict, num_fewshot: int = 0,
    limit: int | None = None, model_args: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on `tasks` (results-table metric -> task name).

    `model` is an lm-eval model name (`hf`, `vllm`) with `model_args`, or an `LM` instance.
    Returns metric -> {value, ci_low, ci_high, n}.
    """
    # optional: lm-eval (the `eval` extra), only when the general benchmarks run
    import lm_eval

    if isinstance(model, str):
        # Registers the built-in backends (hf, vllm, ...): lm-eval 0.4.13 fills its model
        # registry lazily, and a model registered by name beforehand (a custom LM) otherwise
        # leaves "hf" unknown.
        import lm_eval.models

    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks.values()),
        num_fewshot=num_fewshot, limit=limit, task_manager=task_manager(metadata),
        # `acc` stderr is closed-form (no resampling cost); keep it with `limit` too so every
        # score carries a CI.
        log_samples=False, bootstrap_iters=1000,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    res: dict[str, dict[str, float]] = {}
    for metric, task in tasks.items():
        r = out["results"][task]
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        for key, name in (("acc", metric), ("macro_f1", f"{metric}_macro_f1")):
            if f"{key},none" not in r:
                continue
            v = float(r[f"{key},none"])
            se = r.get(f"{key}_stderr,none")
            se = float(se) if isinstance(se, (int, float)) else float("nan")
            lo, hi = (v, v) if math.isnan(se) else (max(0.0, v - Z95 * se), min(1.0, v + Z95 * se))
            res[name] = {"value": v, "ci_low": lo, "ci_high": hi, "n": n}
    return res


def general_tasks(paths: dict[str, str | None], cloze: bool) -> tuple[dict, dict, list[str]]:
    """(metric -> task, metadata, notes for what is skipped) for `paths`: eval.general key
    (`mmlu_path`, `mmlu_pro_path`, `probe_path`) -> local copy; a key left out is unset."""
    unknown = sorted(set(paths) - set(PATH_KEYS))
    if unknown:
        raise ValueError(f"eval.general: unknown benchmark key(s) {unknown}; known: {list(PATH_KEYS)}")
    tasks, meta, notes = {}, {}, []
    for metric, (letter, cloze_task, key) in BENCHMARKS.items():
        path = paths.get(key)
        if not path:
            notes.append(f"{metric}: skipped (eval.general.{key} is not set)")
            continue
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"eval.general.{key}: {p} does not exist")
        # Scored as MMLU, the synthetic quiz would be reported, fitted and plotted as MMLU.
        if key != "probe_path" and is_knowledge_probe(p):
            raise ValueError(f"eval.general.{key}: {p} is the synthetic knowledge probe, not "
                             f"{'MMLU' if metric == 'mmlu' else 'MMLU-Pro'}: set "
                             "eval.general.probe_path to it instead")
        tasks[metric] = cloze_task if cloze else letter
        meta[key] = str(p)
    return tasks, meta, notes


def benchmark_paths(general_cfg, run_dir: str | Path | None = None) -> dict[str, str]:
    """The benchmark copies `general_cfg` (`eval.general`) sets, `{run_dir}` filled in."""
    out = {}
    for key in PATH_KEYS:
        value = getattr(general_cfg, key)
        if value:
            out[key] = value.replace("{run_dir}", str(run_dir)) if run_dir is not None else value
    return out


def evaluate_hf_export(hf_dir: Path, general_cfg, scratch_tokenizer: bool,
                       tensor_parallel: int = 1, max_model_len: int | None = None,
                       own_process: bool | None = None) -> tuple[dict, list[str]]:
    """MMLU / MMLU-Pro / the knowledge probe of one model's HF export per `eval.general`
    (paths with `{run_dir}` filled in): (metric -> CI, notes).

    Models with a from-scratch word-level tokenizer get the cloze prompt and an explicit
    `<bos>` (their training format) unless `eval.general.prompt` says otherwise.
    `tensor_parallel` / `max_model_len`: the vLLM engine's (`launch.vllm_tensor_parallel`).
    `own_process`: lm-eval runs in a fresh child process (None: when the backend is vLLM).
    """
    cloze = general_cfg.prompt == "cloze" or (general_cfg.prompt == "auto" and scratch_tokenizer)
    tasks, meta, notes = general_tasks(benchmark_paths(general_cfg), cloze)
    if not tasks:
        return {}, notes
    if not (Path(hf_dir) / "config.json").is_file():
        return {}, notes + [f"{hf_dir}: no HF export; general knowledge not evaluated"]
    if own_process is None:
        own_process = general_cfg.backend == "vllm"
    if own_process:
        return _in_child_process(hf_dir, general_cfg, scratch_tokenizer, tensor_parallel,
                                 max_model_len), notes
    meta["prompt_prefix"] = "<bos> " if scratch_tokenizer else ""
    name, args = model_spec(hf_dir, general_cfg.backend, general_cfg.batch_size,
                            tensor_parallel, max_model_len)
    res = evaluate(name, tasks, meta, general_cfg.num_fewshot, general_cfg.limit, args)
    return res, notes


# Rank variables a launcher sets: a child that inherits them would take itself for a rank of
# the job (vLLM and torch.distributed both read them).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _in_child_process(hf_dir: Path, general_cfg, scratch_tokenizer: bool, tensor_parallel: int,
                      max_model_len: int | None) -> dict:
    """`evaluate_hf_export` in a fresh Python process (see the module docstring); its results.
    A failure raises one line naming the model folder and the child's error."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    with socket.socket() as s:  # its own rendezvous port, not the job's
        s.bind(("127.0.0.1", 0))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    model = Path(hf_dir).parent
    with tempfile.TemporaryDirectory(prefix="general_eval_") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({
            "hf_dir": str(hf_dir), "general": general_cfg.model_dump(mode="json"),
            "scratch_tokenizer": scratch_tokenizer, "tensor_parallel": tensor_parallel,
            "max_model_len": max_model_len}))
        # Its output streams to this process's log; the result comes back through the file.
        rc = subprocess.run([sys.executable, "-m", __name__, str(request), str(answer)],
                            env=env, check=False).returncode
        out = json.loads(answer.read_text()) if answer.is_file() else {}
    if rc or "results" not in out:
        why = out.get("error") or "no error reported; see the log above"
        raise RuntimeError(f"{model}: general evaluation ({general_cfg.backend}) failed in its "
                           f"own process (exit {rc}): {why}")
    return out["results"]


def _child_main(request: Path, answer: Path) -> int:
    """The child process of `_in_child_process`: reads the request, writes
    {"results": ...} or {"error": "<one line>"} to `answer`."""
    req = json.loads(Path(request).read_text())
    try:
        res, _ = evaluate_hf_export(
            Path(req["hf_dir"]), GeneralEvalConfig.model_validate(req["general"]),
            req["scratch_tokenizer"], req["tensor_parallel"], req["max_model_len"],
            own_process=False)
        out, rc = {"results": res}, 0
    except Exception as e:  # noqa: BLE001 - any error reaches the parent as one line
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out, rc = {"error": f"{type(e).__name__}: {first}"}, 1
    Path(answer).write_text(json.dumps(out))
    return rc


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1]), Path(sys.argv[2])))
