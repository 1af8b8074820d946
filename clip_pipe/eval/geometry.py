"""Alignment and uniformity of L2-normalised embeddings (Wang & Isola, 2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere").

alignment   E ||x - y||²  over positive image-text pairs (lower: pairs closer)
uniformity  log E exp(-2 ||x - y||²)  over all pairs of distinct points of one modality (lower: more
            spread out; -4 is the limit for points spread over a high-dimensional sphere, 0 is collapse)

The positive pairs are each caption with its image (retrieval sets) or each image with its class's text
embedding (classification sets).
"""

from __future__ import annotations

import math

import torch

from clip_pipe.eval.embed import Embeddings


def positive_pairs(emb: Embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    if emb.texts is not None:
        return emb.images[emb.text_owner], emb.texts
    return emb.images, emb.class_texts[emb.labels]


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).pow(2).sum(dim=1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """Exact over all n(n-1) ordered pairs i != j, in chunks of rows (n² distances need not fit in memory)."""
    x = x.double()
    n = len(x)
    if n < 2:
        return float("nan")
    sq_norms = x.pow(2).sum(dim=1)
    log_sums = []
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        sq_dist = (sq_norms[start : start + chunk, None] + sq_norms[None, :] - 2 * block @ x.T).clamp(min=0)
        logits = -t * sq_dist
        rows = torch.arange(len(block))
        logits[rows, rows + start] = -math.inf  # not a point with itself
        log_sums.append(torch.logsumexp(logits.flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(log_sums), dim=0) - math.log(n * (n - 1)))


def alignment_uniformity(emb: Embeddings) -> dict:
    texts = emb.texts if emb.texts is not None else emb.class_texts
    return {
        "alignment": alignment(*positive_pairs(emb)),
        "uniformity_image": uniformity(emb.images),
        "uniformity_text": uniformity(texts),
    }
