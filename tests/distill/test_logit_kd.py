import pytest
import torch
import torch.nn.functional as F

from distillscale.config import DistillConfig, LossConfig, ModelArch, TrainConfig
from distillscale.distill.logit_kd import make_kd_model
from distillscale.models.megatron_gpt import build_gpt, causal_mask, forward_logits

VOCAB = 64
ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, seq_length=16)
SMALL = ARCH.model_copy(update={"num_layers": 1, "ffn_hidden_size": 32})


def _pos(tokens):
    b, s = tokens.shape
    return torch.arange(s).unsqueeze(0).expand(b, s)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [0, 5])  # 0: ModelOpt's LogitsKLLoss (KL), >0: chunked criterion
def test_modelopt_kl_matches_brute_force(megatron, kind, temperature, chunk):
    torch.manual_seed(0)
    teacher, student = build_gpt(ARCH, VOCAB), build_gpt(SMALL, VOCAB)
    with torch.no_grad():  # a non-trivial teacher distribution
        teacher.output_layer.weight.mul_(20)
    tokens = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        lt = forward_logits(teacher, tokens).double() / temperature
        ls = forward_logits(student, tokens).double() / temperature
    pt, ps = lt.softmax(-1), ls.softmax(-1)
    if kind == "forward_kl":
        ref = (pt * (pt.log() - ps.log())).sum(-1)
    elif kind == "reverse_kl":
        ref = (ps * (ps.log() - pt.log())).sum(-1)
    else:
        m = 0.5 * (pt + ps)
        ref = 0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)
    cfg = DistillConfig(loss=LossConfig(kind=kind, temperature=temperature, chunk_tokens=chunk))
    kd = make_kd_model(student, teacher, cfg)
    kd.train()
    kd(tokens, _pos(tokens), causal_mask(16))
    per_token = {}

    def grab(t):
        per_token["x"] = t[0]
        return t[0].mean()

    kd.compute_kd_loss(loss_reduction_fn=grab, skip_balancer=True)
    assert per_token["x"].shape == (3, 16)
    assert torch.allclose(per_token["x"].double(), ref, rtol=1e-4, atol=1e-5)


def test_distillation_lowers_kl_and_unwraps_to_plain_student(megatron, tmp_path):
    from distillscale.distill.logit_kd import distill

    torch.manual_seed(1)
    teacher, student = build_gpt(ARCH, VOCAB), build_gpt(SMALL, VOCAB)
    with torch.no_grad():
        teacher.output_layer.weight.mul_(10)

    class Enc:  # the minimal encoder surface `supervision_batch` needs
        def encode(self, rows, depth=None):
            from distillscale.tokenizer import EncodedBatch

            g = torch.Generator().manual_seed(7)
            tokens = torch.randint(4, VOCAB, (len(rows), 16), generator=g)
            ones = torch.ones(len(rows), 16)
            zeros = torch.zeros(len(rows), dtype=torch.long)
            # answer_pos 0 with trace_len 0: every position is supervised through answer_mask
            return EncodedBatch(tokens, tokens, ones, ones, zeros, zeros, trace_len=zeros)

    rows = [{}] * 64
    batch = Enc().encode(rows)

    def kl():
        with torch.no_grad():
            lt = forward_logits(teacher, batch.tokens).log_softmax(-1)
            ls = forward_logits(student, batch.tokens).log_softmax(-1)
        return F.kl_div(ls, lt, reduction="batchmean", log_target=True).item()

    before = kl()
    cfg = DistillConfig(train=TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2,
                                          log_every=10, eval_every=30, checkpoint_every=100))
    plain, history = distill(student, teacher, Enc(), rows, cfg, 0, tmp_path / "ck.pt", "kd")
    student = plain
    after = kl()
    assert after < 0.7 * before
    assert history[-1]["kl"] < history[0]["kl"]
    # The exported student is a plain model: no teacher inside, forward works on its own.
    assert not any("teacher" in k for k in plain.state_dict())
    assert forward_logits(plain, batch.tokens[:2]).shape == (2, 16, VOCAB)
