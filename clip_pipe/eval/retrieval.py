"""Image-text retrieval recall@k, with CLIP_benchmark's names and semantics.

`image_retrieval_recall@k`: the fraction of captions whose image is among the k images most similar to
the caption (text -> image). `text_retrieval_recall@k`: the fraction of images with at least one of their
captions among the k most similar captions (image -> text). An image shown by several samples (one
group) counts once, with all of their captions.
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


def retrieval_recall(emb: Embeddings, ks: tuple[int, ...] = RECALL_KS, chunk: int = 1024) -> dict:
    rows, image_of_row = unique_images(emb)
    images = emb.images[rows]  # (I, D)
    text_image = image_of_row[emb.text_owner]  # (M,) each caption's image
    num_images, num_texts = len(images), len(text_image)
    metrics = {}
    # text -> image: rank of the true image among all images, per caption (in chunks: M x I can be large).
    hits_t2i = {k: 0 for k in ks}
    for start in range(0, num_texts, chunk):
        scores = emb.texts[start : start + chunk] @ images.T  # (m, I)
        top = scores.topk(min(max(ks), num_images), dim=1).indices
        match = top == text_image[start : start + chunk, None]
        for k in ks:
            hits_t2i[k] += int(match[:, :k].any(dim=1).sum())
    # image -> text: a hit if any caption of the image is in its top k.
    hits_i2t = {k: 0 for k in ks}
    for start in range(0, num_images, chunk):
        scores = images[start : start + chunk] @ emb.texts.T  # (i, M)
        top = scores.topk(min(max(ks), num_texts), dim=1).indices
        match = text_image[top] == torch.arange(start, start + len(scores))[:, None]
        for k in ks:
            hits_i2t[k] += int(match[:, :k].any(dim=1).sum())
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hits_t2i[k] / num_texts
        metrics[f"text_retrieval_recall@{k}"] = hits_i2t[k] / num_images
    metrics.update(num_images=num_images, num_texts=num_texts)
    return metrics
