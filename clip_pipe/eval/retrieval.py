"""Image-text retrieval recall@k, with CLIP_benchmark's names and semantics, and a defined tie rule.

`image_retrieval_recall@k`: the fraction of captions whose image is among the k images most similar to
the caption (text -> image). `text_retrieval_recall@k`: the fraction of images with at least one of their
captions among the k most similar captions (image -> text). An image shown by several samples (one
group) counts once, with all of their captions.

Ties. CLIP_benchmark ranks with `torch.topk`, whose order among equal scores is unspecified: it differs
between CPU instruction sets (AVX2 and AVX-512 kernels), so a model whose scores tie (identical captions,
identical images) got a different recall on different machines. Here a query's candidates that score
exactly as high as its best positive are taken in a uniformly random order, and a query counts its
*expected* hit: with `a` candidates strictly above the best positive and, at its score, `p` positives and
`n` negatives tied, the hit probability at k is 0 if a >= k, else 1 - C(n, k-a) / C(n+p, k-a) (McSherry
& Najork, "Computing information retrieval performance measures efficiently in the presence of tied
scores", ECIR 2008). Without ties this is CLIP_benchmark's recall exactly; with ties it is the mean of
what every tie order would give, which depends on the scores alone, not on the machine.
"""

from __future__ import annotations

import torch

from clip_pipe.eval.embed import Embeddings

RECALL_KS = (1, 5, 10)


def unique_images(emb: Embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each group, in order of first appearance; each row's image index)."""
    image_of_group, rows, image_of_row = {}, [], []
    for row, group in enumerate(emb.groups):
        if group not in image_of_group:
            image_of_group[group] = len(rows)
            rows.append(row)
        image_of_row.append(image_of_group[group])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(image_of_row, dtype=torch.long)


def expected_hits(scores: torch.Tensor, positive: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """{k: the sum over queries (rows) of P(a positive is among the top k)}, ties in random order.

    scores (Q, N), positive (Q, N) bool with at least one positive per row.
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    num_above = (scores > best).sum(dim=1)  # (Q,) all negatives, since best is the top positive
    tied = scores == best
    num_pos = (tied & positive).sum(dim=1).double()  # >= 1
    num_neg = (tied & ~positive).sum(dim=1).double()
    hits = {}
    for k in ks:
        slots = (k - num_above).clamp(min=0)  # places in the top k left for the tied block
        # P(miss) = C(n, s) / C(n + p, s) = prod_{i < s} (n - i) / (n + p - i); 0 once i reaches n.
        miss = torch.ones_like(num_pos)  # no slot left: a sure miss
        for i in range(k):
            factor = (num_neg - i).clamp(min=0) / (num_neg + num_pos - i).clamp(min=1)
            miss = torch.where(i < slots, miss * factor, miss)
        hits[k] = float((1 - miss).sum())
    return hits


def retrieval_recall(emb: Embeddings, ks: tuple[int, ...] = RECALL_KS, chunk: int = 1024) -> dict:
    rows, image_of_row = unique_images(emb)
    images = emb.images[rows]  # (I, D)
    text_image = image_of_row[emb.text_owner]  # (M,) each caption's image
    num_images, num_texts = len(images), len(text_image)
    hits_t2i, hits_i2t = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0)
    # In chunks of queries: M x I scores can be large.
    for start in range(0, num_texts, chunk):  # text -> image: the caption's one image
        scores = emb.texts[start : start + chunk] @ images.T  # (m, I)
        positive = text_image[start : start + chunk, None] == torch.arange(num_images)
        for k, h in expected_hits(scores, positive, ks).items():
            hits_t2i[k] += h
    for start in range(0, num_images, chunk):  # image -> text: any of the image's captions
        scores = images[start : start + chunk] @ emb.texts.T  # (i, M)
        positive = torch.arange(start, start + len(scores))[:, None] == text_image
        for k, h in expected_hits(scores, positive, ks).items():
            hits_i2t[k] += h
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hits_t2i[k] / num_texts
        metrics[f"text_retrieval_recall@{k}"] = hits_i2t[k] / num_images
    metrics.update(num_images=num_images, num_texts=num_texts)
    return metrics
