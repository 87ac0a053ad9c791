"""In-domain evaluation: predictions and metrics with bootstrap CIs.

Two scoring modes:
- label-constrained: argmax over the classes only, no parse failures, so the metric measures the
  classifier, not the format. Single-token class names (the tiny family) read one logit per
  class at the answer position; multi-token names (a pretrained teacher's tokenizer) are scored
  by summed log-likelihood, one prompt forward and the names on its KV cache;
- generative: greedy decoding of the model's own output (its reasoning, then the answer), the
  class parsed from the text after the reasoning; unparseable outputs count as wrong and their
  share is reported as `parse_failure_rate`.

Every model is scored either as a Megatron-core model or, for a student that exists only as
an HF export (one distilled on the Bridge path), as a transformers causal LM: `answer_logits`
takes either.

Every metric (macro / weighted F1, accuracy, gold-label accuracy, per-class F1, each
confusion-matrix cell) gets a percentile-bootstrap 95% CI from the same resampled rows.
"""

from __future__ import annotations

import copy
import re
import sys

import numpy as np
import torch

from distillscale.models.megatron_gpt import forward_logits, logits_at
from distillscale.models.shared_prefix import common_prefix_length as _common_prefix
from distillscale.tokenizer import PromptEncoder


@torch.no_grad()
def predict_labels(model, encoder: PromptEncoder, rows: list[dict], batch_size: int = 128,
                   hf_dir=None) -> np.ndarray:
    """Class index predicted for each row (label-constrained: argmax over the classes).

    `model`: a Megatron-core model, or a transformers causal LM (`is_hf_model`).

    Single-token class names: one forward, the class tokens' logits at the answer position.
    Multi-token names (a pretrained teacher's tokenizer): summed log-likelihood of each name;
    on a transformers `model`, or with `hf_dir` (the model's HF export), by
    `class_scores_cached` (one prompt forward, every continuation on the cached prefix), else
    by `class_scores_full` on `model`.
    """
    if multi_token(encoder):
        if is_hf_model(model):
            return class_scores_cached(model, encoder, rows, batch_size).argmax(-1).numpy()
        if hf_dir is not None:
            return class_scores_cached(hf_causal_lm(hf_dir), encoder, rows, batch_size).argmax(-1).numpy()
        return class_scores_full(model, encoder, rows, max(batch_size // len(encoder.labels), 1)
                                 ).argmax(-1).numpy()
    class_ids = torch.tensor(encoder.label_token_ids)
    preds = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        b = encoder.encode(rows[i : i + batch_size])
        at_answer = answer_logits(model, b.tokens, b.answer_pos)
        preds.append(at_answer[:, class_ids].argmax(-1))
    return torch.cat(preds).numpy()


def multi_token(encoder) -> bool:
    """Whether some class name spans several tokens (a pretrained teacher's tokenizer)."""
    return not getattr(encoder, "single_token", True) or any(
        len(s) > 1 for s in getattr(encoder, "label_seqs", []))


def label_accuracy(model, encoder, rows: list[dict], hf_dir=None) -> float:
    """Label-constrained accuracy of `model` on `rows` (`predict_labels`, on `hf_dir`'s export
    when given)."""
    index = {n: i for i, n in enumerate(encoder.labels)}
    y = np.array([index[r["label"]] for r in rows])
    return float((predict_labels(model, encoder, rows, hf_dir=hf_dir) == y).mean())


def hf_causal_lm(hf_dir):
    """An HF export as a transformers causal LM for scoring: bf16 on the GPU, fp32 on CPU."""
    # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()



def is_hf_model(model) -> bool:
    """Whether `model` is a transformers model (else a Megatron-core one)."""
    # No import: a transformers model exists only once transformers' modeling code is loaded.
    loaded = sys.modules.get("transformers.modeling_utils")
    return loaded is not None and isinstance(model, loaded.PreTrainedModel)


def answer_logits(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[batch, seq] token ids -> [batch, vocab] logits at one position per row, of a
    Megatron-core model (`logits_at`: the head on those rows only) or a transformers causal LM (on CPU,
    fp32). Both attend to every earlier token, padding included, with positions 0..seq-1."""
    if is_hf_model(model):
        device = next(model.parameters()).device
        # The LM head on the scored rows only: over every position it would hold
        # [batch, seq, vocab] logits (GBs at a 150k vocabulary).
        hidden = model.base_model(input_ids=tokens.to(device)).last_hidden_state
        hidden = hidden[torch.arange(len(positions), device=device), positions.to(device)]
        return model.get_output_embeddings()(hidden).float().cpu()
    return logits_at(model, tokens, positions)


@torch.no_grad()
def class_scores_full(model, encoder, rows: list[dict], batch_size: int = 16) -> torch.Tensor:
    """[rows, classes] summed log-likelihood of each class name after the prompt, by a full
    forward of the Megatron `model` over prompt + name for every (row, class): exact, and
    `len(classes)` times the cost of `class_scores_cached`. The reference the cached scorer is
    tested against, and the scorer for models with no HF export (a student during training)."""
    model.eval()
    seqs = encoder.label_seqs
    k = len(seqs)
    out = []
    for i in range(0, len(rows), batch_size):
        prompts = [encoder.prompt_ids(r["text"]) for r in rows[i : i + batch_size]]
        pairs = [(p, s) for p in prompts for s in seqs]
        width = max(len(p) + len(s) for p, s in pairs) - 1
        toks = torch.full((len(pairs), width), encoder.pad_id, dtype=torch.long)
        for j, (p, s) in enumerate(pairs):
            ids = (p + s)[:-1]
            toks[j, : len(ids)] = torch.tensor(ids)
        lp = torch.log_softmax(forward_logits(model, toks).float(), -1)
        scores = torch.zeros(len(pairs))
        for j, (p, s) in enumerate(pairs):
            at = torch.arange(len(p) - 1, len(p) - 1 + len(s))
            scores[j] = lp[j, at, torch.tensor(s)].sum()
        out.append(scores.view(len(prompts), k))
    return torch.cat(out) if out else torch.zeros(0, k)


# Upper bound on the positions whose logits one scoring forward holds.
MAX_SCORED_POSITIONS = 1024


@torch.no_grad()
def class_scores_cached(hf_model, encoder, rows: list[dict], batch_size: int = 32) -> torch.Tensor:
    """[rows, classes] summed log-likelihood of each class name after the prompt, from a
    transformers causal LM, with one forward per batch of rows:
    - the prefix every prompt shares (system turn, task, class list) is run once and its KV
      cache reused by every row;
    - each row's own prompt tokens and the continuations of every class name are packed into
      one sequence after that cache, under a tree attention mask: a class's tokens see the
      prefix, the row's prompt and the earlier tokens of the same class only, at the positions
      they would have in `prompt + name`;
    - the LM head runs only where a class token is predicted.
    Cost: a row's own tokens plus the class names' tokens, instead of a full forward of
    prompt + name per class (`class_scores_full`, the reference it is tested against).

    Written here because lm-eval's loglikelihood requests re-encode the whole context per
    choice; transformers has the KV cache and custom 4D masks but no scorer over a fixed set
    of continuations."""
    k = len(encoder.label_seqs)
    if not rows:
        return torch.zeros(0, k)
    device = next(hf_model.parameters()).device
    dtype = next(hf_model.parameters()).dtype
    seqs = encoder.label_seqs
    prompts = [encoder.prompt_ids(r["text"]) for r in rows]
    n_pre = _common_prefix(prompts)
    # The packed continuations: class c's input tokens are its name without the last token,
    # one after the other in the class region.
    cls_of, t_of = [], []
    for c, s in enumerate(seqs):
        cls_of += [c] * (len(s) - 1)
        t_of += list(range(len(s) - 1))
    n_cls = len(cls_of)
    cls_of_t, t_of_t = torch.tensor(cls_of, dtype=torch.long), torch.tensor(t_of, dtype=torch.long)
    cont = torch.tensor([t for s in seqs for t in s[:-1]], dtype=torch.long)
    nxt = torch.tensor([[t for s in seqs for t in s[1:]]], dtype=torch.long)  # what each predicts
    first = torch.tensor([s[0] for s in seqs], dtype=torch.long)
    # Logits of every scored position are held at once: bound the rows per forward so a batch
    # holds MAX_SCORED_POSITIONS x vocab floats (~200 MB at a 49k vocabulary).
    batch_size = max(1, min(batch_size, MAX_SCORED_POSITIONS // (1 + n_cls)))
    prefix_cache = None
    if n_pre:
        prefix_cache = hf_model(input_ids=torch.tensor([prompts[0][:n_pre]], device=device),
                                use_cache=True, logits_to_keep=1).past_key_values
    neg = torch.finfo(dtype).min
    # A class token sees its own class's earlier tokens (and itself), no other class's.
    same_class = (cls_of_t[:, None] == cls_of_t[None, :]) & (t_of_t[None, :] <= t_of_t[:, None])
    out = []
    for i in range(0, len(rows), batch_size):
        own = [p[n_pre:] for p in prompts[i : i + batch_size]]
        b, width = len(own), max(len(p) for p in own)
        q = width + n_cls
        # Each row's own tokens are left-padded inside their region, so the last prompt token
        # (which predicts every class's first token) sits at index width - 1 in every row.
        ids = torch.full((b, q), encoder.pad_id, dtype=torch.long)
        pos = torch.zeros((b, q), dtype=torch.long)
        allow = torch.zeros((b, q, n_pre + q), dtype=torch.bool)
        allow[:, :, :n_pre] = True  # everything sees the shared prefix
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        eye = torch.eye(width, dtype=torch.bool)
        for j, p in enumerate(own):
            pad = width - len(p)
            ids[j, pad:width] = torch.tensor(p)
            ids[j, width:] = cont
            pos[j, pad:width] = torch.arange(n_pre, n_pre + len(p))
            pos[j, width:] = n_pre + len(p) + t_of_t
            real = torch.zeros(width, dtype=torch.bool)
            real[pad:] = True
            # A padding query sees itself: no attention row is empty (an empty one is NaN).
            allow[j, :width, n_pre : n_pre + width] = (causal & real[None, :]) | eye
            allow[j, width:, n_pre : n_pre + width] = real[None, :]
            allow[j, width:, n_pre + width :] = same_class
        mask = torch.zeros((b, 1, q, n_pre + q), dtype=dtype).masked_fill(~allow[:, None], neg)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(b)
        keep = torch.cat([torch.tensor([width - 1]), width + torch.arange(n_cls)])
        logits = hf_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                          position_ids=pos.to(device), past_key_values=cache, use_cache=False,
                          logits_to_keep=keep.to(device)).logits
        logits = logits.float().cpu()  # [b, 1 + n_cls, vocab]
        lse = torch.logsumexp(logits, -1)
        scores = logits[:, 0, first] - lse[:, :1]  # [b, k]: every class's first token
        scores.index_add_(1, cls_of_t, logits[:, 1:].gather(-1, nxt.expand(b, -1)[..., None])[..., 0]
                          - lse[:, 1:])
        out.append(scores)
    return torch.cat(out)


@torch.no_grad()
def generate_labels(
    model, encoder: PromptEncoder, rows: list[dict], max_new_tokens: int = 48,
    depth: str | None = None, batch_size: int = 128,
) -> tuple[np.ndarray, list[str]]:
    """Greedy generation, then `parse_answer`: (class index or -1 per row, generated texts).

    With `depth` (`cot_short` / `cot_long`) the prompt opens the model's reasoning with that
    thinking token, as the CoT-supervised students were trained; otherwise it ends at the
    answer cue and the model answers directly. `model`: Megatron-core or transformers.
    """
    texts: list[str] = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        prompts = []
        for r in rows[i : i + batch_size]:
            if hasattr(encoder, "adapter"):  # a chat teacher's format: its depth's own prompt
                prompts.append(encoder.prompt_ids(r["text"], depth))
                continue
            ids = encoder.prompt_ids(r["text"])
            if depth is not None:
                open_id = encoder.think_open_ids.get(depth)
                if open_id is None:
                    raise ValueError(f"depth {depth!r}: this tokenizer has no thinking token")
                ids = ids[: len(ids) - len(encoder.tail_ids)] + [open_id]
            prompts.append(ids)
        gen = _greedy(model, encoder, prompts, max_new_tokens)
        if depth is not None and not hasattr(encoder, "adapter"):
            # The reasoning was opened by the prompt: keep its marker so that an output that
            # never closes it parses as "no answer", not as the classes it mentions.
            gen = [f"{encoder.tok.convert_ids_to_tokens(open_id)} {g}" for g in gen]
        texts += gen
    preds = np.array([parse_answer(t, encoder.labels) for t in texts], dtype=int)
    return preds, texts


def _greedy(model, encoder: PromptEncoder, prompts: list[list[int]], max_new: int) -> list[str]:
    # Full recompute per step (no KV cache): the models scored this way on CPU are tiny, and
    # megatron-core's inference engine needs CUDA. Left padding keeps every row's last prompt
    # token at the same position (and a transformers model sees what a Megatron one does).
    budget = encoder.seq_length
    seqs = [p[-(budget - 1):] for p in prompts]
    done = [False] * len(seqs)
    out: list[list[int]] = [[] for _ in seqs]
    for _ in range(max_new):
        width = max(len(s) for s in seqs)
        if width >= budget or all(done):
            break
        toks = torch.full((len(seqs), width), encoder.pad_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            toks[j, width - len(s):] = torch.tensor(s)
        last = torch.full((len(seqs),), width - 1, dtype=torch.long)
        nxt = answer_logits(model, toks, last).argmax(-1).tolist()
        for j, t in enumerate(nxt):
            if done[j]:
                continue
            if t == encoder.eos_id:
                done[j] = True
                continue
            seqs[j].append(t)
            out[j].append(t)
    return [encoder.tok.decode(o, skip_special_tokens=False) for o in out]


def parse_answer(text: str, labels: list[str], aliases: dict[str, list[str]] | None = None) -> int:
    """Class index named in the answer part of `text`, or -1 (a parse failure).

    The answer part is what follows the last `</think>` (the end of the reasoning), and within
    it what follows the last answer cue (`event :` / `answer:`) if any; the first class name
    (or alias) found there is the answer. Class names inside the reasoning never count.
    """
    low = text.lower()
    if "</think>" in low:
        low = low.rsplit("</think>", 1)[1]
    elif "<think" in low:
        return -1  # reasoning never closed: no answer was given
    cues = [m.end() for m in re.finditer(r"(event\s*:|answer\s*:)", low)]
    if cues:
        low = low[cues[-1]:]
    names = {n.lower(): i for i, n in enumerate(labels)}
    for i, n in enumerate(labels):
        for a in (aliases or {}).get(n, []):
            names.setdefault(a.lower(), i)
    best, where, best_len = -1, len(low) + 1, 0
    for name, i in names.items():
        m = re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", low)
        # Earliest mention wins; at the same place the longer name (a more specific class).
        if m and (m.start() < where or (m.start() == where and len(name) > best_len)):
            best, where, best_len = i, m.start(), len(name)
    return best


def _from_confusion(cm: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro / weighted F1 and accuracy from a confusion matrix (rows = truth), restricted to
    `labels` as scikit-learn's `f1_score(labels=...)` is. Computing them from counts lets the
    bootstrap resample thousands of times without re-running scikit-learn per draw."""
    tp = np.diag(cm)[labels].astype(float)
    support = cm.sum(1)[labels].astype(float)
    predicted = cm.sum(0)[labels].astype(float)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
    }


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_gold: np.ndarray | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    parse_failures: bool = False,
) -> dict[str, dict[str, float]]:
    """Each headline metric's value and percentile-bootstrap 95% CI (rows resampled with
    replacement). `score_detailed` adds per-class F1 and the confusion matrix.

    F1 averages over the classes that occur in the labels or the predictions (scikit-learn's
    default): a class absent from a small test split neither helps nor hurts. A prediction of
    -1 (generative output with no parseable class) is wrong for every class; with
    `parse_failures` its share is reported as `parse_failure_rate`.
    `gold_accuracy` compares with the class each headline was generated for.
    """
    return score_detailed(y_true, y_pred, y_gold, bootstrap, seed, parse_failures)[0]


def _ci(point: float, samples: np.ndarray, bootstrap: int) -> dict[str, float]:
    lo = hi = point
    if bootstrap:
        lo, hi = (float(v) for v in np.percentile(samples, [2.5, 97.5]))
    return {"value": float(point), "ci_low": lo, "ci_high": hi}


def score_detailed(
    y_true, y_pred, y_gold=None, bootstrap: int = 200, seed: int = 0,
    parse_failures: bool = False, class_names: list[str] | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict], list[dict]]:
    """(headline metrics, per-class F1 rows, confusion-matrix rows), all with 95% CIs.

    Per-class rows: `label`, `support`, `value` (F1), `ci_low`, `ci_high`. Confusion rows:
    `true`, `pred` (`<no answer>` for parse failures), `count`, `ci_low`, `ci_high` (counts
    under resampling), for every cell that is non-zero in the data.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    n = len(y_true)
    if n == 0:
        raise ValueError("no rows to score")
    k = int(max(y_true.max(), y_pred.max(), 0)) + 1
    if class_names is not None:
        k = max(k, len(class_names))
    failed = y_pred < 0
    # Parse failures go to an extra "no answer" column k: wrong for every class.
    p_col = np.where(failed, k, y_pred)
    labels = np.unique(np.concatenate([y_true, y_pred[~failed]]))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (bootstrap, n))

    def confusion(y, p):
        return np.bincount(y * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    cm = confusion(y_true, p_col)
    cms = np.stack([confusion(y_true[d], p_col[d]) for d in draws]) if bootstrap else cm[None]
    point = _from_confusion(cm, labels)
    samples = [_from_confusion(c, labels) for c in cms]
    extra_point: dict[str, float] = {}
    extra_samples: dict[str, np.ndarray] = {}
    if y_gold is not None:
        y_gold = np.asarray(y_gold)
        hit = (y_gold == y_pred).astype(float)
        extra_point["gold_accuracy"] = hit.mean()
        extra_samples["gold_accuracy"] = hit[draws].mean(1) if bootstrap else hit.mean()[None]
    if parse_failures:
        extra_point["parse_failure_rate"] = failed.mean()
        extra_samples["parse_failure_rate"] = (
            failed[draws].mean(1) if bootstrap else failed.mean()[None])
    out = {name: _ci(v, np.array([s[name] for s in samples]), bootstrap)
           for name, v in point.items()}
    out.update({name: _ci(v, extra_samples[name], bootstrap) for name, v in extra_point.items()})

    names = class_names or [str(i) for i in range(k)]
    f1_all = _per_class_f1(cms)  # [draws, k]
    f1_point = _per_class_f1(cm[None])[0]
    support = cm.sum(1)
    per_class = []
    for c in labels:
        row = {"label": names[c], "support": int(support[c]),
               **_ci(f1_point[c], f1_all[:, c], bootstrap)}
        per_class.append(row)
    cells = []
    lo, hi = (np.percentile(cms, [2.5, 97.5], axis=0) if bootstrap else (cm, cm))
    for t, p in zip(*np.nonzero(cm)):
        cells.append({"true": names[t], "pred": names[p] if p < k else "<no answer>",
                      "count": int(cm[t, p]), "ci_low": float(lo[t, p]),
                      "ci_high": float(hi[t, p])})
    return out, per_class, cells


def _per_class_f1(cms: np.ndarray) -> np.ndarray:
    """F1 of every class in each of a stack of confusion matrices [b, k, k + 1]."""
    k = cms.shape[1]
    tp = cms[:, np.arange(k), np.arange(k)].astype(float)
    denom = cms.sum(2)[:, :k] + cms.sum(1)[:, :k]
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
