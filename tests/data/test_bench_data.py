"""The data benchmark's memory sampler: summed PSS over the process tree."""

import importlib.util
import multiprocessing as mp
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "tools/bench_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hold(n_bytes: int, ready, done) -> None:
    block = bytearray(n_bytes)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page: resident, private
    ready.set()
    done.wait(30)


def test_peak_pss_counts_children_and_not_shared_pages_twice():
    bench = _bench()
    base_pss, base_rss = bench.PeakPss.sample()
    assert 0 < base_pss <= base_rss
    ctx = mp.get_context("fork")  # a forked child shares the parent's pages (copy on write)
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(300 * 2**20, ready, done))
    with bench.PeakPss(every_s=0.05) as sampler:
        child.start()
        assert ready.wait(30)
        time.sleep(0.3)
        done.set()
        child.join(30)
    grew = sampler.peak - base_pss
    # The child's 300 MiB of private pages are seen (sampled from the child, not the parent).
    assert 250 * 2**20 < grew < 600 * 2**20, grew
    # Pages the fork shares with the parent are split between them by PSS, counted twice by
    # summed RSS.
    assert sampler.peak_rss_sum - sampler.peak > 0.3 * base_rss
