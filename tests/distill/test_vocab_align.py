"""Teacher and student padded to different vocabulary sizes (e.g. 152064 vs 151936): the
distillation compares them on the real tokenizer range and trains exactly as with identical
padding; a real tokenizer mismatch is a clear error."""

import pytest
import torch

from distillscale.config import DistillConfig, LossConfig, ModelArch, TrainConfig
from distillscale.distill.logit_kd import aligned_vocab, answer_kl, distill
from distillscale.distill.losses import VocabMismatchError
from distillscale.models.megatron_gpt import build_gpt, forward_logits
from distillscale.tokenizer import EncodedBatch, build_word_tokenizer

VOCAB, PADDED = 64, 80  # real tokenizer range; the student's padded embedding / output rows
ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, seq_length=16)
SMALL = ARCH.model_copy(update={"num_layers": 1, "ffn_hidden_size": 32})


class Encoder:
    def encode(self, rows, depth=None):
        n = len(rows)
        g = torch.Generator().manual_seed(5)
        seq = torch.randint(7, VOCAB, (n, 17), generator=g)
        loss_mask = torch.zeros(n, 16)
        loss_mask[:, :13] = 1.0
        answer_mask = torch.zeros(n, 16)
        answer_mask[:, 12] = 1.0
        pos = torch.full((n,), 12, dtype=torch.long)
        return EncodedBatch(seq[:, :16], seq[:, 1:], loss_mask, answer_mask, pos,
                            torch.zeros(n, dtype=torch.long),
                            trace_len=torch.full((n,), 6, dtype=torch.long))


ROWS = [{"id": f"r-{i}"} for i in range(32)]


def _pair():
    """The same student twice: vocab 64, and padded to 80 with random padding rows."""
    torch.manual_seed(2)
    a = build_gpt(SMALL, VOCAB)
    b = build_gpt(SMALL, PADDED)
    sa = a.state_dict()
    with torch.no_grad():
        for k, v in b.state_dict().items():
            if not torch.is_tensor(v) or k not in sa or not torch.is_tensor(sa[k]):
                continue
            if v.shape == sa[k].shape:
                v.copy_(sa[k])
            else:  # embedding / output rows: the real range copied, padding left random
                v[:VOCAB].copy_(sa[k])
        b.output_layer.weight[VOCAB:].mul_(20)  # padding logits that would matter if kept
    return a, b


@pytest.fixture(scope="module")
def teacher(megatron):
    torch.manual_seed(0)
    t = build_gpt(ARCH, VOCAB)
    with torch.no_grad():
        t.output_layer.weight.mul_(8)
    return t


@pytest.mark.parametrize("loss", [
    {"kind": "forward_kl", "temperature": 2.0, "alpha": 0.7},  # ModelOpt's KL when padding agrees
    {"kind": "jsd", "temperature": 1.0, "alpha": 0.9},  # blended CoT needs its CE anchor
    {"kind": "forward_kl", "temperature": 1.0, "alpha": 0.5, "chunk_tokens": 7},
])
def test_padded_student_trains_exactly_like_the_unpadded_one(teacher, tmp_path, loss):
    a, b = _pair()
    tokens = Encoder().encode(ROWS).tokens
    with torch.no_grad():  # the padding rows carry real probability mass if not cut
        pb = forward_logits(b, tokens).softmax(-1)
    assert float(pb[..., VOCAB:].sum(-1).mean()) > 0.05
    cfg = DistillConfig(supervision="blended_cot", loss=LossConfig(**loss),
                        train=TrainConfig(steps=3, batch_size=16, lr=3e-3, warmup_steps=1,
                                          log_every=1, eval_every=100, checkpoint_every=100))
    plain_a, ha = distill(a, teacher, Encoder(), ROWS, cfg, 0, tmp_path / "a.pt", "same")
    plain_b, hb = distill(b, teacher, Encoder(), ROWS, cfg, 0, tmp_path / "b.pt", "padded",
                          real_vocab=VOCAB)
    for x, y in zip(ha, hb, strict=True):
        for key in ("loss", "kl") + (("ce",) if loss["alpha"] < 1 else ()):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    with torch.no_grad():
        la = forward_logits(plain_a, tokens)
        lb = forward_logits(plain_b, tokens)
    assert lb.shape[-1] == PADDED
    torch.testing.assert_close(lb[..., :VOCAB], la, rtol=1e-4, atol=1e-5)
    # The validation KL aligns the same way.
    assert answer_kl(plain_b, teacher, Encoder(), ROWS, real_vocab=VOCAB) == pytest.approx(
        answer_kl(plain_a, teacher, Encoder(), ROWS), rel=1e-4)


def test_padded_student_from_the_logit_cache_matches_the_unpadded_one(teacher, tmp_path):
    from distillscale.teacher.logit_cache import (
        CachedRow,
        LogitCache,
        kd_sequences,
        tail_logprob,
    )
    from distillscale.teacher.supervision import supervision_batch

    # A full top-k cache of the teacher over the rows' KD positions.
    sup = supervision_batch(Encoder(), ROWS, "cot_short")
    _seqs, spans = kd_sequences(sup)
    with torch.no_grad():
        lp = forward_logits(teacher, sup.tokens).log_softmax(-1)
    top = lp.topk(VOCAB, -1)
    cache = LogitCache(tmp_path, "k")
    cache.write_shard(0, [CachedRow(r["id"], st, top.indices[i, st : st + n].numpy(),
                                    top.values[i, st : st + n].numpy(),
                                    tail_logprob(top.values[i, st : st + n].numpy()))
                          for i, (r, (st, n)) in enumerate(zip(ROWS, spans))], VOCAB)
    cache.finalize({"format": "cot_short"})
    from distillscale.distill.logit_kd import CachedTeacher

    cached = CachedTeacher(cache, ROWS, "cot_short")
    a, b = _pair()
    cfg = DistillConfig(supervision="cot_short", loss=LossConfig(alpha=0.8),
                        train=TrainConfig(steps=3, batch_size=16, lr=3e-3, warmup_steps=1,
                                          log_every=1, eval_every=100, checkpoint_every=100))
    _, ha = distill(a, None, Encoder(), ROWS, cfg, 0, tmp_path / "a.pt", "same", cached=cached)
    _, hb = distill(b, None, Encoder(), ROWS, cfg, 0, tmp_path / "b.pt", "padded",
                    cached=cached, real_vocab=VOCAB)
    for x, y in zip(ha, hb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["kl"] == pytest.approx(x["kl"], rel=1e-5)


def _tokenizer_dir(path, tok):
    (path / "hf").mkdir(parents=True)
    tok.save_pretrained(path / "hf")
    return path


def test_aligned_vocab_checks_the_tokenizer(tmp_path):
    tok = build_word_tokenizer(["alpha beta gamma delta"], ["up", "down"])
    same = _tokenizer_dir(tmp_path / "same", tok)
    real = len(tok)
    assert aligned_vocab(tok, same, real, real) is None  # same padding: nothing to align
    assert aligned_vocab(tok, same, real + 16, real + 48) == real
    assert aligned_vocab(tok, None, real, real + 16) == real  # student shares the teacher's
    with pytest.raises(VocabMismatchError, match="fewer than the tokenizer"):
        aligned_vocab(tok, same, real, real - 1)
    other = _tokenizer_dir(tmp_path / "other",
                           build_word_tokenizer(["alpha beta gamma epsilon"], ["up", "down"]))
    with pytest.raises(VocabMismatchError,
                       match=r"other/hf: teacher and student tokenizers differ .*"
                             r"only in teacher \['delta'\], only in student \['epsilon'\]"):
        aligned_vocab(tok, other, real, real)
