"""LoRA KD (peft, transformers): only adapter weights train, the loss falls, merging is exact."""

import pytest
import torch

from distillscale.config import DistillConfig, LossConfig, TrainConfig

VOCAB, SEQ = 64, 12


def _llama(layers, hidden, ffn, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class Enc:  # the minimal encoder surface `supervision_batch` needs
    def encode(self, rows, depth=None):
        from distillscale.tokenizer import EncodedBatch

        n = len(rows)
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(4, VOCAB, (n, SEQ), generator=g)
        targets = torch.roll(tokens, -1, dims=1)
        answer = torch.zeros(n, SEQ)
        answer[:, SEQ - 2] = 1.0
        pos = torch.full((n,), SEQ - 2, dtype=torch.long)
        return EncodedBatch(tokens, targets, torch.ones(n, SEQ), answer, pos,
                            torch.zeros(n, dtype=torch.long),
                            trace_len=torch.full((n,), SEQ - 4, dtype=torch.long))


@pytest.mark.parametrize("kind,alpha", [("forward_kl", 1.0), ("jsd", 0.5)])
def test_lora_kd_trains_only_adapters_and_merges_exactly(tmp_path, kind, alpha):
    from distillscale.distill.lora_kd import distill_lora_hf

    teacher = _llama(2, 32, 64, seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked, non-trivial teacher distribution
    student = _llama(1, 32, 64, seed=1)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(method="lora_kd", lora_rank=4, lora_alpha=8,
                        loss=LossConfig(kind=kind, alpha=alpha, chunk_tokens=5),
                        train=TrainConfig(steps=15, batch_size=8, lr=1e-2, warmup_steps=2,
                                          log_every=5, eval_every=100, checkpoint_every=100))
    rows = [{}] * 32
    peft_model, history = distill_lora_hf(student, teacher, Enc(), rows, cfg, 0,
                                          tmp_path / "ck.pt", "lora", tmp_path / "tb")
    assert history[-1]["kl"] < history[0]["kl"]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Base weights untouched, adapters moved (lora_B starts at zero).
    state = peft_model.state_dict()
    for name, value in base.items():
        wrapped = [k for k in state
                   if k.endswith((name.replace(".weight", ".base_layer.weight"), name))]
        assert wrapped, name
        assert torch.equal(state[wrapped[0]], value), name
    assert any(state[n].abs().sum() > 0 for n in state if "lora_B" in n)
    tokens = Enc().encode(rows[:4]).tokens
    with torch.no_grad():
        adapted = peft_model(input_ids=tokens).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=tokens).logits, adapted, atol=1e-4)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
