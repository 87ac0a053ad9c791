import pytest
import torch
import torch.nn.functional as F

from distillscale.config import DistillConfig, LossConfig, ModelArch, TrainConfig
from distillscale.distill.logit_kd import alpha_at, make_kd_model, masked_mean
from distillscale.models.megatron_gpt import build_gpt, causal_mask, forward_logits

VOCAB = 64
ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, seq_length=16)
SMALL = ARCH.model_copy(update={"num_layers": 1, "ffn_hidden_size": 32})


def _pos(tokens):
    b, s = tokens.shape
    return torch.arange(s).unsqueeze(0).expand(b, s)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_modelopt_kl_matches_brute_force(megatron, kind, temperature):
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
    else:
        ref = (ps * (ps.log() - pt.log())).sum(-1)
    cfg = DistillConfig(loss=LossConfig(kind=kind, temperature=temperature))
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
        def encode(self, rows):
            from distillscale.tokenizer import EncodedBatch

            g = torch.Generator().manual_seed(7)
            tokens = torch.randint(4, VOCAB, (len(rows), 16), generator=g)
            ones = torch.ones(len(rows), 16)
            return EncodedBatch(tokens, tokens, ones, ones, torch.zeros(len(rows), dtype=torch.long),
                                torch.zeros(len(rows), dtype=torch.long))

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


def test_alpha_warmup_and_masked_mean():
    assert alpha_at(0, 0.5, 10) == pytest.approx(0.05)
    assert alpha_at(20, 0.5, 10) == 0.5
    assert alpha_at(0, 0.7, 0) == 0.7
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert masked_mean(x, torch.tensor([[0.0, 1.0, 1.0]])).item() == pytest.approx(2.5)
