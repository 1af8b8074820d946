"""Zero-shot classification: a classifier from class names × templates, evaluated on held-out shards.

Eval sets use CLIP_benchmark's WebDataset layout, so either tool reads the other's sets:

    SET/classnames.txt                          one class name per line; line i is label i
    SET/zeroshot_classification_templates.txt   one prompt per line, with {c} for the class name
    SET/test/nshards.txt, SET/test/0.tar ...    samples of an image (jpg/png/webp) and its `cls` label
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import nn

from clip_pipe.data import SampleErrors, decode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    name: str
    classnames: list[str]
    templates: list[str]
    shard_urls: list[str]


def read_eval_set(root: str | Path, split: str = "test") -> EvalSet:
    root = Path(root)
    classnames_path = root / "classnames.txt"
    templates_path = root / "zeroshot_classification_templates.txt"
    nshards_path = root / split / "nshards.txt"
    for path in (classnames_path, templates_path, nshards_path):
        if not path.is_file():
            raise ValueError(
                f"eval set {root}: missing {path.relative_to(root)} (CLIP_benchmark layout expected)"
            )
    classnames = [line.strip() for line in classnames_path.read_text().splitlines() if line.strip()]
    templates = [line.strip() for line in templates_path.read_text().splitlines() if line.strip()]
    if not classnames or not templates:
        raise ValueError(f"eval set {root}: classnames.txt and the templates file must not be empty")
    if bad := [t for t in templates if "{c}" not in t]:
        raise ValueError(f"eval set {root}: templates without {{c}}: {bad}")
    num_shards = int(nshards_path.read_text().strip())
    urls = [str(root / split / f"{i}.tar") for i in range(num_shards)]
    if missing := [u for u in urls if not Path(u).is_file()]:
        raise ValueError(f"eval set {root}: missing shards {missing}")
    return EvalSet(root.name, classnames, templates, urls)


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # Through forward(), not encode_image(): under ZeRO-3, DeepSpeed gathers a module's partitioned
    # parameters in hooks on forward(), and CLIP's own top-level parameters are used by its forward only.
    out = model(images, None)
    return out["image_features"] if isinstance(out, dict) else out[0]


def _text_features(model: nn.Module, texts: torch.Tensor) -> torch.Tensor:
    out = model(None, texts)
    return out["text_features"] if isinstance(out, dict) else out[1]


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: list[str], device, batch_size: int = 256):
    """L2-normalised text embeddings (N, D), computed in chunks."""
    chunks = [
        _text_features(model, tokenizer(texts[i : i + batch_size]).to(device)).float()
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


def eval_samples(urls: list[str], rank: int, world_size: int, errors: SampleErrors) -> Iterator[dict]:
    """This rank's share of an eval set: every world_size-th sample, so ranks split it evenly."""
    samples = wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=errors)
    for i, sample in enumerate(samples):
        if i % world_size == rank:
            yield sample


@torch.no_grad()
def evaluate(
    model: nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    eval_set: EvalSet,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Top-1, top-5, mean per-class recall and per-class accuracy over the whole set (all ranks)."""
    was_training = model.training
    model.eval()
    num_classes = len(eval_set.classnames)
    weights = classifier_weights(model, tokenizer, eval_set.classnames, eval_set.templates, device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # [true, predicted]
    num_top5 = torch.zeros((), dtype=torch.long)
    errors = SampleErrors()

    def labelled_batches() -> Iterator[tuple[list, list]]:
        images, labels = [], []
        for sample in eval_samples(eval_set.shard_urls, rank, world_size, errors):
            try:
                label = int(sample["cls"])
                if not 0 <= label < num_classes:
                    raise ValueError(f"label {label} out of range for {num_classes} classes")
                image = preprocess(decode_image(sample))
            except Exception as exn:  # counted and reported, never fatal
                errors(exn)
                continue
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield images, labels
                images, labels = [], []
        if images:
            yield images, labels

    # Every rank runs the same number of full-size forward passes: under ZeRO-3 each pass gathers
    # parameters from all ranks, so a rank that stopped early would leave the others waiting forever.
    # Ranks' shares differ by a sample (and by unreadable ones), so a rank that has run out pads with
    # blank images, whose rows are masked out of the counts; the ranks agree each round whether any
    # of them still has images.
    blank = preprocess(Image.new("RGB", (32, 32)))
    batches = labelled_batches()
    while True:
        images, labels = next(batches, ([], []))
        if world_size > 1:
            num_busy = torch.tensor(len(labels) > 0, dtype=torch.long, device=device)
            dist.all_reduce(num_busy)
            if not num_busy:
                break
        elif not labels:
            break
        num_real = len(labels)
        pixels = torch.stack(images + [blank] * (batch_size - num_real) if world_size > 1 else images)
        features = _image_features(model, pixels.to(device, dtype)).float()[:num_real]  # (B, D)
        logits = features @ weights  # (B, C)
        target = torch.tensor(labels, dtype=torch.long)
        top = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        confusion.index_put_((target, top[:, 0]), torch.ones_like(target), accumulate=True)
        num_top5 += (top == target[:, None]).any(dim=1).sum()

    totals = torch.cat([confusion.flatten(), num_top5.view(1), torch.tensor([errors.num_skipped])])
    if world_size > 1:  # sum every rank's share (on the model's device: NCCL reduces GPU tensors only)
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    confusion = totals[: num_classes**2].view(num_classes, num_classes)
    num_top5, num_skipped = int(totals[-2]), int(totals[-1])
    model.train(was_training)
    return summarize(confusion, num_top5, num_skipped, eval_set)


def summarize(confusion: torch.Tensor, num_top5: int, num_skipped: int, eval_set: EvalSet) -> dict:
    num_samples = int(confusion.sum())
    if num_samples == 0:
        raise ValueError(f"eval set {eval_set.name}: no readable samples ({num_skipped} skipped)")
    per_class_total = confusion.sum(dim=1)
    per_class_recall = confusion.diag() / per_class_total.clamp(min=1)
    present = per_class_total > 0
    return {
        "eval_set": eval_set.name,
        "num_samples": num_samples,
        "num_skipped": num_skipped,
        "top1": float(confusion.diag().sum()) / num_samples,
        "top5": num_top5 / num_samples,
        "mean_per_class_recall": float(per_class_recall[present].mean()),
        "per_class_accuracy": {
            name: float(per_class_recall[i]) for i, name in enumerate(eval_set.classnames) if present[i]
        },
    }


def format_results(results: dict) -> str:
    return (
        f"{results['eval_set']}: top-1 {100 * results['top1']:.2f}%  top-5 {100 * results['top5']:.2f}%  "
        f"mean per-class recall {100 * results['mean_per_class_recall']:.2f}%  "
        f"({results['num_samples']} images, {results['num_skipped']} skipped)"
    )
