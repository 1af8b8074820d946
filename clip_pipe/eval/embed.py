"""The one distributed pass over an eval set: every rank encodes its share, and every rank ends with the
whole set's embeddings, in the set's order, exactly as one process would have computed them.

Under ZeRO-3 each forward pass gathers parameter slices from every rank, so every rank must run the
same number of full-size forward passes, however many samples it holds: a rank that has run out pads
with blank inputs, whose rows are dropped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clip_pipe.data import SampleErrors
from clip_pipe.eval.sets import EvalSet, eval_samples


@dataclass
class Embeddings:
    """L2-normalised embeddings of one eval set (float32, CPU), rows in the set's sample order."""

    name: str
    images: torch.Tensor  # (N, D)
    keys: list[str]  # (N,) sample keys
    groups: list[str]  # (N,) samples of one group show the same image
    labels: torch.Tensor | None = None  # (N,) class indices, where the set has labels
    texts: torch.Tensor | None = None  # (M, D) captions, for retrieval sets
    captions: list[str] | None = None  # (M,)
    text_owner: torch.Tensor | None = None  # (M,) the row of `images` each caption belongs to
    class_texts: torch.Tensor | None = None  # (C, D) one per class: the mean of its prompts
    classnames: list[str] | None = None  # (C,)
    num_skipped: int = 0

    @property
    def num_classes(self) -> int | None:
        if self.classnames is not None:
            return len(self.classnames)
        return None if self.labels is None else int(self.labels.max()) + 1


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # Through forward(), not encode_image(): under ZeRO-3, DeepSpeed gathers a module's partitioned
    # parameters in hooks on forward(), and CLIP's own top-level parameters are used by its forward only.
    out = model(images, None)
    return out["image_features"] if isinstance(out, dict) else out[0]


def text_features(model: nn.Module, texts: torch.Tensor) -> torch.Tensor:
    out = model(None, texts)
    return out["text_features"] if isinstance(out, dict) else out[1]


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: list[str], device, batch_size: int = 256):
    """L2-normalised text embeddings (N, D), computed in chunks. Every rank must pass the same count."""
    chunks = [
        text_features(model, tokenizer(texts[i : i + batch_size]).to(device)).float()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def classifier_weights(
    model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str], device
) -> torch.Tensor:
    """One unit vector per class: the mean of its prompts' embeddings. Returns (D, C)."""
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    embeddings = encode_texts(model, tokenizer, prompts, device)  # (C*T, D)
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1).T


@torch.no_grad()
def embed(
    model: nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    eval_set: EvalSet,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Embeddings:
    """Collective when world_size > 1: every rank calls it, and every rank gets the whole set's embeddings."""
    was_training = model.training
    model.eval()
    errors = SampleErrors()
    indices, keys, groups, labels, captions, caption_owner = [], [], [], [], [], []
    features = []
    blank = preprocess(Image.new("RGB", (32, 32)))
    samples = eval_samples(eval_set, rank, world_size, errors)
    while True:
        batch = list(itertools.islice(samples, batch_size))
        if not _any_rank(bool(batch), world_size, device):
            break
        pixels = [preprocess(s.image) for s in batch]
        if world_size > 1:
            pixels += [blank] * (batch_size - len(batch))
        features.append(
            image_features(model, torch.stack(pixels).to(device, dtype)).float()[: len(batch)].cpu()
        )
        for s in batch:
            indices.append(s.index)
            keys.append(s.key)
            groups.append(s.group)
            labels.append(-1 if s.label is None else s.label)
            caption_owner += [s.index] * len(s.captions)
            captions += s.captions

    # Captions: a second padded pass, now that every rank knows how many it holds.
    num_text_batches = _max_over_ranks(math.ceil(len(captions) / batch_size), world_size, device)
    texts = []
    for b in range(num_text_batches):
        chunk = captions[b * batch_size : (b + 1) * batch_size]
        padded = chunk + [""] * (batch_size - len(chunk)) if world_size > 1 else chunk
        if padded:
            texts.append(text_features(model, tokenizer(padded).to(device)).float()[: len(chunk)].cpu())
    class_texts = None
    if eval_set.kind == "classification":
        class_texts = classifier_weights(model, tokenizer, eval_set.classnames, eval_set.templates, device)
        class_texts = class_texts.T.cpu().contiguous()
    model.train(was_training)

    dim = int(class_texts.shape[1]) if class_texts is not None else None
    local = {
        "indices": indices, "keys": keys, "groups": groups, "labels": labels, "captions": captions,
        "caption_owner": caption_owner, "num_skipped": errors.num_skipped,
        "images": torch.cat(features) if features else torch.zeros(0, dim or 0),
        "texts": torch.cat(texts) if texts else torch.zeros(0, dim or 0),
    }  # fmt: skip
    shares = [local]
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, local)
    return _merge(eval_set, shares, class_texts)


def _merge(eval_set: EvalSet, shares: list[dict], class_texts: torch.Tensor | None) -> Embeddings:
    """Every rank's share -> one set in sample order (what a single process reads in one pass)."""
    indices = torch.tensor([i for s in shares for i in s["indices"]], dtype=torch.long)
    num_samples = len(indices)
    if num_samples == 0:
        skipped = sum(s["num_skipped"] for s in shares)
        raise ValueError(f"eval set {eval_set.name}: no readable samples ({skipped} skipped)")
    order = indices.argsort()
    row_of = {int(indices[r]): i for i, r in enumerate(order.tolist())}  # sample index -> row
    images = torch.cat([s["images"] for s in shares if len(s["indices"])])[order]
    keys = [k for s in shares for k in s["keys"]]
    groups = [g for s in shares for g in s["groups"]]
    labels = torch.tensor([v for s in shares for v in s["labels"]], dtype=torch.long)[order]
    emb = Embeddings(
        eval_set.name, F.normalize(images, dim=-1), [keys[r] for r in order], [groups[r] for r in order],
        labels=None if (labels < 0).any() else labels,
        class_texts=class_texts, classnames=eval_set.classnames,
        num_skipped=sum(s["num_skipped"] for s in shares),
    )  # fmt: skip
    if eval_set.kind == "retrieval":
        # Captions sorted by their image's position; a sample's own captions keep their order (stable).
        owner = torch.tensor([row_of[o] for s in shares for o in s["caption_owner"]], dtype=torch.long)
        caption_order = owner.argsort(stable=True)
        texts = torch.cat([s["texts"] for s in shares if len(s["captions"])])
        captions = [c for s in shares for c in s["captions"]]
        emb.texts = F.normalize(texts[caption_order], dim=-1)
        emb.captions = [captions[i] for i in caption_order]
        emb.text_owner = owner[caption_order]
    return emb


def _any_rank(flag: bool, world_size: int, device) -> bool:
    if world_size == 1:
        return flag
    return _max_over_ranks(int(flag), world_size, device) > 0


def _max_over_ranks(value: int, world_size: int, device) -> int:
    if world_size == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.long, device=device)  # on the model's device, for NCCL
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)
