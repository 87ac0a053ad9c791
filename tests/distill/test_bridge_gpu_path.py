"""The GPU distillation path (Megatron-Bridge) as far as a CPU can check it: backend selection,
and the real Bridge / ModelOpt config objects built from our config (nothing is trained)."""

import json
import signal
from pathlib import Path

import pytest
import torch

from distillscale.config import ConfigError, load_config
from distillscale.distill import bridge
from distillscale.tokenizer import build_word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "conf" / "experiments" / "quickstart.yaml"


def _cfg(*overrides):
    return load_config(QUICKSTART, list(overrides))


# ------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("cuda,te,want", [(False, False, "local"), (True, False, "local"),
                                          (False, True, "local"), (True, True, "bridge")])
def test_auto_picks_bridge_only_with_cuda_and_transformer_engine(cuda, te, want):
    assert bridge.select_backend("auto", cuda=cuda, te=te) == want
    assert bridge.select_backend("local", cuda=cuda, te=te) == "local"


@pytest.mark.parametrize("cuda,te,missing", [(False, True, "a CUDA device"),
                                             (True, False, "transformer_engine"),
                                             (False, False, "a CUDA device and transformer_engine")])
def test_forced_bridge_without_cuda_or_te_is_one_clear_line(cuda, te, missing):
    with pytest.raises(bridge.BridgeUnavailableError) as e:
        bridge.select_backend("bridge", cuda=cuda, te=te)
    msg = str(e.value)
    assert "\n" not in msg and f"distill.backend=bridge needs {missing}," in msg
    assert "distill.backend=local" in msg


def test_this_machine_runs_local_and_the_te_stub_does_not_count():
    from distillscale.compat.cpu import activate

    activate()  # the import-only stub the CPU path installs
    assert not torch.cuda.is_available()
    assert not bridge.transformer_engine_available()
    assert bridge.select_backend("auto") == "local"
    with pytest.raises(bridge.BridgeUnavailableError):
        bridge.select_backend("bridge")


def test_backend_is_validated_at_load():
    assert _cfg().distill.backend == "auto"
    assert _cfg("distill.backend=bridge").distill.backend == "bridge"
    with pytest.raises(ConfigError, match=r"command line: distill.backend: "):
        _cfg("distill.backend=gpu")


def test_run_distill_forced_bridge_fails_before_any_work(tmp_path):
    from distillscale.pipeline import run_distill

    cfg = _cfg("distill.backend=bridge", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(bridge.BridgeUnavailableError):
        run_distill(cfg, cfg.students[0], 1)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- mapping


def test_batch_sizes_follow_data_parallel_and_accumulation():
    train = _cfg("distill.train.batch_size=32", "distill.train.grad_accum_steps=4").distill.train
    assert bridge.batch_sizes(train, 2) == (4, 32)
    assert bridge.batch_sizes(train, 1) == (8, 32)
    with pytest.raises(ConfigError, match=r"batch_size=32 is not divisible by data_parallel \(3\)"):
        bridge.batch_sizes(train, 3)


def test_parallel_layout_from_launch():
    cfg = _cfg("launch.tensor_parallel=2", "launch.pipeline_parallel=2")
    assert bridge.parallel_layout(cfg, 8) == bridge.ParallelLayout(2, 2, True, 2)
    cfg = _cfg("launch.sequence_parallel=false", "launch.tensor_parallel=2")
    assert bridge.parallel_layout(cfg, 2).sequence_parallel is False
    assert bridge.parallel_layout(_cfg(), 1).sequence_parallel is False  # TP=1: nothing to split
    with pytest.raises(ConfigError, match="does not divide WORLD_SIZE=6"):
        bridge.parallel_layout(_cfg("launch.pipeline_parallel=4"), 6)


@pytest.mark.parametrize("alpha,skip,scale", [(1.0, True, 1.0), (0.75, False, 3.0),
                                              (0.5, False, 1.0)])
def test_kd_config_maps_temperature_and_blend(alpha, skip, scale):
    from distillscale.compat import cpu

    cpu.activate()  # Bridge imports transformer-engine at import time: the CPU stub first
    from megatron.bridge.training.post_training.distillation import ModelOptDistillConfig

    loss = _cfg(f"distill.loss.alpha={alpha}", "distill.loss.temperature=2.0").distill.loss
    kd = bridge.kd_config(loss)
    assert isinstance(kd, ModelOptDistillConfig)
    assert kd.logit_kl_temperature == 2.0 and kd.logit_layers == ("output_layer", "output_layer")
    assert kd.skip_lm_loss is skip and kd.kd_loss_scale == pytest.approx(scale)
    assert kd.criterion is None  # forward KL: ModelOpt's own LogitsKLLoss is built from it


def test_sft_jsonl_rows(tmp_path):
    rows = [{"id": 1, "text": "acme beats estimates", "label": "earnings_beat",
             "traces": {"cot_long": "profit rose"}}]
    bridge.write_sft_jsonl(rows, rows, tmp_path / "l", "label")
    rec = json.loads((tmp_path / "l" / "training.jsonl").read_text())
    assert rec == {"input": "<bos> headline : acme beats estimates event :",
                   "output": "earnings_beat"}
    # The same ids the local path trains on (Bridge tokenizes the text and adds no BOS).
    from distillscale.tokenizer import PromptEncoder

    tok = build_word_tokenizer(["acme beats estimates"], ["earnings_beat", "other"])
    enc = PromptEncoder(tok, ["earnings_beat", "other"], 48)
    full, _, _ = enc.sequence("acme beats estimates", 0)
    assert tok.encode(f"{rec['input']} {rec['output']}", add_special_tokens=False) == full[:-1]
    bridge.write_sft_jsonl(rows, rows, tmp_path / "b", "blended_cot")
    rec = json.loads((tmp_path / "b" / "validation.jsonl").read_text())
    assert rec["input"].endswith("<think_long>")
    assert rec["output"] == "profit rose </think> event : earnings_beat"
    with pytest.raises(ValueError, match="no 'cot_short' trace"):
        bridge.write_sft_jsonl(rows, rows, tmp_path / "s", "cot_short")


def test_sft_rows_of_an_hf_teacher_are_its_chat_prompts(tmp_path):
    """With an HF teacher the SFT rows carry the prompts the teacher was asked in (its chat
    template through the family adapter, with the task and the class list) and the completions
    the local path trains on: the same token ids as `ChatPromptEncoder`, not a bare user turn."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from tiny_hf import build_tokenizer, domain_texts

    from distillscale.domain import load_taxonomy
    from distillscale.teacher.adapters import load_adapter
    from distillscale.tokenizer import ChatPromptEncoder

    tax = load_taxonomy(ROOT / "conf/domains/finance.yaml")
    build_tokenizer(domain_texts(ROOT / "conf/domains/finance.yaml")).save_pretrained(
        tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    enc = ChatPromptEncoder(tok, tax.labels, 512, load_adapter(ROOT / "conf/teachers/chat.yaml"),
                            tax.task)
    label = tax.labels[3]
    rows = [{"id": 1, "text": "Acme shares jump after results", "label": label,
             "traces": {"cot_long": "Results beat the consensus."}}]

    def written(fmt):
        folder = bridge.write_sft_jsonl(rows, rows, tmp_path / fmt, fmt, enc)
        return json.loads((folder / "training.jsonl").read_text())

    rec = written("label")
    ids = tok.encode(rec["input"], add_special_tokens=False)
    assert ids == enc.prompt_ids(rows[0]["text"])
    assert tax.task in rec["input"] and all(n in rec["input"] for n in tax.labels)
    full, answer_pos, _ = enc.sequence(rows[0]["text"], 3)
    assert ids + tok.encode(rec["output"], add_special_tokens=False) + [enc.eos_id] == full
    assert answer_pos == len(ids) - 1

    rec = written("blended_cot")  # blended CoT trains on the long trace
    assert tok.encode(rec["input"], add_special_tokens=False) == \
        enc.prompt_ids(rows[0]["text"], "cot_long")
    assert rec["output"] == "Results beat the consensus.\nAnswer: " + label
    # The tiny family's format is what a teacher without a chat template gets.
    assert bridge.sft_pair(rows[0], "label") == (
        f"<bos> headline : {rows[0]['text']} event :", label)


# ------------------------------------------------------------ real Bridge objects on CPU


def _hf_model(folder: Path, layers: int, hidden: int, vocab: int, tok) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    bridge._bridge_imports()
    tok = build_word_tokenizer(["alpha beta gamma delta"], ["up", "down"])
    root = tmp_path_factory.mktemp("hf")
    vocab = 64
    assert len(tok) <= vocab
    teacher = _hf_model(root / "teacher", 4, 64, vocab, tok)
    student = _hf_model(root / "student", 2, 32, vocab, tok)
    padded = _hf_model(root / "padded", 2, 32, vocab + 16, tok)
    return teacher, student, padded


def test_config_container_fields(hf_pair, tmp_path):
    from megatron.bridge.data.builders import GPTSFTDatasetConfig
    from megatron.bridge.models.distillation_provider import DistillationProvider
    from megatron.bridge.models.gpt_provider import transformer_engine_layer_spec
    from megatron.bridge.training.config import ConfigContainer

    teacher, student, _ = hf_pair
    cfg = _cfg("launch.tensor_parallel=2", "launch.pipeline_parallel=2",
               "distill.train.batch_size=32", "distill.train.grad_accum_steps=2",
               "distill.train.steps=500", "distill.train.lr=2e-4", "distill.train.min_lr=2e-5",
               "distill.train.warmup_steps=30", "distill.train.checkpoint_every=50",
               "distill.train.weight_decay=0.05", "distill.train.grad_clip=0.5",
               "distill.loss.temperature=1.5", "distill.seq_length=96", "seed=7")
    c = bridge.config_container(cfg, student, teacher, tmp_path, world_size=8)
    assert isinstance(c, ConfigContainer)
    m = c.model
    assert isinstance(m, DistillationProvider)
    for prov, layers in ((m, 2), (m.teacher, 4)):
        assert prov.num_layers == layers
        assert prov.tensor_model_parallel_size == 2 and prov.pipeline_model_parallel_size == 2
        assert prov.sequence_parallel is True and prov.context_parallel_size == 1
        assert prov.bf16 is True and prov.fp16 is False
        assert prov.params_dtype == torch.bfloat16 and prov.pipeline_dtype == torch.bfloat16
        assert prov.seq_length == 96
        assert prov.transformer_layer_spec is transformer_engine_layer_spec
    assert m.cross_entropy_fusion_impl == "native"  # Bridge's KD switch, applied on conversion
    assert m.kd_config.logit_kl_temperature == 1.5 and m.kd_config.skip_lm_loss is True
    # Forward KL: no own criterion hook, Bridge's KD conversion hook is the last one.
    assert m._pre_wrap_hooks[-1].__name__ == "_convert_hook"
    assert not any(getattr(h, "distillscale_criterion", False) for h in m._pre_wrap_hooks)
    # DP = 8 / (2 x 2) = 2; 32 = micro x DP x accumulation -> micro 8.
    assert (c.train.train_iters, c.train.global_batch_size, c.train.micro_batch_size) == \
        (500, 32, 8)
    o, s = c.optimizer, c.scheduler
    assert (o.optimizer, o.lr, o.min_lr, o.weight_decay, o.clip_grad) == \
        ("adam", 2e-4, 2e-5, 0.05, 0.5)
    assert o.bf16 is True and o.use_distributed_optimizer is True
    assert (s.lr_decay_style, s.lr_warmup_iters, s.lr_decay_iters) == ("cosine", 30, 500)
    ck = c.checkpoint
    assert ck.save == ck.load == str(tmp_path / "checkpoints" / "bridge")
    assert ck.save_interval == 50 and ck.ckpt_format == "torch_dist"
    assert c.mixed_precision == "bf16_mixed" and c.rng.seed == 8 and c.peft is None  # Bridge asserts seed > 0: seed + 1
    assert ck.pretrained_checkpoint is None
    assert c.train.exit_signal_handler is True and c.train.exit_signal == signal.SIGUSR1
    assert isinstance(c.dataset, GPTSFTDatasetConfig)
    assert c.dataset.seq_length == 96 and c.dataset.dataset_root == str(tmp_path / "sft")
    assert c.tokenizer.tokenizer_type == "HuggingFaceTokenizer"
    assert c.tokenizer.tokenizer_model == str(teacher)
    assert c.logger.tensorboard_dir == str(tmp_path / "tensorboard")


def test_lora_kd_uses_bridge_lora(hf_pair, tmp_path):
    from megatron.bridge.peft.lora import LoRA

    teacher, student, _ = hf_pair
    cfg = _cfg("distill.method=lora_kd", "distill.lora_rank=16", "distill.lora_alpha=32")
    c = bridge.config_container(cfg, student, teacher, tmp_path, world_size=1)
    assert isinstance(c.peft, LoRA)
    assert (c.peft.dim, c.peft.alpha) == (16, 32)
    from megatron.bridge.peft.utils import wildcard_match

    # Anchored at the student's own decoder: Bridge matches the full module name, so no target
    # can reach ModelOpt's registered `_teacher_model` (bare leaf names put adapters there too).
    for leaf in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                 "mlp.linear_fc2"):
        assert any(wildcard_match(t, f"decoder.layers.3.{leaf}") for t in c.peft.target_modules)
        assert not any(wildcard_match(t, f"_teacher_model.decoder.layers.3.{leaf}")
                       for t in c.peft.target_modules)
    assert c.model.sequence_parallel is False  # TP=1
    assert c.checkpoint.pretrained_checkpoint == str(student)  # Bridge's PEFT base weights


def test_jsd_installs_our_criterion_on_the_last_stage(hf_pair, tmp_path, megatron):
    teacher, student, _ = hf_pair
    cfg = _cfg("distill.loss.kind=jsd", "distill.loss.temperature=2.0")
    c = bridge.config_container(cfg, student, teacher, tmp_path, world_size=1)
    hooks = c.model._pre_wrap_hooks
    # Ours first (it fills kd_config.criterion), Bridge's KD conversion last (it reads it).
    assert hooks[0].distillscale_criterion and hooks[-1].__name__ == "_convert_hook"
    assert c.model.kd_config.criterion is None
    chunks = ["model"]
    assert hooks[0](chunks) is chunks
    (key, crit), = c.model.kd_config.criterion.items()
    assert key == ("output_layer", "output_layer")
    assert type(crit).__name__ == "DivergenceLogitsLoss"
    from modelopt.torch.distill.plugins.megatron import BaseLoss

    assert isinstance(crit, BaseLoss)


def test_padded_vocab_difference(hf_pair, tmp_path):
    teacher, _, padded = hf_pair
    # TP=1: aligned on the tokenizer's range by our criterion.
    c = bridge.config_container(_cfg(), padded, teacher, tmp_path, world_size=1)
    assert c.model.vocab_size != c.model.teacher.vocab_size
    assert c.model._pre_wrap_hooks[0].distillscale_criterion
    with pytest.raises(ConfigError, match=r"padded: student vocabulary 80 != teacher's 64: "
                                          r"aligning padded vocabularies needs"):
        bridge.config_container(_cfg("launch.tensor_parallel=2"), padded, teacher, tmp_path,
                                world_size=2)


# ------------------------------------------------------------------ GPU recipe and launcher


def test_gpu_8b_recipe_maps_to_a_16_gpu_layout():
    cfg = load_config(ROOT / "conf" / "experiments" / "gpu_8b.yaml")
    assert cfg.teacher.source == "hf" and cfg.distill.backend == "bridge"
    layout = bridge.parallel_layout(cfg, 16)
    assert layout == bridge.ParallelLayout(4, 1, True, 4)
    assert bridge.batch_sizes(cfg.distill.train, layout.data_parallel) == (2, 256)
    kd = bridge.kd_config(cfg.distill.loss)
    assert kd.skip_lm_loss is False and kd.kd_loss_scale == pytest.approx(9.0)


def qwen3_8b_dir(folder: Path) -> Path:
    """A folder with only a Qwen3-8B-shaped config.json and a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "vocab_size": 151936}))
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    return folder


def _dry_run(*overrides):
    import os
    import subprocess
    import sys

    return subprocess.run(
        ["bash", "launchers/prune_distill.sh", "--dry-run", "--config",
         "conf/experiments/gpu_8b.yaml", "--nodes", "2", "--gpus-per-node", "8", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, DISTILLSCALE_PYTHON=sys.executable))


def test_launcher_dry_run_shows_prune_and_distill_layouts(tmp_path):
    hf = qwen3_8b_dir(tmp_path / "qwen3-8b")
    res = _dry_run(f"teacher.hf_path={hf}", "launch.sequence_parallel=false",
                   "distill.backend=auto")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "world 16 = TP 4 x PP 1 x DP 4" in out
    assert "# prune: TP 1 x PP 1 x DP 16" in out
    assert "# distill: backend auto, sequence parallel False, every planned student fits" in out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert srun.rstrip().endswith(f"-m distillscale.cli run conf/experiments/gpu_8b.yaml "
                                  f"teacher.hf_path={hf} launch.sequence_parallel=false "
                                  "distill.backend=auto")


def test_a_layout_that_cannot_hold_a_student_is_refused_naming_it(tmp_path):
    hf = qwen3_8b_dir(tmp_path / "qwen3-8b")
    # Qwen3-8B's embeddings are 15% of its parameters: depth_0.16 keeps 1 of 36 layers.
    res = _dry_run(f"teacher.hf_path={hf}", "launch.pipeline_parallel=2")
    assert res.returncode == 2 and "srun" not in res.stdout
    err = [line for line in res.stderr.splitlines() if line.startswith("error: student")]
    assert err == [("error: student depth_0.16: planned shape 1 layers, 32 heads / 8 query "
                    "groups, ffn 12288 does not fit launch.tensor_parallel=4 x "
                    "launch.pipeline_parallel=2: num_layers 1 % pipeline_parallel 2 != 0; "
                    "change the student or the layout")]
    # TP 8: heads 32 and groups 8 divide, but a width student's query groups may not.
    res = _dry_run(f"teacher.hf_path={hf}", "launch.tensor_parallel=8",
                   "launch.pipeline_parallel=1")
    assert res.returncode in (0, 2)
    if res.returncode == 2:
        assert "% tensor_parallel 8 != 0" in res.stderr


def test_layout_problem_names_every_constraint():
    from distillscale.config import ModelArch
    from distillscale.launch.allocation import layout_problem

    arch = ModelArch(num_layers=3, hidden_size=96, ffn_hidden_size=250, num_attention_heads=6,
                     num_query_groups=3)
    assert layout_problem(arch, 1, 3, False, 64) is None
    why = layout_problem(arch, 2, 2, True, 63)
    assert why == ("num_layers 3 % pipeline_parallel 2 != 0; num_query_groups 3 % "
                   "tensor_parallel 2 != 0; seq_length 63 % tensor_parallel 2 "
                   "(sequence parallel) != 0")
    assert "num_attention_heads 6 % tensor_parallel 4" in layout_problem(arch, 4, 1, False, 64)


def test_teacher_shape_from_an_hf_config_json(tmp_path):
    from distillscale.launch.allocation import teacher_arch_from_hf

    arch, vocab = teacher_arch_from_hf(qwen3_8b_dir(tmp_path / "q"))
    assert (arch.num_layers, arch.num_query_groups, arch.kv_channels, vocab) == (36, 8, 128, 151936)
    with pytest.raises(ConfigError, match=r"config.json not found"):
        teacher_arch_from_hf(tmp_path / "missing")


def test_checkpointed_iteration_reads_megatrons_tracker(tmp_path):
    assert bridge.checkpointed_iteration(tmp_path) == 0
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("200\n")
    assert bridge.checkpointed_iteration(tmp_path) == 200
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert bridge.checkpointed_iteration(tmp_path) == 0


def test_cached_teacher_logits_are_the_local_backends(tmp_path):
    with pytest.raises(ConfigError, match="teacher_logits=cache needs distill.backend=local"):
        bridge.config_container(_cfg("distill.teacher_logits=cache"), tmp_path, tmp_path,
                                tmp_path, world_size=1)
