"""The data behind a report's pictures, as plain JSON: computed where the embeddings are, drawn later
by report.py (which needs no torch and no model)."""

from __future__ import annotations

import base64
import io

import torch

from clip_pipe.eval.embed import Embeddings
from clip_pipe.eval.retrieval import unique_images
from clip_pipe.eval.sets import EvalSet, read_images

MAX_MAP_POINTS = 2000
NUM_HEATMAP = 12
NUM_QUERIES = 4
THUMBNAIL = 64


def _spread(n: int, num: int) -> list[int]:
    """`num` row indices evenly spread over `n` rows (all of them if n <= num)."""
    return list(range(n)) if n <= num else [round(i * (n - 1) / (num - 1)) for i in range(num)]


def figure_data(emb: Embeddings, eval_set: EvalSet) -> dict:
    data = {"eval_set": emb.name, "map": _pca_map(emb), "similarity": _similarity(emb)}
    if emb.texts is not None:
        data["retrieval"] = _retrieval_examples(emb, eval_set)
    return data


def _pca_map(emb: Embeddings) -> dict:
    rows = _spread(len(emb.images), MAX_MAP_POINTS)
    x = emb.images[rows].double()
    mean = x.mean(dim=0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:2].T  # (D, 2): the two directions of largest variance of the images
    out = {"points": ((x - mean) @ basis).tolist(), "labels": None, "class_points": None, "classnames": None}
    if emb.labels is not None:
        out["labels"] = emb.labels[rows].tolist()
        out["classnames"] = emb.classnames or [str(c) for c in range(emb.num_classes)]
    if emb.class_texts is not None:
        # Text embeddings sit in another region of the sphere (the modality gap); projecting them through
        # the images' basis still shows which image clusters each class's text lies nearest to.
        out["class_points"] = ((emb.class_texts.double() - mean) @ basis).tolist()
    return out


def _similarity(emb: Embeddings) -> dict:
    """Cosine similarity of a sample of images with texts: their own captions (retrieval), or every
    class's text embedding (classification), the true text marked."""
    if emb.texts is not None:
        rows, _ = unique_images(emb)
        first_caption = {}
        for t, owner in enumerate(emb.text_owner.tolist()):
            first_caption.setdefault(owner, t)
        picked = [int(rows[i]) for i in _spread(len(rows), NUM_HEATMAP)]
        texts = [first_caption[r] for r in picked]
        values = emb.images[picked] @ emb.texts[texts].T
        return {
            "row_labels": [emb.keys[r] for r in picked], "col_labels": [emb.captions[t] for t in texts],
            "values": values.tolist(), "true_col": list(range(len(picked))),
        }  # fmt: skip
    # One image per class where possible, in class order.
    picked = []
    for c in range(len(emb.classnames)):
        hits = (emb.labels == c).nonzero().flatten()
        if len(hits):
            picked.append(int(hits[0]))
    values = emb.images[picked] @ emb.class_texts.T
    return {
        "row_labels": [f"{emb.keys[r]} ({emb.classnames[int(emb.labels[r])]})" for r in picked],
        "col_labels": emb.classnames, "values": values.tolist(),
        "true_col": [int(emb.labels[r]) for r in picked],
    }  # fmt: skip


def _retrieval_examples(emb: Embeddings, eval_set: EvalSet) -> dict:
    rows, image_of_row = unique_images(emb)
    images = emb.images[rows]
    queries = []
    for t in _spread(len(emb.texts), NUM_QUERIES):
        scores = images @ emb.texts[t]
        top = scores.topk(min(5, len(images))).indices.tolist()
        true_row = int(rows[image_of_row[emb.text_owner[t]]])
        queries.append(
            {
                "caption": emb.captions[t],
                "top": [{"key": emb.keys[int(rows[i])], "score": float(scores[i])} for i in top],
                "true_key": emb.keys[true_row],
            }
        )
    keys = {q["true_key"] for q in queries} | {hit["key"] for q in queries for hit in q["top"]}
    thumbnails = {}
    for key, image in read_images(eval_set, keys).items():
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        thumbnails[key] = base64.b64encode(buffer.getvalue()).decode()
    return {"queries": queries, "thumbnails": thumbnails}
