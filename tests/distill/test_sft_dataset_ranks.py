"""One SFT dataset for every rank (`bridge.shared_sft_dataset`, docs/gpu_path.md item 5), checked
with two gloo processes and Megatron-Bridge's own SFT dataset code.

Bridge builds the memmap index of each JSONL only on global rank 0 and on each node's local
rank 0, each for the path it was given (`megatron/bridge/data/datasets/utils.py`,
`_TextMemMapDataset.__init__`); every other rank only loads it. Each process here
(`python THIS_FILE --worker`) runs what `distill_bridge` runs before Bridge's `distill()`:
`shared_sft_dataset`, then `config_container`. It then builds the datasets the way Bridge's
`setup` does during `distill()`: the dataset config finalized (`ConfigContainer.validate`), the
tokenizer from `build_tokenizer(cfg.tokenizer)`, the provider from `get_dataset_provider` bound
with `_bind_dataset_provider_context`, and `build_train_valid_test_datasets` (`data/loaders.py`).
No library line is stubbed: this path does not touch CUDA.

The control gives each rank its own dataset root, which every rank wrote before the fix. Rank 1
(local rank 1) then fails to load with Bridge's "Memory Map ... is not found".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from gloo_ranks import run_ranks

QUICKSTART = ROOT / "conf" / "experiments" / "quickstart.yaml"
WORDS = ["alpha", "beta", "gamma", "delta"]
ROWS = [{"id": i, "text": " ".join(WORDS[i % 4:] + WORDS[:i % 4]), "label": ("up", "down")[i % 2]}
        for i in range(5)]
VAL_ROWS = ROWS[:2]


def _worker(work: Path, teacher: Path, student: Path) -> None:
    """Both cases in one world (Bridge's imports take a minute on two shared cores): the shared
    dataset first, then the control, after which rank 1 leaves the group."""
    from datetime import timedelta

    import torch

    from distillscale.config import load_config
    from distillscale.distill import bridge

    bridge._bridge_imports()  # the CPU stack's import-only TE stub, before Bridge is imported
    from megatron.bridge.data.loaders import build_train_valid_test_datasets
    from megatron.bridge.data.utils import get_dataset_provider
    from megatron.bridge.training.setup import _bind_dataset_provider_context
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = load_config(QUICKSTART, ["distill.seq_length=32", "distill.supervision=label"])
    chat = None  # a word-level teacher without a chat template: the tiny family's format
    for mode in ("shared", "separate"):
        if mode == "shared":  # distill_bridge: rank 0 writes, every rank reads that folder
            root = bridge.shared_sft_dataset(ROWS, VAL_ROWS, work / mode / "sft", "label", rank,
                                             chat, timeout_s=120)
        else:  # before the fix: every rank wrote a dataset root of its own
            root = bridge.write_sft_jsonl(ROWS, VAL_ROWS, work / mode / f"rank{rank}" / "sft",
                                          "label", chat)
        container = bridge.config_container(cfg, student, teacher, work / mode, world,
                                            dataset_root=root)

        if not torch.distributed.is_initialized():
            # Bridge's setup initialises the group before it builds data; a short timeout so
            # that a rank left in Bridge's barriers by a failed peer cannot hang the test.
            torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
        container.dataset.finalize()  # what ConfigContainer.validate does for the dataset
        provider = _bind_dataset_provider_context(get_dataset_provider(container.dataset),
                                                  tokenizer=build_tokenizer(container.tokenizer),
                                                  pg_collection=None)
        try:
            train, valid, _ = build_train_valid_test_datasets(container, provider)
            got = {"root": str(root), "train": len(train), "valid": len(valid),
                   "ids": [int(t) for t in train[0]["input_ids"]],
                   "valid_ids": [int(t) for t in valid[0]["input_ids"]]}
        except Exception as e:  # noqa: BLE001 - the control records what Bridge raised
            got = {"root": str(root), "error": f"{type(e).__name__}: {e}"}
        (work / mode / f"result{rank}.json").write_text(json.dumps(got))
        if "error" in got:
            os._exit(0)  # leave without the group's teardown collectives; the error is recorded
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillscale.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([" ".join(WORDS) + " headline : event :"], ["up", "down"])
    root = tmp_path_factory.mktemp("hf")
    folders = []
    for name, layers in (("teacher", 2), ("student", 1)):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders.append(root / name)
    assert len(tok) <= 32
    return folders


@pytest.fixture(scope="module")
def runs(hf_pair, tmp_path_factory) -> tuple[Path, dict]:
    """Rank 0's and rank 1's results for each case, from one two-process world."""
    work = tmp_path_factory.mktemp("ranks")
    run_ranks([sys.executable, __file__, "--worker", str(work), *map(str, hf_pair)], world=2,
              timeout=600)

    def result(mode: str, rank: int) -> dict:
        f = work / mode / f"result{rank}.json"
        return json.loads(f.read_text()) if f.is_file() else {"error": f"no {f.name}"}

    return work, {mode: [result(mode, r) for r in range(2)] for mode in ("shared", "separate")}


@pytest.mark.slow
def test_two_ranks_load_the_dataset_rank0_writes(runs, hf_pair):
    from transformers import AutoTokenizer

    work, got = runs
    r0, r1 = got["shared"]
    sft = work / "shared" / "sft"
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["root"] == r1["root"] == str(sft)
    assert r0["train"] == r1["train"] == len(ROWS)
    assert r0["valid"] == r1["valid"] == len(VAL_ROWS)
    assert r0["ids"] == r1["ids"] and r0["valid_ids"] == r1["valid_ids"]
    # Sample 0 is the first row written, as Bridge tokenizes it: "{input} {output}" + EOS.
    first = json.loads((sft / "training.jsonl").read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(str(hf_pair[0]))
    want = tok(f"{first['input']} {first['output']}", add_special_tokens=False)["input_ids"]
    assert r0["ids"] == want + [tok.eos_token_id]
    assert tok.decode(r0["ids"]).split() == ["<bos>", "headline", ":", *ROWS[0]["text"].split(),
                                             "event", ":", ROWS[0]["label"], "<eos>"]
    assert (sft / "training.jsonl.idx.npy").is_file()  # built by rank 0 beside the data


@pytest.mark.slow
def test_separate_roots_fail_on_rank1_as_bridge_raises(runs):
    work, got = runs
    r0, r1 = got["separate"]
    own = work / "separate" / "rank1" / "sft" / "training.jsonl"
    assert r1["root"] == str(own.parent)
    assert r1["error"] == (f"ValueError: Memory Map for {own} is not found, missing one or more "
                           f"of files: {own}.idx.{{.npy,.info}}")
    # Rank 0 indexed its own copy (then lost its peer in Bridge's next barrier); nobody indexed
    # rank 1's.
    assert (work / "separate" / "rank0" / "sft" / "training.jsonl.idx.npy").is_file()
    assert not Path(f"{own}.idx.npy").exists()
    assert "Memory Map" not in r0.get("error", ""), r0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*map(Path, sys.argv[2:5]))
