"""RUN/report/: the run's pictures as PNGs, and one self-contained index.html (pictures inline, no
network) with them and the metric tables. Drawn from the run's JSON alone (eval.json, report/figures.json,
metrics.jsonl), so `clip-pipe report RUN` redraws it any time; no torch, no model."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

SUMMARY_COLUMNS = [  # (result key, row header, format)
    ("kind", "kind", "{}"),
    ("num_samples", "samples", "{}"),
    ("top1", "zero-shot top-1", "pct"),
    ("top5", "zero-shot top-5", "pct"),
    ("mean_per_class_recall", "mean per-class recall", "pct"),
    ("linear_probe_top1", "linear probe top-1", "pct"),
    ("image_retrieval_recall@1", "text→image R@1", "pct"),
    ("image_retrieval_recall@5", "text→image R@5", "pct"),
    ("image_retrieval_recall@10", "text→image R@10", "pct"),
    ("text_retrieval_recall@1", "image→text R@1", "pct"),
    ("text_retrieval_recall@5", "image→text R@5", "pct"),
    ("text_retrieval_recall@10", "image→text R@10", "pct"),
    ("kmeans_nmi", "k-means NMI", "{:.3f}"),
    ("kmeans_ari", "k-means ARI", "{:.3f}"),
    ("alignment", "alignment", "{:.3f}"),
    ("uniformity_image", "uniformity (images)", "{:.3f}"),
    ("uniformity_text", "uniformity (texts)", "{:.3f}"),
]


def read_results(run_dir: Path) -> dict:
    """The run's eval results: eval.json, or zeroshot.json for runs from before eval.json."""
    for name in ("eval.json", "zeroshot.json"):
        path = Path(run_dir) / name
        if path.is_file():
            results = json.loads(path.read_text())
            for r in results.values():
                r.setdefault("kind", "classification")  # zeroshot.json held classification sets only
            return results
    raise ValueError(f"{run_dir}: no eval.json (or zeroshot.json); is this a run directory?")


def write_report(run_dir: str | Path) -> Path:
    """Draw every picture the run's records allow and write RUN/report/index.html; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    figures_path = out / "figures.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    metrics_path = run_dir / "metrics.jsonl"
    records = []
    if metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]

    sections = [f"<h2>Metrics</h2>\n{_summary_table(results)}"]
    png = _geometry_over_training(records)
    if png:
        sections.append(_figure(out, "alignment_uniformity.png", png, _GEOMETRY_CAPTION, "over training"))
    for name, r in results.items():
        parts = [f"<h2>{html.escape(name)} ({r['kind']})</h2>"]
        slug = re.sub(r"[^\w.-]+", "_", name)
        if "confusion" in r:
            parts.append(_figure(out, f"{slug}_confusion.png", _confusion(r), "Zero-shot confusion matrix."))
        if "per_class_accuracy" in r:
            parts.append(
                _figure(out, f"{slug}_per_class.png", _per_class(r), "Zero-shot accuracy per class.")
            )
            parts.append(_per_class_table(r))
        fig = figures.get(name, {})
        if fig.get("map"):
            parts.append(_figure(out, f"{slug}_map.png", _map(fig["map"]), _MAP_CAPTION))
        if fig.get("similarity"):
            parts.append(_figure(out, f"{slug}_similarity.png", _similarity(fig["similarity"]), _SIM_CAPTION))
        if fig.get("retrieval"):
            parts.append(
                _figure(out, f"{slug}_retrieval.png", _retrieval(fig["retrieval"]), _RETRIEVAL_CAPTION)
            )
        sections.append("\n".join(parts))
    title = f"clip-pipe report: {html.escape(run_dir.name)}"
    page = _PAGE.format(title=title, body="\n".join(sections))
    (out / "index.html").write_text(page)
    return out / "index.html"


_GEOMETRY_CAPTION = (
    "Alignment (mean squared distance of positive image–text pairs; lower is better) and uniformity "
    "(log E exp(−2‖x−y‖²) over pairs; lower is more spread, 0 is collapse) of each eval set, over training."
)
_MAP_CAPTION = (
    "Eval image embeddings projected on their first two principal components, coloured by class; "
    "each class's text embedding is a star of its colour."
)
_SIM_CAPTION = "Cosine similarity of sample images (rows) with texts (columns); the true text is boxed."
_RETRIEVAL_CAPTION = "Retrieval examples: each caption's five nearest images; the true image is framed green."
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #444; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


def _fmt(value, how: str) -> str:
    if value is None:
        return "–"
    if how == "pct":
        return f"{100 * value:.2f}%"
    return how.format(value)


def _summary_table(results: dict) -> str:
    """One row per metric, one column per eval set (sets are few, metrics many)."""
    names = list(results)
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    rows = [
        f"<tr><td>{html.escape(header)}</td>"
        + "".join(f"<td>{_fmt(results[n].get(key), how)}</td>" for n in names)
        + "</tr>"
        for key, header, how in SUMMARY_COLUMNS
        if any(key in r for r in results.values())
    ]
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _per_class_table(r: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{100 * a:.2f}%</td></tr>"
        for c, a in r["per_class_accuracy"].items()
    )
    return f'<table class="per-class"><tr><th>class</th><th>zero-shot accuracy</th></tr>{rows}</table>'


def _figure(out: Path, filename: str, png: bytes, caption: str, alt: str | None = None) -> str:
    (out / filename).write_bytes(png)
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt or filename)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _confusion(r: dict) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    confusion = np.array(r["confusion"], dtype=float)
    names = list(r["per_class_accuracy"]) if len(r["per_class_accuracy"]) == len(confusion) else None
    rates = confusion / confusion.sum(axis=1, keepdims=True).clip(min=1)
    size = max(4, 0.45 * len(confusion) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    if len(confusion) <= 40:
        labels = names or [str(i) for i in range(len(confusion))]
        ax.set_xticks(range(len(confusion)), labels, rotation=90)
        ax.set_yticks(range(len(confusion)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{r['eval_set']}: zero-shot top-1 {100 * r['top1']:.1f}%")
    return _png(fig)


def _per_class(r: dict) -> bytes:
    import matplotlib.pyplot as plt

    names, accuracy = list(r["per_class_accuracy"]), list(r["per_class_accuracy"].values())
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    ax.bar(range(len(names)), [100 * a for a in accuracy], color="tab:blue")
    ax.axhline(100 * r["top1"], color="tab:red", linestyle="--", label=f"overall {100 * r['top1']:.1f}%")
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    return _png(fig)


def _map(data: dict) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    points = np.array(data["points"])
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(data["classnames"] or []) <= 10 else "tab20")
    if data["labels"] is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5)
    else:
        labels = np.array(data["labels"])
        for c, name in enumerate(data["classnames"]):
            mine = labels == c
            if mine.any():
                ax.scatter(
                    points[mine, 0], points[mine, 1], s=4, alpha=0.5, color=cmap(c % cmap.N), label=name
                )
        if data["class_points"]:
            for c, (x, y) in enumerate(data["class_points"]):
                ax.scatter([x], [y], marker="*", s=300, color=cmap(c % cmap.N), edgecolors="black", zorder=3)
        if len(data["classnames"]) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("image embeddings (PCA)" + ("; ★ class text embeddings" if data["class_points"] else ""))
    return _png(fig)


def _similarity(data: dict) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    values = np.array(data["values"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * values.shape[1] + 3), max(4, 0.4 * values.shape[0] + 2)))
    image = ax.imshow(values, cmap="viridis")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_yticks(range(len(data["row_labels"])), data["row_labels"], fontsize=7)
    short = [c if len(c) <= 30 else c[:29] + "…" for c in data["col_labels"]]
    ax.set_xticks(range(len(short)), short, rotation=90, fontsize=7)
    for row, col in enumerate(data["true_col"]):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("texts")
    ax.set_ylabel("images")
    return _png(fig)


def _retrieval(data: dict) -> bytes:
    import matplotlib.pyplot as plt
    from PIL import Image

    queries = data["queries"]
    fig, axes = plt.subplots(len(queries), 5, figsize=(10, 2.3 * len(queries)), squeeze=False)
    for row, query in enumerate(queries):
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(query["top"]):
                ax.axis("off")
                continue
            hit = query["top"][col]
            thumbnail = data["thumbnails"].get(hit["key"])
            if thumbnail:
                ax.imshow(Image.open(io.BytesIO(base64.b64decode(thumbnail))))
            true = hit["key"] == query["true_key"]
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if true else "lightgray")
                spine.set_linewidth(5 if true else 1)
            ax.set_xlabel(f"#{col + 1}  {hit['score']:.2f}", fontsize=8)
        caption = query["caption"] if len(query["caption"]) <= 80 else query["caption"][:79] + "…"
        axes[row][0].set_title(f"“{caption}”", loc="left", fontsize=9)
    return _png(fig)


def _geometry_over_training(records: list[dict]) -> bytes | None:
    import matplotlib.pyplot as plt

    evals = [r for r in records if "alignment" in r and "eval_set" in r]
    if not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in dict.fromkeys(r["eval_set"] for r in evals):
        mine = [r for r in evals if r["eval_set"] == name]
        steps = [r["step"] for r in mine]
        (line,) = axes[0].plot(steps, [r["alignment"] for r in mine], marker="o", label=name)
        color = line.get_color()  # one colour per set; images solid, texts dashed
        axes[1].plot(
            steps, [r["uniformity_image"] for r in mine], marker="o", color=color, label=f"{name} images"
        )
        axes[1].plot(
            steps, [r["uniformity_text"] for r in mine], marker="s", linestyle="--", color=color,
            label=f"{name} texts",
        )  # fmt: skip
    axes[0].set_title("alignment (lower: positive pairs closer)")
    axes[1].set_title("uniformity (lower: more spread; 0: collapsed)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)
