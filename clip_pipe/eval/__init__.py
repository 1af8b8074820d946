"""Evaluation: embed an eval set once (all ranks), then score it with every metric that applies.

sets.py         readers: CLIP_benchmark's WebDataset layout; make_shards.py folders for retrieval
embed.py        the one distributed pass (padded, ZeRO-3 safe) -> Embeddings
zeroshot.py retrieval.py geometry.py clustering.py linear_probe.py
                pure: Embeddings -> {metric: value}
figures.py      the data behind the report's pictures (PCA map, similarities, retrieval examples)
report.py       RUN/report/index.html and its PNGs from the run's JSON; no torch
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from clip_pipe.eval.clustering import kmeans_scores
from clip_pipe.eval.embed import Embeddings, classifier_weights, embed, encode_texts
from clip_pipe.eval.geometry import alignment_uniformity
from clip_pipe.eval.linear_probe import linear_probe
from clip_pipe.eval.retrieval import retrieval_recall
from clip_pipe.eval.sets import EvalSet, read_eval_set
from clip_pipe.eval.zeroshot import zeroshot_classification

__all__ = [
    "METRICS",
    "Embeddings",
    "EvalSet",
    "classifier_weights",
    "configured_sets",
    "embed",
    "encode_texts",
    "evaluate",
    "format_results",
    "logged_metrics",
    "read_eval_set",
    "score",
    "score_on_main",
    "to_clip_benchmark",
]  # fmt: skip

# name -> (does it apply to these embeddings?, the metric). Each runs wherever its inputs exist.
METRICS: dict[str, tuple[Callable[[Embeddings], bool], Callable[[Embeddings], dict]]] = {
    "zeroshot": (lambda e: e.class_texts is not None and e.labels is not None, zeroshot_classification),
    "retrieval": (lambda e: e.texts is not None, retrieval_recall),
    "geometry": (
        lambda e: e.texts is not None or (e.class_texts is not None and e.labels is not None),
        alignment_uniformity,
    ),
    "clustering": (lambda e: e.labels is not None and e.num_classes > 1, kmeans_scores),
}


def score(emb: Embeddings, probe_train: Embeddings | None = None) -> dict:
    """Every applicable metric of one embedded set; the linear probe where `probe_train` is given and the
    set has labels. Pure: no model, no ranks."""
    kind = "classification" if emb.class_texts is not None else "retrieval"
    results = {
        "eval_set": emb.name,
        "kind": kind,
        "num_samples": len(emb.keys),
        "num_skipped": emb.num_skipped,
    }
    for applies, metric in METRICS.values():
        if applies(emb):
            results.update(metric(emb))
    if probe_train is not None and emb.labels is not None:
        results.update(linear_probe(probe_train, emb))
    return results


def evaluate(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    eval_set: EvalSet,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    probe_train: Embeddings | None = None,
) -> dict:
    """Embed `eval_set` over all ranks, score it on rank 0, and return the results on every rank."""
    emb = embed(model, preprocess, tokenizer, eval_set, batch_size, rank, world_size, device, dtype)
    return score_on_main(emb, probe_train, rank, world_size)


def score_on_main(emb: Embeddings, probe_train: Embeddings | None, rank: int, world_size: int) -> dict:
    """`score` once, on rank 0 (k-means and the probe cost CPU time), its results sent to every rank."""
    box = [score(emb, probe_train) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def configured_sets(cfg) -> tuple[list[EvalSet], EvalSet | None]:
    """The eval sets of an `EvalConfig` (classification, then retrieval) and the linear probe's training
    set, each read and checked now, so a wrong path fails before any training."""
    sets = [read_eval_set(path) for path in cfg.sets]
    for path, s in zip(cfg.sets, sets, strict=True):
        if s.kind != "classification":
            raise ValueError(f"eval.sets: {path} is a {s.kind} set; list it under eval.retrieval_sets")
    retrieval = [read_eval_set(path) for path in cfg.retrieval_sets]
    for path, s in zip(cfg.retrieval_sets, retrieval, strict=True):
        if s.kind != "retrieval":
            raise ValueError(f"eval.retrieval_sets: {path} is a {s.kind} set; list it under eval.sets")
    if len({s.name for s in sets + retrieval}) < len(sets + retrieval):
        raise ValueError("eval sets must have distinct folder names: results are keyed by them")
    probe = read_eval_set(cfg.linear_probe_train) if cfg.linear_probe_train else None
    return sets + retrieval, probe


def logged_metrics(r: dict) -> dict:
    """The scalar results of one set, for metrics.jsonl; zero-shot accuracies get a `zeroshot_` prefix."""
    renamed = {
        "top1": "zeroshot_top1",
        "top5": "zeroshot_top5",
        "mean_per_class_recall": "zeroshot_mean_per_class_recall",
    }
    return {
        renamed.get(k, k): v
        for k, v in r.items()
        if isinstance(v, float) and k not in ("num_samples", "num_skipped")
    }


def format_results(r: dict) -> str:
    head = f"{r['eval_set']}: "
    if r["kind"] == "classification":
        head += (
            f"top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
            f"mean per-class recall {100 * r['mean_per_class_recall']:.2f}%  "
        )
    else:
        head += "  ".join(
            f"{d} R@{k} {100 * r[f'{name}_retrieval_recall@{k}']:.2f}%"
            for name, d in (("image", "text->image"), ("text", "image->text"))
            for k in (1, 5, 10)
        )
        head += "  "
    if "linear_probe_top1" in r:
        head += f"linear probe {100 * r['linear_probe_top1']:.2f}%  "
    if "kmeans_nmi" in r:
        head += f"k-means NMI {r['kmeans_nmi']:.3f} ARI {r['kmeans_ari']:.3f}  "
    if "alignment" in r:
        head += (
            f"alignment {r['alignment']:.3f} uniformity {r['uniformity_image']:.3f} (images) "
            f"{r['uniformity_text']:.3f} (texts)  "
        )
    unit = "images" if r["kind"] == "classification" else "samples"
    return head + f"({r['num_samples']} {unit}, {r['num_skipped']} skipped)"


def to_clip_benchmark(results: dict, model: str, pretrained: str, language: str = "en") -> list[dict]:
    """CLIP_benchmark's result records (one per dataset and task), as its `clip_benchmark eval` writes."""
    records = []

    def record(name: str, task: str, metrics: dict) -> None:
        records.append(
            {"dataset": name, "model": model, "pretrained": pretrained, "task": task,
             "metrics": metrics, "language": language}
        )  # fmt: skip

    for name, r in results.items():
        if r["kind"] == "classification":
            metrics = {
                "acc1": r["top1"],
                "acc5": r["top5"],
                "mean_per_class_recall": r["mean_per_class_recall"],
            }
            record(name, "zeroshot_classification", metrics)
        if "image_retrieval_recall@1" in r:
            record(name, "zeroshot_retrieval", {k: v for k, v in r.items() if "_retrieval_recall@" in k})
        if "linear_probe_top1" in r:
            metrics = {
                "lp_acc1": r["linear_probe_top1"], "lp_acc5": r["linear_probe_top5"],
                "lp_mean_per_class_recall": r["linear_probe_mean_per_class_recall"],
            }  # fmt: skip
            record(name, "linear_probe", metrics)
    return records
