"""`dataset_card.md` and its figures: what is in the data set and how it was made.

Figures (PNG, next to the card): class histogram per split (the paper's figure 1), dedup
rate per round and per curation stage, a UMAP of the sentence embeddings coloured by class
(figure 10), headline length per split. The card also lists example headlines per class and
a bag-of-words baseline's scores on the test split.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from distillscale.domain import Taxonomy
from distillscale.domain_check import TRIVIAL_F1, heldout_baseline
from distillscale.manifest import write_text_atomic

SPLITS = ("train", "val", "test")


def _colors(n: int):
    cmap = plt.get_cmap("tab20")
    cmap2 = plt.get_cmap("tab20b")
    return [cmap(i % 20) if i < 20 else cmap2((i - 20) % 20) for i in range(n)]


def plot_class_histogram(splits: dict[str, list[dict]], labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, max(6, 0.28 * len(labels))))
    y = np.arange(len(labels))
    h = 0.8 / len(SPLITS)
    for i, s in enumerate(SPLITS):
        c = Counter(r["label"] for r in splits[s])
        ax.barh(y + i * h, [c.get(lb, 0) for lb in labels], height=h, label=s)
    ax.set_yticks(y + h, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("headlines (log scale)")
    ax.set_title("Class histogram per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dedup_rates(rounds: list[dict], stages: tuple[str, ...], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rounds))
    bottom = np.zeros(len(rounds))
    for s in stages:
        frac = np.array([r.get(s, 0) / max(r["generated"], 1) for r in rounds])
        ax.bar(x, frac, bottom=bottom, label=s)
        bottom += frac
    ax.set_xticks(x, [str(r["round"]) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("share of generated rows removed")
    ax.set_ylim(0, 1)
    ax.set_title("Removal rate per round and curation stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LENGTH_BINS = 40


def length_bin_edges(words: list[int], bins: int = LENGTH_BINS) -> np.ndarray:
    """Bin edges for word counts at quantiles of the data (whole words, at most `bins` bins):
    one very long row widens the last bin instead of adding a bin per word up to its length."""
    qs = np.quantile(np.asarray(words, dtype=float), np.linspace(0, 1, bins + 1))
    edges = np.unique(np.concatenate([np.floor(qs[:-1]), [np.floor(qs[-1]) + 1]]))
    return edges if len(edges) > 1 else np.array([edges[0], edges[0] + 1])


def plot_lengths(splits: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    per_split = {s: [len(r["text"].split()) for r in splits[s]] for s in SPLITS}
    every = [n for words in per_split.values() for n in words]
    edges = length_bin_edges(every) if every else None
    for s in SPLITS:
        words = per_split[s]
        if words:
            ax.hist(words, bins=edges, alpha=0.5, density=True, label=s)
    ax.set_xlabel("words per headline")
    ax.set_ylabel("density")
    ax.set_title("Headline length per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_umap(emb: np.ndarray, labels: list[str], classes: list[str], path: Path,
              seed: int, max_points: int = 4000) -> int:
    # optional: umap-learn (the `data` extra), only for the dataset card's map
    import umap

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(emb), size=min(max_points, len(emb)), replace=False))
    xy = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed,
                   n_jobs=1).fit_transform(emb[idx])
    lab = np.array(labels)[idx]
    fig, ax = plt.subplots(figsize=(10, 8))
    for color, name in zip(_colors(len(classes)), classes):
        m = lab == name
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=3, color=color, label=name)
    ax.set_title(f"UMAP of headline embeddings by class ({len(idx):,} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=3, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(idx)


def write_card(
    out: Path,
    taxonomy: Taxonomy,
    splits: dict[str, list[dict]],
    metrics: dict,
    *,
    rounds: list[dict] | None = None,
    stages: tuple[str, ...] = (),
    embeddings: np.ndarray | None = None,
    embedding_labels: list[str] | None = None,
    embedder: str | None = None,
    reject_reasons: Counter | None = None,
    settings: dict | None = None,
    umap_points: int = 4000,
    seed: int = 0,
    cross_class: dict | None = None,
) -> list[str]:
    """Write `dataset_card.md` and its PNGs into `out`; returns the figure file names."""
    out = Path(out)
    labels = taxonomy.labels
    figs = ["class_histogram.png", "length_distribution.png"]
    plot_class_histogram(splits, labels, out / figs[0])
    plot_lengths(splits, out / figs[1])
    if rounds:
        figs.append("dedup_rates.png")
        plot_dedup_rates(rounds, stages, out / "dedup_rates.png")
    umap_n = 0
    if embeddings is not None and umap_points > 0 and len(embeddings) >= 20:
        figs.append("umap_by_class.png")
        umap_n = plot_umap(embeddings, embedding_labels, labels, out / "umap_by_class.png",
                           seed, umap_points)
    lines = [
        f"# Dataset card: {taxonomy.name}",
        "",
        f"Task: {taxonomy.task} {len(labels)} classes.",
        "",
        "## Contents",
        "",
        (f"- rows in: {metrics['rows_in']:,}; kept: {metrics['rows_kept']:,}; "
         f"rejected: {metrics['rows_rejected']:,} (every rejected row is in `rejects.jsonl` "
         "with its reason)"),
        "- splits: " + ", ".join(f"{s} {len(splits[s]):,}" for s in SPLITS)
        + " (stratified by class, deterministic for a seed)",
        f"- classes present: {metrics['classes_present']} of {len(labels)}",
        ("- gold label: for synthetic rows, `gold_label` is the class the headline was "
         "generated for; `label` is the training label (equal for synthetic rows)"),
    ]
    if settings:
        lines += ["", "## How it was made", ""]
        lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    if embedder:
        lines.append(f"- embeddings (semantic dedup, UMAP): {embedder}")
    if rounds:
        lines += ["", "## Rounds", "",
                  "| round | generated | " + " | ".join(stages) + " | kept | corpus | removed |",
                  "|---" * (len(stages) + 5) + "|"]
        for r in rounds:
            lines.append(
                f"| {r['round']} | {r['generated']:,} | "
                + " | ".join(f"{r.get(s, 0):,}" for s in stages)
                + f" | {r['kept']:,} | {r['cumulative_kept']:,} | {r['dedup_rate']:.1%} |"
            )
        gen = sum(r["generated"] for r in rounds)
        kept = sum(r["kept"] for r in rounds)
        lines += ["", f"Cumulative removal rate over all rounds: {1 - kept / max(gen, 1):.1%}."]
    if cross_class is not None:
        lines += cross_class_section(cross_class)
    if reject_reasons:
        lines += ["", "## Rejected rows by reason", "", "| reason | rows |", "|---|---|"]
        for why, n in reject_reasons.most_common(15):
            lines.append(f"| {why} | {n:,} |")
    lines += baseline_section(splits, seed)
    hist = Counter(r["label"] for s in SPLITS for r in splits[s])
    lines += ["", "## Classes", "", "| class | definition | rows | train | val | test |",
              "|---|---|---|---|---|---|"]
    per = {s: Counter(r["label"] for r in splits[s]) for s in SPLITS}
    for c in taxonomy.classes:
        lines.append(f"| {c.name} | {c.definition} | {hist.get(c.name, 0):,} | "
                     + " | ".join(f"{per[s].get(c.name, 0):,}" for s in SPLITS) + " |")
    lines += ["", "## Figures", ""]
    captions = {
        "class_histogram.png": "Class histogram per split (log scale).",
        "length_distribution.png": "Headline length in words per split.",
        "dedup_rates.png": "Share of each round's generated rows removed, by curation stage.",
        "umap_by_class.png": f"UMAP of {umap_n:,} headline embeddings, coloured by class.",
    }
    for f in figs:
        lines += [f"![{captions[f]}]({f})", "", captions[f], ""]
    lines += ["## Examples per class", "", "| class | example headlines |", "|---|---|"]
    train = splits["train"] or splits["test"]
    by_class: dict[str, list[str]] = {}
    for r in train:
        if len(by_class.setdefault(r["label"], [])) < 3:
            by_class[r["label"]].append(r["text"].replace("|", "\\|"))
    for c in taxonomy.classes:
        lines.append(f"| {c.name} | " + "<br>".join(by_class.get(c.name, [])) + " |")
    write_text_atomic(out / "dataset_card.md", "\n".join(lines) + "\n")
    return figs


def baseline_section(splits: dict[str, list[dict]], seed: int = 0) -> list[str]:
    """How far a bag of words gets on this data: the score to read the teacher's against."""
    b = heldout_baseline(splits["train"], splits["test"], seed=seed)
    if b is None:
        return []
    lines = ["", "## Bag-of-words baseline", "",
             (f"TF-IDF (word 1-2-grams) + logistic regression (scikit-learn), fitted on "
              f"{b['train_rows']:,} train rows and scored on the {b['test_rows']:,} test rows: "
              f"macro F1 {b['macro_f1']:.3f}, accuracy {b['accuracy']:.3f}. The teacher's and "
              "the students' in-domain scores on the same test split are in the run's "
              "`results.csv`; a teacher at the baseline's level leaves compression little to "
              "lose.")]
    if b["macro_f1"] >= TRIVIAL_F1:
        lines.append(f"The baseline reaches macro F1 {TRIVIAL_F1} or more: word counts nearly "
                     "solve this task (`distillscale domain check` shows its giveaway n-grams).")
    return lines


def cross_class_section(cc: dict) -> list[str]:
    """Near / semantic matches between rows of two classes, and what curation did with them."""
    lines = ["", "## Cross-class near pairs", "",
             (f"Policy `data.cross_class_duplicates: {cc['policy']}`: {cc['kept']:,} row(s) kept "
             f"although a row of another class is a near or semantic match, {cc['rejected']:,} "
             "rejected as cross-class conflicts (both rows named in `rejects.jsonl`).")]
    if cc.get("top_class_pairs"):
        lines += ["", "| class | matched class | pairs |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {n:,} |" for a, b, n in cc["top_class_pairs"]]
    if cc.get("examples"):
        lines += ["", "| pass | row (class) | matched row (class) | kept |", "|---|---|---|---|"]
        for p in cc["examples"]:
            def cell(text, label):
                return f"{(text or '(not in the data set)')} ({label})".replace("|", "\\|")
            lines.append(f"| {p['stage']} | {cell(p['text'], p['label'])} | "
                         f"{cell(p['other_text'], p['other_label'])} | "
                         f"{'yes' if p['policy'] == 'keep' else 'no'} |")
    return lines
