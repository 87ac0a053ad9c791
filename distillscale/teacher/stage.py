"""The teacher stage's two halves: train the tiny scratch teacher, then supervise with it.

`train_scratch_teacher` writes `teacher/` (tokenizer, Megatron checkpoint, HF export, the
general-knowledge corpus and probe); `supervise` writes `supervision/` (per-split rows with the
teacher's labels and traces at each depth, the logit-cache keys, per-depth statistics). The
pipeline wraps each in its own atomic stage folder, so changing only the supervision settings
does not retrain the teacher.

The scratch teacher trains on three sequences per headline — the `label`, `cot_short` and
`cot_long` formats with rationales from `rationale.RationaleBuilder` — and on the knowledge
corpus (a `knowledge.fraction` share of every batch), with language modelling on every token
plus an extra cross-entropy on the answer token. The `label` format is drawn `LABEL_WEIGHT`
times as often as each CoT format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillscale.compat.console import stderr_console
from distillscale.config import ExperimentConfig
from distillscale.data.build import read_jsonl
from distillscale.distill.export import check_hf_export
from distillscale.domain import Taxonomy
from distillscale.eval.indomain import label_accuracy
from distillscale.knowledge.general import (
    PROBE_DIR,
    build_facts,
    country_lookup,
    country_name,
    knowledge_corpus,
    probe_rows,
    write_knowledge_probe,
)
from distillscale.manifest import write_text_atomic
from distillscale.models.checkpoint import load_model, save_model
from distillscale.models.hf_io import load_hf, save_hf
from distillscale.models.megatron_gpt import build_gpt, count_params, forward_logits
from distillscale.models.shape import hf_family
from distillscale.teacher.adapters import load_adapter
from distillscale.teacher.backends import make_backend
from distillscale.teacher.generate import (
    GenerationSettings,
    generate_supervision,
    supervision_stats,
)
from distillscale.teacher.logit_cache import (
    LogitCache,
    build_cache,
    cache_key,
    fingerprint_path,
    kd_sequences,
    sequences_hash,
)
from distillscale.teacher.rationale import RationaleBuilder
from distillscale.teacher.supervision import FORMAT_DEPTH, supervision_batch
from distillscale.tokenizer import (
    PROMPT_HEAD,
    PROMPT_TAIL,
    PromptEncoder,
    build_word_tokenizer,
    load_tokenizer,
    make_encoder,
)
from distillscale.train.loop import train

console = stderr_console()
CORPUS_FILE = "knowledge_corpus.txt"
# How many times the label format is drawn per CoT format when training the scratch teacher.
LABEL_WEIGHT = 3


def teacher_facts(cfg: ExperimentConfig, taxonomy: Taxonomy):
    """The fact set of this experiment: the countries of the domain's `knowledge_slot` (if it
    names one) are always in."""
    k = cfg.teacher.knowledge
    slot = taxonomy.slots.get(taxonomy.knowledge_slot) if taxonomy.knowledge_slot else None
    named = [country_name(str(v)) for v in slot] if isinstance(slot, list) else []
    include = tuple(sorted({n for n in named if n}))
    return build_facts(cfg.seed, k.countries, k.arithmetic, k.conversions, include), include


def _knowledge_ids(tok, sentences: list[str], seq_length: int) -> list[list[int]]:
    return [[tok.bos_token_id] + tok.encode(s, add_special_tokens=False)[: seq_length - 2]
            + [tok.eos_token_id] for s in sentences]


def train_scratch_teacher(cfg: ExperimentConfig, out: Path, taxonomy: Taxonomy,
                          train_rows: list[dict], val_rows: list[dict]) -> dict:
    """Train the tiny teacher into `out` (a stage temp folder); resumable. Returns metrics."""
    arch = cfg.teacher.arch
    kcfg = cfg.teacher.knowledge
    facts, include = teacher_facts(cfg, taxonomy)
    corpus = knowledge_corpus(facts)
    # Rationales cite country facts only for a domain that says its headlines name countries.
    builder = RationaleBuilder(taxonomy, train_rows,
                               country_lookup(facts) if taxonomy.knowledge_slot else None)
    rows = [{**r, "traces": builder.traces(r)} for r in train_rows]
    # The probe's questions and choices enter the vocabulary so the evaluation can ask them.
    probe_text = [" ".join([q["question"], *q["choices"]]) for q in probe_rows(facts, cfg.seed)]
    trace_text = [t for r in rows for t in r["traces"].values()]
    tok = build_word_tokenizer([r["text"] for r in train_rows] + trace_text + corpus + probe_text,
                               taxonomy.labels)
    tok.save_pretrained(out / "tokenizer")
    vocab = len(tok)
    encoder = PromptEncoder(tok, taxonomy.labels, arch.seq_length)
    (out / CORPUS_FILE).write_text("\n".join(corpus) + "\n")
    write_knowledge_probe(out / PROBE_DIR, cfg.seed, kcfg.probe_size, countries=kcfg.countries,
                     arithmetic=kcfg.arithmetic, conversions=kcfg.conversions, include=include)

    # One padded table of every training sequence; batches are cut to their longest row. The
    # label format weighs LABEL_WEIGHT times a CoT format: it is what label-constrained
    # evaluation, pruning calibration and label distillation read. Measured at the e2e test's
    # size (1,400 headlines, 220 steps): weight 1 left the teacher at 0.93 val accuracy and
    # label distillation of its depth student then raised val KL (0.076 -> 0.144); weight 3 with
    # a 0.15 knowledge share gives 0.96 and a KL that falls.
    label = encoder.encode(rows)
    parts = [label] * LABEL_WEIGHT + [encoder.encode(rows, depth=d) for d in ("cot_short", "cot_long")]
    know = _knowledge_ids(tok, corpus, arch.seq_length)
    width = max(max(p.tokens.shape[1] for p in parts), max(len(k) for k in know) - 1)

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    tokens = [pad(p.tokens, tok.pad_token_id) for p in parts]
    targets = [pad(p.targets, tok.pad_token_id) for p in parts]
    lm_mask = [pad(p.loss_mask, 0.0) for p in parts]
    ans_mask = [pad(p.answer_mask, 0.0) for p in parts]
    n_task = sum(t.shape[0] for t in tokens)
    # Repeat the corpus so it is `fraction` of the index space the loop samples batches from.
    frac = kcfg.fraction
    repeat = int(np.ceil(frac / (1 - frac) * n_task / max(len(know), 1))) if frac > 0 else 0
    kt = torch.full((len(know), width), tok.pad_token_id, dtype=torch.long)
    ky = kt.clone()
    km = torch.zeros((len(know), width))
    for i, ids in enumerate(know):
        kt[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        ky[i, : len(ids) - 1] = torch.tensor(ids[1:])
        km[i, : len(ids) - 1] = 1.0
    if repeat:
        tokens.append(kt.repeat(repeat, 1))
        targets.append(ky.repeat(repeat, 1))
        lm_mask.append(km.repeat(repeat, 1))
        ans_mask.append(torch.zeros_like(km).repeat(repeat, 1))
    tokens, targets = torch.cat(tokens), torch.cat(targets)
    lm_mask, ans_mask = torch.cat(lm_mask), torch.cat(ans_mask)

    done_marker = out / "trained.json"
    if done_marker.is_file():
        model, _, _ = load_model(out)
        history = json.loads(done_marker.read_text())["history"]
    else:
        model = build_gpt(arch, vocab)

        def loss_fn(idx, step):
            m = lm_mask[idx]
            s = int(m.sum(0).nonzero().max()) + 1
            logits = forward_logits(model, tokens[idx, :s]).float()
            b, _, v = logits.shape
            ce = F.cross_entropy(logits.reshape(-1, v), targets[idx, :s].reshape(-1),
                                 reduction="none").view(b, s)
            lm = (ce * m[:, :s]).sum() / m[:, :s].sum()
            a = ans_mask[idx, :s]
            ans = (ce * a).sum() / a.sum().clamp_min(1.0)
            # Language modelling on every token teaches headlines, rationales and facts; the
            # answer term weights the task itself.
            return lm + ans, {"answer_ce": float(ans.detach()), "lm": float(lm.detach())}

        def eval_fn(step):
            return {"val_accuracy": label_accuracy(model, encoder, val_rows)}

        result = train(model, list(model.parameters()), loss_fn, tokens.shape[0],
                       cfg.teacher.train, cfg.seed, out / "checkpoints" / "last.pt", "teacher",
                       eval_fn=eval_fn)
        history = result.history
        save_model(model, arch, vocab, out)
        done_marker.write_text(json.dumps({"history": history}))
        (out / "checkpoints" / "last.pt").unlink(missing_ok=True)
    if not (out / "hf" / "config.json").is_file():
        save_hf(model, arch, vocab, out / "hf", tokenizer=tok)
    with torch.no_grad():
        model.eval()
        know_ppl = _corpus_perplexity(model, forward_logits, kt, ky, km)
    return {
        "params": count_params(model), "vocab_size": vocab,
        "final_val_accuracy": history[-1].get("val_accuracy") if history else None,
        "knowledge_facts": len(facts), "knowledge_ppl": know_ppl,
        "training_sequences": {"task": n_task, "knowledge": len(know) * repeat},
        "history": history,
    }


# Family adapter an HF teacher gets when the config keeps the tiny teacher's default.
CHAT_FAMILY = "conf/teachers/chat.yaml"
TINY_FAMILY = "conf/teachers/tiny.yaml"
# Settings that shape a scratch teacher only; an HF teacher ignores them (one note says so).
SCRATCH_ONLY = ("arch", "train", "knowledge.fraction")


def supervision_family(cfg: ExperimentConfig) -> Path:
    """The family adapter of this teacher: `teacher.supervision.family`, except that an HF
    teacher left on the tiny family's default gets the chat-template family (`CHAT_FAMILY`)."""
    fam = cfg.teacher.supervision.family
    if cfg.teacher.source == "hf" and Path(fam) == Path(TINY_FAMILY):
        return Path(CHAT_FAMILY)
    return Path(fam)


def prompt_encoder(cfg: ExperimentConfig, teacher_dir: Path, taxonomy: Taxonomy,
                   seq_length: int | None = None):
    """(encoder, tokenizer) of this experiment's prompt format, from the teacher stage's
    tokenizer: the tiny family's `PromptEncoder`, or for an HF teacher a `ChatPromptEncoder`
    over the checkpoint's chat template and this experiment's family adapter."""
    teacher_dir = Path(teacher_dir)
    tok = load_tokenizer(teacher_dir / "tokenizer")
    if seq_length is None:
        seq_length = json.loads((teacher_dir / "checkpoint" / "arch.json").read_text())[
            "arch"]["seq_length"]
    adapter = load_adapter(supervision_family(cfg)) if cfg.teacher.source == "hf" else None
    return make_encoder(tok, taxonomy.labels, seq_length, adapter, taxonomy.task), tok


def resolve_hf_path(hf_path: str) -> Path:
    """A local HF checkpoint folder for `teacher.hf_path`: the folder itself, or a hub id
    downloaded through huggingface_hub's cache (where a hub is reachable)."""
    p = Path(hf_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"teacher.hf_path={hf_path}: no config.json in that folder")
        return p.resolve()
    if p.is_absolute() or hf_path.startswith(".") or hf_path.count("/") != 1:
        raise FileNotFoundError(f"teacher.hf_path={hf_path}: no such folder")
    # heavy: huggingface_hub (with transformers), only when a hub model is fetched
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(hf_path))
    except (OSError, ValueError, HfHubHTTPError) as e:  # offline, unknown or gated repo
        raise FileNotFoundError(f"teacher.hf_path={hf_path}: not a folder, and the hub "
                                f"download failed ({type(e).__name__}: {e})") from None


def scratch_only_settings(cfg: ExperimentConfig) -> list[str]:
    """The scratch-teacher settings this config sets that an HF teacher ignores."""
    fields = cfg.teacher.model_fields_set
    out = [f"teacher.{k}" for k in ("arch", "train") if k in fields and getattr(cfg.teacher, k)]
    if "knowledge" in fields and "fraction" in cfg.teacher.knowledge.model_fields_set:
        out.append("teacher.knowledge.fraction")
    return out


def import_hf_teacher(cfg: ExperimentConfig, out: Path, taxonomy: Taxonomy,
                      val_rows: list[dict]) -> dict:
    """The teacher stage of a pretrained teacher (`teacher.source: hf`): the checkpoint imported
    through Megatron-Bridge into `out/checkpoint/` (the Megatron model pruning and distillation
    start from, its arch read from config.json), its tokenizer and chat template in
    `out/tokenizer/`, `out/hf` linking the checkpoint itself (lm-eval, the HF backends and the
    speed comparison read it), the knowledge probe, and the imported model's in-domain
    validation accuracy (label-constrained, on its HF checkpoint). Returns metrics."""
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoTokenizer

    src = resolve_hf_path(cfg.teacher.hf_path)
    tok = AutoTokenizer.from_pretrained(str(src))
    if not tok.chat_template:
        raise ValueError(f"{src}: the tokenizer has no chat template; prompts are rendered by "
                         "it (add one to tokenizer_config.json, or use an instruct checkpoint)")
    model, arch, vocab = load_hf(src)
    save_model(model, arch, vocab, out)
    tok.save_pretrained(out / "tokenizer")
    os.symlink(src, out / "hf", target_is_directory=True)
    kcfg = cfg.teacher.knowledge
    _, include = teacher_facts(cfg, taxonomy)
    write_knowledge_probe(out / PROBE_DIR, cfg.seed, kcfg.probe_size, countries=kcfg.countries,
                     arithmetic=kcfg.arithmetic, conversions=kcfg.conversions, include=include)
    adapter = load_adapter(supervision_family(cfg))
    # The imported Megatron model must be the checkpoint: logits against transformers'.
    encoder = make_encoder(tok, taxonomy.labels, arch.seq_length, adapter, taxonomy.task)
    diff = check_hf_export(model, out / "hf", encoder.encode(val_rows[:4]).tokens)
    val_accuracy = label_accuracy(model, encoder, val_rows, hf_dir=out / "hf")
    return {
        "source": "hf", "hf_path": str(src), "hf_family": hf_family(arch),
        "hf_config": json.loads((src / "config.json").read_text()),
        "arch": arch.model_dump(mode="json"), "params": count_params(model),
        "vocab_size": vocab, "chat_template": tok.chat_template,
        "class_name_tokens": {n: len(s) for n, s in zip(taxonomy.labels, encoder.label_seqs)},
        "hf_max_abs_logit_diff": diff,
        "final_val_accuracy": val_accuracy, "val_rows": len(val_rows),
        "ignored_settings": scratch_only_settings(cfg),
    }


def _corpus_perplexity(model, forward_logits, tokens, targets, mask) -> float:
    s = int(mask.sum(0).nonzero().max()) + 1
    logits = forward_logits(model, tokens[:, :s]).float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets[:, :s].flatten(), reduction="none")
    return float(torch.exp((ce * mask[:, :s].flatten()).sum() / mask[:, :s].sum()))


# ------------------------------------------------------------------------------ supervise


def teacher_model_dir(cfg: ExperimentConfig, teacher_dir: Path) -> Path:
    """Where the generation backends load the teacher from (an HF checkpoint folder)."""
    if cfg.teacher.source == "hf":
        return Path(cfg.teacher.hf_path)
    return Path(teacher_dir) / "hf"


def supervise(cfg: ExperimentConfig, teacher_dir: Path, data_dir: Path, out: Path,
              taxonomy: Taxonomy) -> dict:
    """Generate supervision for the configured splits into `out`; returns manifest metrics."""
    sc = cfg.teacher.supervision
    adapter = load_adapter(supervision_family(cfg))
    model_dir = teacher_model_dir(cfg, teacher_dir)
    backend = make_backend(
        sc.backend, str(model_dir), batch_size=sc.batch_size, seed=cfg.seed,
        tensor_parallel=getattr(cfg.launch, "vllm_tensor_parallel", 1),
        max_logprobs=max(sc.cache.k, 20), base_url=sc.base_url, model_name=sc.model_name,
        timeout_s=sc.timeout_s,
    )
    teacher_fp = fingerprint_path(model_dir)
    settings = GenerationSettings(
        depths=list(sc.depths), shard_size=sc.shard_size, max_retries=sc.max_retries,
        retry_temperature=sc.retry_temperature, seed=cfg.seed,
        identity={"teacher": teacher_fp, "adapter": adapter.model_dump(mode="json")},
    )
    metrics: dict = {"family": adapter.family, "backend": sc.backend, "teacher": teacher_fp,
                     "depths": {}, "caches": {}}
    for split in sc.splits:
        rows = read_jsonl(Path(data_dir) / f"{split}.jsonl")
        done = generate_supervision(backend, adapter, taxonomy, rows, out / "shards" / split,
                                    settings, f"teacher supervision ({split})")
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in done))
        metrics["depths"][split] = supervision_stats(done, list(sc.depths), taxonomy.labels)
        if split == "train" and sc.cache.formats:
            metrics["caches"] = build_caches(cfg, backend, teacher_dir, adapter, done, taxonomy,
                                             teacher_fp)
    # The merged files hold everything; the shards only served resumption.
    shutil.rmtree(out / "shards", ignore_errors=True)
    return metrics


def cache_root(cfg: ExperimentConfig) -> Path:
    """Where logit caches live: `teacher.supervision.cache.dir`, by default `logit_cache/` next
    to the run folder (`runs/logit_cache`), shared by every run and student."""
    d = cfg.teacher.supervision.cache.dir
    return Path(d) if d else cfg.run_dir.parent / "logit_cache"


def build_caches(cfg, backend, teacher_dir: Path, adapter, rows: list[dict], taxonomy,
                 teacher_fp: str) -> dict:
    """A top-k logit cache per configured format over the rows the format can use."""
    cc = cfg.teacher.supervision.cache
    encoder, _ = prompt_encoder(cfg, teacher_dir, taxonomy)
    out = {}
    for fmt in cc.formats:
        depth = FORMAT_DEPTH[fmt]
        usable = [r for r in rows if depth is None or depth in (r.get("traces") or {})]
        if not usable:
            out[fmt] = {"error": f"no row has a {depth} trace"}
            continue
        sup = supervision_batch(encoder, usable, fmt)
        seqs, spans = kd_sequences(sup)
        key = cache_key(
            teacher=teacher_fp, tokenizer=fingerprint_path(Path(teacher_dir) / "tokenizer"),
            chat_template=adapter.model_dump(mode="json"),
            prompt_template=[PROMPT_HEAD, PROMPT_TAIL, fmt], data=sequences_hash(seqs, spans),
            k=cc.k, tail_samples=cc.tail_samples, seed=cfg.seed,
            **({"encoding": cc.encoding, "logprob_bits": cc.logprob_bits}
               if cc.encoding != "fp16" else {}),  # fp16 keys stay those of existing caches
        )
        cache = LogitCache(cache_root(cfg), key)
        reused = cache.complete
        build_cache(backend, seqs, spans, [r["id"] for r in usable], cc.k, cache, cc.shard_size,
                    meta={"format": fmt, "teacher": teacher_fp}, desc=f"logit cache ({fmt})",
                    tail_samples=cc.tail_samples, seed=cfg.seed, encoding=cc.encoding,
                    logprob_bits=cc.logprob_bits)
        idx = cache.index()
        out[fmt] = {"key": key, "path": str(cache.path), "reused": reused, "rows": idx["rows"],
                    "tokens": idx["tokens"], "bytes_per_token": round(idx["bytes_per_token"], 1)}
    return out
