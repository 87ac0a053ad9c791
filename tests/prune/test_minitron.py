"""ModelOpt Minitron pruning of a tiny local-spec GPTModel (CPU): width, heads, depth, shapes."""

from __future__ import annotations

import pytest
import torch

from distillscale.config import ModelArch
from distillscale.models.megatron_gpt import arch_params
from distillscale.prune.minitron import check_target, choose_shape, pruned_arch

VOCAB = 500
ARCH = ModelArch(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=512,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    seq_length=32,
)


@pytest.fixture(scope="module")
def stack():
    from distillscale.models import megatron_gpt as mg

    mg.init_distributed()
    torch.manual_seed(0)
    teacher = mg.build_gpt(ARCH, VOCAB)
    teacher.eval()
    calib = torch.randint(
        0, VOCAB, (8, ARCH.seq_length), generator=torch.Generator().manual_seed(1)
    )

    def forward_loop(model):
        for batch in calib.split(4):
            mg.forward_logits(model, batch)

    return mg, teacher, calib, forward_loop


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _assert_unchanged(model, snapshot):
    now = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert now.keys() == snapshot.keys()
    assert all(torch.equal(now[k], snapshot[k]) for k in now)


def test_width_prune_gives_requested_shapes(stack):
    from distillscale.prune.minitron import prune_minitron

    mg, teacher, _, loop = stack
    before = _snapshot(teacher)
    target = {"hidden_size": 96, "ffn_hidden_size": 256, "num_attention_heads": 2}
    student, arch = prune_minitron(teacher, ARCH, target, loop)

    assert (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads) == (96, 256, 2)
    assert arch.kv_channels == 32 and arch.num_query_groups == 2 and arch.num_layers == 4
    assert type(student).__name__ == "GPTModel" and type(student).__module__.startswith("megatron")
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    d, g = 32, 2
    for i in range(4):
        pre = f"decoder.layers.{i}."
        assert shapes[pre + "self_attention.linear_qkv.weight"] == ((2 + 2 * g) * d, 96)
        assert shapes[pre + "self_attention.linear_proj.weight"] == (96, 2 * d)
        assert shapes[pre + "mlp.linear_fc1.weight"] == (2 * 256, 96)  # SwiGLU: gate + up
        assert shapes[pre + "mlp.linear_fc2.weight"] == (96, 256)
        assert shapes[pre + "input_layernorm.weight"] == (96,)
        assert shapes[pre + "pre_mlp_layernorm.weight"] == (96,)
    assert shapes["embedding.word_embeddings.weight"] == (VOCAB, 96)
    assert shapes["output_layer.weight"] == (VOCAB, 96)
    assert mg.count_params(student) == mg.arch_params(arch, VOCAB) < mg.count_params(teacher)
    _assert_unchanged(teacher, before)  # a copy was pruned

    # The returned model trains: one backward pass reaches every weight.
    student.train()
    tokens = torch.randint(0, VOCAB, (2, 16))
    mg.forward_logits(student, tokens).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in student.parameters())


def test_head_pruning_keeps_whole_heads(stack):
    """Dropping heads must equal the teacher with those heads' outputs masked out."""
    from distillscale.prune.minitron import prune_minitron

    mg, teacher, calib, loop = stack
    student, _ = prune_minitron(teacher, ARCH, {"num_attention_heads": 2}, loop)
    d, per_group = ARCH.head_dim, ARCH.num_attention_heads // ARCH.num_query_groups
    masked = mg.build_gpt(ARCH, VOCAB)
    masked.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for i in range(ARCH.num_layers):
            full = teacher.decoder.layers[i].self_attention.linear_qkv.weight
            kept_qkv = student.decoder.layers[i].self_attention.linear_qkv.weight
            kept = []
            for g in range(ARCH.num_query_groups):  # student: [q, k, v] per group
                q = kept_qkv[3 * g * d : (3 * g + 1) * d]
                kept += [
                    g * per_group + j
                    for j in range(per_group)
                    if torch.equal(q, full[((per_group + 2) * g + j) * d :][:d])
                ]
                kv_full = full[((per_group + 2) * g + per_group) * d :][: 2 * d]
                assert torch.equal(kept_qkv[(3 * g + 1) * d : (3 * g + 3) * d], kv_full)
            assert len(kept) == 2 and len({h // per_group for h in kept}) == 2  # one per group
            proj = masked.decoder.layers[i].self_attention.linear_proj.weight
            for h in set(range(ARCH.num_attention_heads)) - set(kept):
                proj[:, h * d : (h + 1) * d] = 0
        masked.eval()
        student.eval()
        diff = (mg.forward_logits(masked, calib) - mg.forward_logits(student, calib)).abs().max()
    assert diff.item() < 1e-5


def test_hidden_size_ranked_by_layernorm_outputs(stack):
    """On the local spec ModelOpt must rank hidden channels by the same layernorm outputs that
    TE's fused LayerNorm+Linear would hand it (the CPU adapter feeds it the linear's input)."""
    from distillscale.prune.minitron import prune_minitron

    _, teacher, _, loop = stack
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, inp, out):  # ModelOpt's statistic: sum over batch of mean_seq(|x|)^2
            acts[name] = acts.get(name, 0) + out.float().abs().mean(0).pow(2).sum(0)

        return fn

    handles = [
        norm.register_forward_hook(hook(f"{i}.{k}"))
        for i, layer in enumerate(teacher.decoder.layers)
        for k, norm in (("in", layer.input_layernorm), ("mlp", layer.pre_mlp_layernorm))
    ]
    with torch.no_grad():
        loop(teacher)
    for h in handles:
        h.remove()
    importance = torch.stack([a.sqrt() for a in acts.values()]).sum(0)

    student, _ = prune_minitron(teacher, ARCH, {"hidden_size": 96}, loop)
    emb, kept_emb = (
        teacher.embedding.word_embeddings.weight,
        student.embedding.word_embeddings.weight,
    )
    kept = [
        next(j for j in range(ARCH.hidden_size) if torch.equal(kept_emb[:, c], emb[:, j]))
        for c in range(96)
    ]
    assert kept == importance.argsort(descending=True)[:96].tolist()


def test_depth_prune_drops_least_important_layers(stack):
    from distillscale.prune.minitron import prune_minitron, rank_layers_by_importance

    mg, teacher, _, loop = stack
    info: dict = {}
    student, arch = prune_minitron(teacher, ARCH, {"num_layers": 2}, loop, info=info)
    assert arch.num_layers == 2 and len(student.decoder.layers) == 2
    scores = info["layer_scores"]
    assert sorted(scores) == [1, 2, 3, 4] and all(s > 0 for s in scores.values())
    lowest = sorted(scores, key=scores.get)[:2]
    assert info["dropped_layers"] == sorted(lowest)
    kept = [n for n in range(1, 5) if n not in lowest]
    for new_i, old_n in enumerate(kept):
        new = student.decoder.layers[new_i].state_dict()
        old = teacher.decoder.layers[old_n - 1].state_dict()
        assert all(torch.equal(new[k], old[k]) for k in new if torch.is_tensor(new[k]))
    assert mg.count_params(student) == mg.arch_params(arch, VOCAB)
    assert (
        rank_layers_by_importance(teacher, ARCH, loop)[:2]
        == sorted(scores, key=scores.get, reverse=True)[:2]
    )


def test_invalid_targets_raise_clear_errors(stack):
    from distillscale.prune.minitron import prune_minitron

    _, teacher, _, loop = stack
    with pytest.raises(ValueError, match="multiple of num_query_groups"):
        prune_minitron(teacher, ARCH, {"num_attention_heads": 3}, loop)
    with pytest.raises(ValueError, match="hidden_size_divisor"):
        prune_minitron(teacher, ARCH, {"hidden_size": 100}, loop)
    with pytest.raises(ValueError, match="num_layers"):
        prune_minitron(teacher, ARCH, {"num_layers": 5}, loop)
    with pytest.raises(ValueError, match="unknown keys"):
        prune_minitron(teacher, ARCH, {"num_query_groups": 1}, loop)


def test_silently_unpruned_dimension_is_detected(stack):
    """The known failure: config says fewer heads, weights keep them all."""
    from distillscale.prune.minitron import validate_pruned

    mg, _, _, _ = stack
    fake = mg.build_gpt(ARCH, VOCAB)
    fake.config.num_attention_heads = 2  # what a silently ignored head prune leaves behind
    with pytest.raises(RuntimeError, match="silently not pruned"):
        target = {"num_attention_heads": 2}
        validate_pruned(fake, pruned_arch(ARCH, target), VOCAB, target)


@pytest.mark.parametrize("ratio", [0.79, 0.58, 0.37, 0.16])
def test_choose_shape_width(ratio):
    target, achieved = choose_shape(ARCH, VOCAB, "width", ratio, 16, 32)
    assert abs(achieved - ratio) < 0.03
    check_target(ARCH, target, hidden_size_divisor=16, ffn_hidden_size_divisor=32)
    arch = pruned_arch(ARCH, target)
    assert arch.hidden_size % 16 == 0 and arch.ffn_hidden_size % 32 == 0
    assert arch.num_attention_heads % ARCH.num_query_groups == 0
    assert arch.num_attention_heads <= ARCH.num_attention_heads
    assert arch.head_dim == ARCH.head_dim and arch.num_layers == ARCH.num_layers


def test_choose_shape_keep_prunes_heads_only_when_needed():
    # A tiny vocabulary makes attention a large share; 0.3 still fits with all heads kept.
    target, _ = choose_shape(ARCH, 8, "width", 0.3, 16, 32, head_policy="keep")
    assert "num_attention_heads" not in target
    # Without room in hidden/ffn (coarse divisors), heads are what is left to prune.
    target, achieved = choose_shape(ARCH, 8, "width", 0.85, 128, 512, head_policy="keep")
    assert target == {"num_attention_heads": 2} and achieved < 1


def _spread(target):
    arch = pruned_arch(ARCH, target)
    fracs = (arch.hidden_size / ARCH.hidden_size, arch.ffn_hidden_size / ARCH.ffn_hidden_size,
             arch.num_attention_heads / ARCH.num_attention_heads)
    return max(fracs) - min(fracs)


@pytest.mark.parametrize("ratio", [0.58, 0.3])
def test_choose_shape_scale_shrinks_heads_with_width(ratio):
    scaled, achieved = choose_shape(ARCH, 8, "width", ratio, 16, 32)  # default: scale
    kept, _ = choose_shape(ARCH, 8, "width", ratio, 16, 32, head_policy="keep")
    assert pruned_arch(ARCH, scaled).num_attention_heads < ARCH.num_attention_heads
    assert abs(achieved - ratio) < 0.03
    assert _spread(scaled) < _spread(kept)
    with pytest.raises(ValueError, match="head_policy"):
        choose_shape(ARCH, 8, "width", ratio, 16, 32, head_policy="all")


# SmolLM2-135M's shape: 9 heads in 3 query groups, head dim 64, tied embeddings.
SMOLLM2 = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                    num_query_groups=3, kv_channels=64, seq_length=8192, tie_word_embeddings=True)


@pytest.mark.parametrize("policy", ["scale", "keep"])
def test_llama_students_keep_hidden_a_multiple_of_their_heads(policy):
    # transformers' LlamaConfig refuses hidden % heads != 0 even with an explicit head_dim: a
    # width student of a 9-head Llama must keep it or its HF export fails after pruning.
    for ratio in (0.79, 0.58, 0.37, 0.16):
        target, _ = choose_shape(SMOLLM2, 49152, "width", ratio, 64, 64, head_policy=policy)
        hidden = target.get("hidden_size", 576)
        heads = target.get("num_attention_heads", 9)
        assert hidden % heads == 0, (ratio, target)
        check_target(SMOLLM2, target, hidden_size_divisor=64, ffn_hidden_size_divisor=64)
    with pytest.raises(ValueError, match="hidden_size=512 must be a multiple of "
                                         "num_attention_heads=9"):
        check_target(SMOLLM2, {"hidden_size": 512}, hidden_size_divisor=64)
    # Qwen3 (QK layernorm) does not check it: the same target is valid there.
    check_target(SMOLLM2.model_copy(update={"qk_layernorm": True}), {"hidden_size": 512},
                 hidden_size_divisor=64)


def test_choose_shape_depth():
    teacher = arch_params(ARCH, VOCAB)
    for ratio in (0.79, 0.58, 0.37, 0.16):
        target, achieved = choose_shape(ARCH, VOCAB, "depth", ratio)
        assert set(target) == {"num_layers"} and 1 <= target["num_layers"] < ARCH.num_layers
        ratios = [
            arch_params(pruned_arch(ARCH, {"num_layers": n}), VOCAB) / teacher
            for n in range(1, ARCH.num_layers)
        ]
        assert abs(achieved - ratio) == pytest.approx(min(abs(r - ratio) for r in ratios))


def test_importance_scores_are_cached_and_reused(stack, tmp_path):
    """Scores computed once per source model: a second target (another axis, too) pruned with
    the cache runs no calibration forward pass and gives exactly the uncached result."""
    from distillscale.prune.minitron import prune_minitron

    _, teacher, _, loop = stack
    calls = []

    def counting_loop(model):
        calls.append(1)
        loop(model)

    scores = tmp_path / "scores"
    width = {"hidden_size": 96, "ffn_hidden_size": 256}
    first: dict = {}
    prune_minitron(teacher, ARCH, width, counting_loop, info=first, scores_dir=scores)
    assert len(calls) == 1 and not first["scores_cached"]
    assert scores.is_dir() and not (tmp_path / ".scores.partial").exists()
    for target in (width, {"num_layers": 2}):
        reference, _ = prune_minitron(teacher, ARCH, target, loop)
        info: dict = {}
        cached, _ = prune_minitron(teacher, ARCH, target, counting_loop, info=info,
                                   scores_dir=scores)
        assert info["scores_cached"] and len(calls) == 1
        ref, got = reference.state_dict(), cached.state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref if torch.is_tensor(ref[k]))
