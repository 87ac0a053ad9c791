"""Distillation from the teacher stage's top-k logit cache (`distill.teacher_logits=cache`).

A tiny Megatron teacher is exported to HF; the real HF backend fills real sharded caches
(`build_cache`) over the rows' KD positions; the student then trains from the cache with no
teacher in memory, and its loss is compared with the online (ModelOpt) loss on the same data.
"""

import numpy as np
import pytest
import torch

from distillscale.config import DistillConfig, LossConfig, ModelArch, TrainConfig
from distillscale.distill import losses as L
from distillscale.distill.logit_kd import (
    CachedTeacher,
    LogitCacheMissingError,
    distill,
    find_logit_cache,
)
from distillscale.models.megatron_gpt import build_gpt, forward_logits
from distillscale.teacher.logit_cache import LogitCache, build_cache, kd_sequences
from distillscale.teacher.supervision import supervision_batch
from distillscale.tokenizer import EncodedBatch, build_word_tokenizer

VOCAB = 64
SEQ = 16
ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, seq_length=SEQ)
SMALL = ARCH.model_copy(update={"num_layers": 1, "ffn_hidden_size": 32})
ANSWER, TRACE = 12, 6  # position 12 predicts the answer; positions 6..11 the trace


def word_tokenizer(n_words: int = VOCAB - 10, prefix: str = "w"):
    """A real word-level tokenizer with exactly VOCAB ids (4 specials, 3 thinking tokens and
    the prompt words `headline`, `:`, `event`)."""
    return build_word_tokenizer([" ".join(f"{prefix}{i}" for i in range(n_words))], [])


class Encoder:
    """The `encode(rows, depth)` surface `supervision_batch` reads: fixed random sequences per
    row id, a trace of TRACE tokens and one answer token."""

    def encode(self, rows, depth=None):
        ids = torch.tensor([int(r["id"].split("-")[1]) for r in rows])
        g = torch.Generator().manual_seed(3)
        table = torch.randint(7, VOCAB, (256, SEQ + 1), generator=g)
        seq = table[ids]
        n = len(rows)
        loss_mask = torch.zeros(n, SEQ)
        loss_mask[:, : ANSWER + 1] = 1.0
        answer_mask = torch.zeros(n, SEQ)
        answer_mask[:, ANSWER] = 1.0
        pos = torch.full((n,), ANSWER, dtype=torch.long)
        return EncodedBatch(seq[:, :SEQ], seq[:, 1:], loss_mask, answer_mask, pos,
                            torch.zeros(n, dtype=torch.long),
                            trace_len=torch.full((n,), TRACE, dtype=torch.long))


ROWS = [{"id": f"r-{i}"} for i in range(48)]
# The quantized encoding (6-bit log-probabilities), at full k
# (only the quantization's error) and at a small k with tail draws.
BITS = 6
QUANTIZED = (("full_q", VOCAB, 0, "quantized"), ("top8_tail4_q", 8, 4, "quantized"))


@pytest.fixture(scope="module")
def setup(megatron, tmp_path_factory):
    from distillscale.models.hf_io import save_hf
    from distillscale.teacher.backends.hf import HFBackend

    tmp = tmp_path_factory.mktemp("cache_kd")
    torch.manual_seed(0)
    teacher = build_gpt(ARCH, VOCAB)
    with torch.no_grad():  # a peaked, non-trivial teacher distribution
        teacher.output_layer.weight.mul_(8)
    tok = word_tokenizer()
    assert len(tok) == VOCAB
    save_hf(teacher, ARCH, VOCAB, tmp / "teacher_hf", tokenizer=tok)
    backend = HFBackend(str(tmp / "teacher_hf"), batch_size=16)
    sup = supervision_batch(Encoder(), ROWS, "blended_cot")
    seqs, spans = kd_sequences(sup)
    caches = {}
    for name, k, m, enc in (("full", VOCAB, 0, "fp16"), ("top8", 8, 0, "fp16"),
                            ("top8_tail16", 8, 16, "fp16"), *QUANTIZED):
        cache = LogitCache(tmp / "cache", name)
        build_cache(backend, seqs, spans, [r["id"] for r in ROWS], k, cache, shard_size=20,
                    meta={"format": "blended_cot"}, tail_samples=m, seed=0, encoding=enc,
                    logprob_bits=BITS)
        caches[name] = cache
    torch.manual_seed(1)
    student = build_gpt(SMALL, VOCAB)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in student.state_dict().items()}
    return teacher, state, caches, tmp


def _student(state):
    s = build_gpt(SMALL, VOCAB)
    s.load_state_dict(state)
    return s


def _cfg(steps=4, **loss):
    return DistillConfig(
        supervision="blended_cot", loss=LossConfig(**loss),
        train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=1, log_every=1,
                          eval_every=100, checkpoint_every=100))


def _full_kl(teacher, student, t):
    """Reference: per-sequence mean over the trace of KL_T on full logits, x T^2."""
    sup = supervision_batch(Encoder(), ROWS, "blended_cot")
    with torch.no_grad():
        lt = forward_logits(teacher, sup.tokens).double() / t
        ls = forward_logits(student, sup.tokens).double() / t
    per = (lt.softmax(-1) * (lt.log_softmax(-1) - ls.log_softmax(-1))).sum(-1)
    return float(L.per_sequence_mean(per, sup.trace_mask)) * t * t, per, sup


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_full_k_cache_trains_like_the_online_teacher(setup, tmp_path, t):
    """k = vocabulary: the cache loses only fp16 rounding, so the whole run (KL, CE anchor,
    T^2, alpha, masks) must follow the online ModelOpt run step by step."""
    teacher, state, caches, _ = setup
    cfg = _cfg(temperature=t, alpha=0.7)
    _, online = distill(_student(state), teacher, Encoder(), ROWS, cfg, 0, tmp_path / "a.pt",
                        "online")
    cached = CachedTeacher(caches["full"], ROWS, "blended_cot")
    plain, offline = distill(_student(state), None, Encoder(), ROWS, cfg, 0, tmp_path / "b.pt",
                             "cache", cached=cached)
    assert len(online) == len(offline) == 4
    for a, b in zip(online, offline):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4)  # measured: 8e-6
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert offline[-1]["kl"] < offline[0]["kl"]  # it trains
    assert not any("teacher" in k for k in plain.state_dict())


def test_topk_caches_first_step_within_the_measured_cache_error(setup, tmp_path):
    """k=8 of 64: the merged tail is a lower bound of the full KL, the sampled tail an
    unbiased estimate; each first-step KL matches the online KL within that cache's error,
    measured here on the same rows against full teacher logits."""
    teacher, state, caches, _ = setup
    cfg = _cfg(steps=1)
    ref, _per_full, sup = _full_kl(teacher, _student(state), 1.0)
    _, online = distill(_student(state), teacher, Encoder(), ROWS,
                        cfg.model_copy(update={"train": cfg.train.model_copy(
                            update={"batch_size": len(ROWS)})}), 0, tmp_path / "o.pt", "online")
    assert online[0]["kl"] == pytest.approx(ref, rel=1e-4)
    errors = {}
    for name in ("top8", "top8_tail16"):
        cached = CachedTeacher(caches[name], ROWS, "blended_cot")
        with torch.no_grad():
            logits = forward_logits(_student(state), sup.tokens)
        measured = float(cached.kl(logits, np.arange(len(ROWS)), 1.0, sup.trace_mask))
        errors[name] = abs(measured - ref) / ref
        big = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"batch_size": len(ROWS)})})
        _, hist = distill(_student(state), None, Encoder(), ROWS, big, 0,
                          tmp_path / f"{name}.pt", name, cached=cached)
        assert hist[0]["kl"] == pytest.approx(measured, rel=1e-5)
        assert abs(hist[0]["kl"] - online[0]["kl"]) <= errors[name] * ref * 1.01 + 1e-6
    # The merged tail is a lower bound; the draws recover most of what it misses.
    assert errors["top8"] > 0.01
    assert errors["top8_tail16"] < 0.5 * errors["top8"]


def test_quantized_cache_trains_like_the_online_teacher(setup, tmp_path):
    """The quantized encoding: at full k its first-step KL is the online KL within the
    measured quantization error (< 1%), and the whole run (KL, CE, loss) follows the online
    run within it; at k=8 with 4 tail draws the first step is within that cache's own measured
    error of the full-logit KL."""
    teacher, state, caches, _ = setup
    cfg = _cfg(temperature=1.0, alpha=0.7)
    ref, _, sup = _full_kl(teacher, _student(state), 1.0)
    with torch.no_grad():
        logits = forward_logits(_student(state), sup.tokens)
    errors = {}
    for name in ("full_q", "top8_tail4_q"):
        cached = CachedTeacher(caches[name], ROWS, "blended_cot")
        measured = float(cached.kl(logits, np.arange(len(ROWS)), 1.0, sup.trace_mask))
        errors[name] = abs(measured - ref) / ref
    assert errors["full_q"] < 0.01
    _, online = distill(_student(state), teacher, Encoder(), ROWS, cfg, 0, tmp_path / "a.pt",
                        "online")
    _, offline = distill(_student(state), None, Encoder(), ROWS, cfg, 0, tmp_path / "b.pt",
                         "cache", cached=CachedTeacher(caches["full_q"], ROWS, "blended_cot"))
    for a, b in zip(online, offline, strict=True):
        assert b["kl"] == pytest.approx(a["kl"], rel=2 * errors["full_q"] + 1e-4)
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=2 * errors["full_q"] + 1e-4)
    assert offline[-1]["kl"] < offline[0]["kl"]
    big = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": len(ROWS)}),
                                 "loss": cfg.loss.model_copy(update={"alpha": 1.0})})
    _, hist = distill(_student(state), None, Encoder(), ROWS, big, 0, tmp_path / "c.pt", "q8",
                      cached=CachedTeacher(caches["top8_tail4_q"], ROWS, "blended_cot"))
    assert abs(hist[0]["kl"] - ref) <= errors["top8_tail4_q"] * ref * 1.01 + 1e-6
    # Smaller than the fp16 encoding of the same k and draws would be.
    assert caches["top8_tail4_q"].index()["bytes_per_token"] < \
        caches["top8_tail16"].index()["bytes_per_token"] * 0.5


def test_old_caches_read_and_unknown_encodings_say_rebuild(setup, tmp_path):
    """A shard written before encodings were recorded reads as fp16; an encoding this
    version does not know stops with a one-line error that says to rebuild."""
    import shutil

    from safetensors.numpy import save_file

    _, _, caches, _ = setup
    src = caches["top8"]
    want = src.load()
    for meta_update, name in (({}, "old"), ({"encoding": "entropy9"}, "future")):
        dst = LogitCache(tmp_path, name)
        shutil.copytree(src.path, dst.path)
        for shard in sorted(dst.path.glob("shard-*.safetensors")):
            t, meta = LogitCache._read_shard(shard)
            meta.pop("encoding")
            save_file(t, str(shard), metadata={**meta, **meta_update})
        if name == "old":
            got = dst.load()
            assert got.keys() == want.keys()
            for rid in want:
                assert np.array_equal(got[rid].ids, want[rid].ids)
                assert np.array_equal(got[rid].logprobs, want[rid].logprobs)
        else:
            with pytest.raises(ValueError, match=r"encoding 'entropy9' .*delete .* rebuild it"):
                dst.load()


def test_cached_topk_kl_reduces_to_topk_kl_at_t1_and_handles_padding_ids():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g)
    lt = zt.log_softmax(-1)
    top = lt.topk(6, -1)
    tail = torch.from_numpy(np.log(np.clip(1 - top.values.exp().sum(-1).double().numpy(),
                                           1e-30, 1)).astype(np.float32))
    got = L.cached_topk_kl(zs, top.indices, top.values, tail)
    torch.testing.assert_close(got, L.topk_kl(zs, top.indices, top.values), rtol=1e-5, atol=1e-6)
    # Temperature: with k = V the conversion is exact (teacher softmax(z / T)).
    full = lt.topk(40, -1)
    for t in (0.5, 2.0):
        got = L.cached_topk_kl(zs, full.indices, full.values, torch.full((5,), -80.0), t)
        torch.testing.assert_close(got, L.token_divergence(zs, zt, "forward_kl", t),
                                   rtol=1e-4, atol=1e-6)
    # Ids past the student's (real) vocabulary get no mass: equal to the teacher renormalised
    # on the real range, computed on full logits.
    real = 30
    got = L.cached_topk_kl(zs[:, :real], full.indices, full.values, torch.full((5,), -80.0))
    torch.testing.assert_close(got, L.token_divergence(zs[:, :real], zt[:, :real]),
                               rtol=1e-4, atol=1e-6)


def test_lora_kd_from_the_cache_matches_online(setup, tmp_path):
    """`lora_kd` (peft on the HF export) from the full-k cache follows the online HF teacher."""
    from transformers import AutoModelForCausalLM

    from distillscale.distill.lora_kd import distill_lora_hf
    from distillscale.models.hf_io import save_hf

    _, state, caches, tmp = setup
    save_hf(_student(state), SMALL, VOCAB, tmp_path / "student_hf")

    def hf(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    cfg = _cfg(steps=3, alpha=0.8, temperature=2.0)
    cfg = cfg.model_copy(update={"lora_rank": 4})
    torch.manual_seed(0)  # the LoRA A matrices are drawn at random
    _, online = distill_lora_hf(hf(tmp_path / "student_hf"), hf(tmp / "teacher_hf"), Encoder(),
                                ROWS, cfg, 0, tmp_path / "a.pt", "online")
    cached = CachedTeacher(caches["full"], ROWS, "blended_cot")
    torch.manual_seed(0)
    _, offline = distill_lora_hf(hf(tmp_path / "student_hf"), None, Encoder(), ROWS, cfg, 0,
                                 tmp_path / "b.pt", "cache", cached=cached)
    for a, b in zip(online, offline, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4)


# ------------------------------------------------------------------------- missing caches


def _manifest(caches):
    return {"metrics": {"caches": caches}}


def test_missing_format_names_the_format_and_the_fix(setup):
    _, _, _caches, tmp = setup
    with pytest.raises(LogitCacheMissingError,
                       match=r"no logit cache for format 'cot_long' \(cached formats: "
                             r"\['label'\)?.*teacher\.supervision\.cache\.formats including "
                             r"cot_long"):
        find_logit_cache(_manifest({"label": {"key": "full"}}), tmp / "cache", "cot_long")
    with pytest.raises(LogitCacheMissingError, match="including label"):
        find_logit_cache(None, tmp / "cache", "label")


def test_incomplete_cache_and_foreign_teacher_are_errors(setup):
    _, _, caches, tmp = setup
    with pytest.raises(LogitCacheMissingError, match=r"key gone\) is missing or incomplete"):
        find_logit_cache(_manifest({"blended_cot": {"key": "gone"}}), tmp / "cache",
                         "blended_cot")
    idx = caches["full"].index()
    assert find_logit_cache(_manifest({"blended_cot": {"key": "full"}}), tmp / "cache",
                            "blended_cot", idx.get("teacher")).path == caches["full"].path


def test_rows_outside_the_cache_are_named(setup, tmp_path):
    _, state, caches, _ = setup
    rows = ROWS + [{"id": "r-200"}, {"id": "r-201"}]
    with pytest.raises(LogitCacheMissingError,
                       match=r"no entry for 2 of 50 training rows \(first: \['r-200', 'r-201'\]\)"
                             r".*including blended_cot"):
        CachedTeacher(caches["full"], rows, "blended_cot")
    # Same ids, different supervised positions (the rows changed after the cache was built).
    cached = CachedTeacher(caches["full"], ROWS, "blended_cot")
    cached.starts = cached.starts + 1
    with pytest.raises(LogitCacheMissingError, match="row 'r-0' covers positions 7..13"):
        distill(_student(state), None, Encoder(), ROWS, _cfg(steps=1), 0, tmp_path / "x.pt",
                "x", cached=cached)


# ------------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory, megatron):
    from pathlib import Path

    from distillscale import pipeline
    from distillscale.config import load_config

    root = Path(__file__).resolve().parents[2]
    out = tmp_path_factory.mktemp("cache_run")
    base = [
        f"output_dir={out / 'run'}", f"domain.taxonomy={root / 'conf/domains/finance.yaml'}",
        f"teacher.supervision.family={root / 'conf/teachers/tiny.yaml'}",
        f"teacher.supervision.cache.dir={out / 'cache'}",
        "data.num_examples=600", "teacher.train.steps=60", "prune.calibration_samples=32",
        "teacher.supervision.depths=[label]", "teacher.supervision.cache.formats=[label]",
        "teacher.supervision.cache.k=16", "students=[{name: d, axis: depth, compression_ratio: 0.5}]",
        "distill.train.steps=8", "distill.train.log_every=4", "distill.teacher_logits=cache",
    ]
    cfg = load_config(root / "conf/experiments/quickstart.yaml", base)
    pipeline.run_data(cfg)
    pipeline.run_teacher(cfg)
    return cfg, base, root


@pytest.mark.slow
def test_run_distill_from_the_cache_and_the_missing_cache_error(run, monkeypatch):
    import json
    import shutil

    from distillscale import pipeline
    from distillscale.config import load_config

    cfg, base, root = run
    student = cfg.students[0]
    # The teacher model is never loaded for training: only its validation log-probs are.
    import distillscale.distill.logit_kd as kd

    monkeypatch.setattr(kd, "make_kd_model", lambda *a, **k: pytest.fail("teacher forward"))
    out = pipeline.run_distill(cfg, student)
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["teacher_logits"] == "cache" and m["aligned_vocab"] is None
    assert m["val_kl_after"] < m["val_kl_before"]
    assert m["history"][-1]["kl"] < m["history"][0]["kl"]
    monkeypatch.undo()

    # The cache gone: a clear error naming the cache and the fix, nothing written.
    sup = json.loads((cfg.run_dir / "supervision" / "manifest.json").read_text())
    cache_dir = cfg.teacher.supervision.cache.dir + "/" + sup["metrics"]["caches"]["label"]["key"]
    shutil.move(cache_dir, cache_dir + ".moved")
    try:
        other = load_config(root / "conf/experiments/quickstart.yaml",
                            base + ["distill.train.steps=9"])
        with pytest.raises(kd.LogitCacheMissingError,
                           match=r"logit cache .* \(format 'label', key .*\) is missing or "
                                 r"incomplete.*including label"):
            pipeline.run_distill(other, student)
    finally:
        shutil.move(cache_dir + ".moved", cache_dir)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["history"] == m["history"]


@pytest.mark.slow
def test_run_distill_aligns_a_padded_student_and_rejects_another_tokenizer(run):
    import json

    from distillscale import pipeline
    from distillscale.config import load_config
    from distillscale.distill.losses import VocabMismatchError
    from distillscale.models.checkpoint import load_model, save_model
    from distillscale.tokenizer import load_tokenizer

    cfg, base, root = run
    cfg = load_config(root / "conf/experiments/quickstart.yaml",
                      base + ["distill.teacher_logits=online"])
    student = cfg.students[0]
    pruned = pipeline.run_prune(cfg, student)
    model, arch, vocab = load_model(pruned)
    # Re-save the pruned student padded to a multiple of 64 (as another
    # make_vocab_size_divisible_by would build it).
    padded = -(-vocab // 64) * 64 + 64
    big = build_gpt(arch, padded)
    with torch.no_grad():
        for k, v in big.state_dict().items():
            src = model.state_dict().get(k)
            if torch.is_tensor(v) and torch.is_tensor(src):
                (v.copy_(src) if v.shape == src.shape else v[:vocab].copy_(src))
    save_model(big, arch, padded, pruned)
    # Distil this step only: the whole-schedule call would see the pruned stage's outputs
    # changed and (rightly) prune again.
    out = pipeline.run_distill(cfg, student, 1)
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["aligned_vocab"] == vocab
    assert m["val_kl_after"] < m["val_kl_before"]
    assert load_model(out)[2] == padded

    # A student whose tokenizer is not the teacher's: one clear error before training.
    tok = load_tokenizer(pruned / "hf")
    tok.add_tokens(["zzz_not_in_teacher"])
    tok.save_pretrained(pruned / "hf")
    again = load_config(root / "conf/experiments/quickstart.yaml",
                        base + ["distill.teacher_logits=online", "distill.train.steps=9"])
    # This step only, again: the whole-schedule call would see the pruned stage's outputs
    # changed and prune again, with the teacher's tokenizer.
    with pytest.raises(VocabMismatchError, match=r"tokenizers differ.*zzz_not_in_teacher"):
        pipeline.run_distill(again, student, 1)


def test_cache_needs_forward_kl():
    from pathlib import Path

    from distillscale.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match=r"distill: teacher_logits=cache supports "
                                          r"loss.kind=forward_kl only \(got reverse_kl\)"):
        load_config(root / "conf/experiments/quickstart.yaml",
                    ["distill.teacher_logits=cache", "distill.loss.kind=reverse_kl"])
