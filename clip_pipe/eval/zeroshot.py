"""Zero-shot classification: each image against one text embedding per class (names × templates)."""

from __future__ import annotations

import torch

from clip_pipe.eval.embed import Embeddings


def zeroshot_classification(emb: Embeddings) -> dict:
    """Top-1, top-5, mean per-class recall (CLIP_benchmark's three), per-class accuracy and the confusion
    matrix (rows: true class, columns: predicted), over the classes present in the set."""
    num_classes = len(emb.classnames)
    logits = emb.images @ emb.class_texts.T  # (N, C)
    top = logits.topk(min(5, num_classes), dim=1).indices
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((emb.labels, top[:, 0]), torch.ones_like(emb.labels), accumulate=True)
    num_samples = len(emb.labels)
    per_class_total = confusion.sum(dim=1)
    per_class_recall = confusion.diag() / per_class_total.clamp(min=1)
    present = per_class_total > 0
    return {
        "top1": float(confusion.diag().sum()) / num_samples,
        "top5": float((top == emb.labels[:, None]).any(dim=1).sum()) / num_samples,
        "mean_per_class_recall": float(per_class_recall[present].mean()),
        "per_class_accuracy": {
            name: float(per_class_recall[i]) for i, name in enumerate(emb.classnames) if present[i]
        },
        "confusion": confusion.tolist(),
    }
