"""Every metric on fixed tensors whose answers are worked out by hand (no model), as big_vision tests its
evaluators; and the merge of ranks' shares into one set, without processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_pipe.eval import score, to_clip_benchmark
from clip_pipe.eval.clustering import kmeans_scores
from clip_pipe.eval.embed import Embeddings, _merge
from clip_pipe.eval.geometry import alignment, alignment_uniformity, uniformity
from clip_pipe.eval.linear_probe import linear_probe
from clip_pipe.eval.retrieval import expected_hits, retrieval_recall
from clip_pipe.eval.sets import EvalSet
from clip_pipe.eval.zeroshot import zeroshot_classification

E = torch.eye(4)  # e1..e4: orthonormal, so every cosine below is a hand-computable number


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows]), dim=-1)


def retrieval_embeddings(groups=("a", "b", "c")) -> Embeddings:
    # Images e1, e2, e3. Caption 0 (of image 0) is e1: rank 1. Caption 1 (of image 1) leans to image 2:
    # scores 0.995 (image 2) > 0.0995 (image 1) > 0 (image 0), so its image ranks 2nd. Caption 2 (of
    # image 2) is e1 + 0.5 e3: scores 0.894 (image 0) > 0.447 (image 2) > 0, so its image ranks 2nd.
    images = E[:3, :3]
    texts = unit([1, 0, 0], [0, 0.1, 1], [1, 0, 0.5])
    return Embeddings(
        "toy", images, ["k0", "k1", "k2"], list(groups), texts=texts, captions=["t0", "t1", "t2"],
        text_owner=torch.tensor([0, 1, 2]),
    )  # fmt: skip


def test_retrieval_recall_by_hand():
    r = retrieval_recall(retrieval_embeddings(), ks=(1, 2, 10))
    # text -> image: caption 0 hits at rank 1; captions 1 and 2 at rank 2.
    assert r["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert r["image_retrieval_recall@2"] == 1.0
    assert r["image_retrieval_recall@10"] == 1.0  # k beyond the number of images: everything is retrieved
    # image -> text: image 0's best caption is caption 0 (1.0 > 0.894); image 1's is caption 1 (0.0995 > 0);
    # image 2's best is caption 1 (0.995, image 1's), then its own caption 2 (0.447).
    assert r["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@2"] == 1.0
    assert (r["num_images"], r["num_texts"]) == (3, 3)


def test_retrieval_counts_an_image_once_with_all_its_captions():
    # Samples 0 and 2 show the same image ("a"): it is one image with captions 0 and 2. The image set is
    # then {e1, e2}; caption 2 (e1 + 0.5 e3) now finds its image first, caption 1 (0.1 e2 + e3) too.
    emb = retrieval_embeddings(groups=("a", "b", "a"))
    r = retrieval_recall(emb, ks=(1,))
    assert (r["num_images"], r["num_texts"]) == (2, 3)
    assert r["image_retrieval_recall@1"] == 1.0
    # image "a" (e1): best caption 0, its own. image "b" (e2): best caption 1 (0.0995), its own.
    assert r["text_retrieval_recall@1"] == 1.0


def tied_embeddings(order: list[int]) -> Embeddings:
    # Four images, all e1: every caption ties with all four. Caption i belongs to image i, and a fifth
    # caption (e2) to image 3, so image 3 has two captions, of which one scores below the tie (0).
    images = E[:1].repeat(4, 1)[order]
    texts = unit([1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0])
    owner = torch.tensor([order.index(i) for i in (0, 1, 2, 3, 3)])
    return Embeddings(
        "ties", images, [f"k{i}" for i in order], [f"g{i}" for i in order], texts=texts,
        captions=[f"t{i}" for i in range(5)], text_owner=owner,
    )  # fmt: skip


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]])
def test_retrieval_ties_count_their_expected_hit_whatever_the_order(order):
    r = retrieval_recall(tied_embeddings(order), ks=(1, 2, 3, 4))
    # text -> image: captions 0-3 tie with all 4 images, one of them theirs: P(hit@k) = k / 4. Caption 4
    # (e2) scores 0 with every image: also a 4-way tie.
    for k in (1, 2, 3, 4):
        assert r[f"image_retrieval_recall@{k}"] == pytest.approx(k / 4)
    # image -> text: every image ties with captions 0-3 (caption 4 scores 0, below). Each image owns one
    # of the four tied captions: P(hit@k) = k / 4, whatever the order of the images or captions.
    for k in (1, 2, 3, 4):
        assert r[f"text_retrieval_recall@{k}"] == pytest.approx(k / 4)


def test_retrieval_ties_with_several_positives_and_negatives_above():
    # One image query against 6 captions: one negative above (0.9), then a 4-way tie at 0.5 holding 2
    # positives and 2 negatives, then a positive below. R@1: 0. R@2: 1 slot for the tie: P = 2/4. R@3:
    # 2 slots: P(miss) = C(2,2)/C(4,2) = 1/6. R@4: 3 slots > 2 negatives: a sure hit.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.5, 0.1]])
    positive = torch.tensor([[False, True, False, True, False, True]])
    hits = expected_hits(scores, positive, (1, 2, 3, 4))
    assert hits == pytest.approx({1: 0.0, 2: 0.5, 3: 5 / 6, 4: 1.0})
    # Permuting the candidates changes nothing.
    perm = torch.tensor([5, 3, 0, 4, 2, 1])
    assert expected_hits(scores[:, perm], positive[:, perm], (1, 2, 3, 4)) == pytest.approx(hits)


def classification_embeddings() -> Embeddings:
    # Class texts e1, e2, e3. Images: e1 (class 0, right), e2 (class 0, predicted 1), e3 (class 2, right),
    # e1 + 0.1 e2 (class 1, predicted 0), e1 (class 2, predicted 0).
    return Embeddings(
        "toy", unit(E[0], E[1], E[2], [1, 0.1, 0, 0], E[0]), list("abcde"), list("abcde"),
        labels=torch.tensor([0, 0, 2, 1, 2]), class_texts=E[:3], classnames=["zero", "one", "two"],
    )  # fmt: skip


def test_zeroshot_classification_by_hand():
    r = zeroshot_classification(classification_embeddings())
    assert r["top1"] == 2 / 5
    assert r["top5"] == 1.0  # 3 classes: the true one is always among the top 5
    # Recall per true class (rows), not precision per predicted class (columns: 3, 1, 1).
    assert r["per_class_accuracy"] == {"zero": 0.5, "one": 0.0, "two": 0.5}
    assert r["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert r["confusion"] == [[1, 1, 0], [1, 0, 0], [1, 0, 1]]


def test_alignment_and_uniformity_by_hand():
    assert alignment(unit(E[0], E[1]), unit(E[0], E[2])) == pytest.approx(1.0)  # distances² 0 and 2
    # Points e1, e2, -e1: squared distances 2, 4, 2 (each pair once; ordered pairs give the same mean).
    expected = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert uniformity(unit(E[0], E[1], -E[0])) == pytest.approx(expected, rel=1e-12)
    assert uniformity(unit(E[0], E[1], -E[0]), chunk=1) == pytest.approx(expected, rel=1e-12)  # chunking
    assert uniformity(unit(E[0], E[0], E[0])) == pytest.approx(0.0)  # collapse
    # Classification sets pair each image with its class's text: distances² 0, 2, 0, 2 - 2 * 0.1/sqrt(1.01), 2.
    g = alignment_uniformity(classification_embeddings())
    assert g["alignment"] == pytest.approx((2 + 2 - 2 * 0.1 / math.sqrt(1.01) + 2) / 5, rel=1e-6)
    assert g["uniformity_text"] == pytest.approx(math.log(math.exp(-4)))  # e1, e2, e3: all pairs at 2
    # Retrieval sets pair each caption with its image.
    emb = retrieval_embeddings()
    pairs = emb.images[emb.text_owner], emb.texts
    assert alignment_uniformity(emb)["alignment"] == pytest.approx(alignment(*pairs))
    assert alignment(*pairs) == pytest.approx(
        (0 + 2 - 2 * 0.1 / math.sqrt(1.01) + 2 - 2 * 0.5 / math.sqrt(1.25)) / 3
    )


def test_kmeans_scores_by_hand():
    two_blobs = unit(E[0], E[0] + 0.01 * E[2], E[1], E[1] + 0.01 * E[3])
    emb = Embeddings("toy", two_blobs, list("abcd"), list("abcd"), labels=torch.tensor([1, 1, 0, 0]))
    assert kmeans_scores(emb) == {"kmeans_nmi": pytest.approx(1.0), "kmeans_ari": pytest.approx(1.0)}
    # The clusters cut straight across the classes: no information (NMI 0); ARI is -0.5 for this 2x2 table.
    emb.labels = torch.tensor([0, 1, 0, 1])
    assert kmeans_scores(emb) == {
        "kmeans_nmi": pytest.approx(0.0, abs=1e-12),
        "kmeans_ari": pytest.approx(-0.5),
    }


def test_linear_probe_separable_and_flipped():
    g = torch.Generator().manual_seed(0)

    def blobs(labels: torch.Tensor, flip: bool = False) -> Embeddings:
        x = 4 * E[labels, :3] + 0.3 * torch.randn(len(labels), 3, generator=g)
        keys = [str(i) for i in range(len(labels))]
        return Embeddings("toy", x, keys, keys, labels=(2 - labels) if flip else labels)

    train = blobs(torch.arange(60) % 3)  # classes interleaved: 0, 1, 2, 0, 1, 2, ...
    # The test set in another order and other proportions (12, 9, 9 in runs), so that any row-for-row
    # slip between the two sets (scoring the training features against the test labels, or the reverse)
    # gives other numbers than the right ones.
    test_labels = torch.tensor([0] * 12 + [1] * 9 + [2] * 9)
    r = linear_probe(train, blobs(test_labels))
    assert r["linear_probe_top1"] == 1.0 and r["linear_probe_mean_per_class_recall"] == 1.0
    assert r["linear_probe_top5"] == 1.0 and r["linear_probe_train_samples"] == 60
    # Test labels that contradict the features (classes 0 and 2 swapped): only class 1's 9 of 30 are
    # right, and the recall per class is (0 + 1 + 0) / 3. Scored on its training features instead, the
    # probe would be right everywhere (1.0).
    flipped = linear_probe(train, blobs(test_labels, flip=True))
    assert flipped["linear_probe_top1"] == pytest.approx(9 / 30)
    assert flipped["linear_probe_mean_per_class_recall"] == pytest.approx(1 / 3)
    assert flipped["linear_probe_top5"] == 1.0  # 3 classes: always among the top 5
    with pytest.raises(ValueError, match="training labels reach 2"):
        linear_probe(train, Embeddings("two", train.images, train.keys, train.groups, labels=train.labels,
                                       classnames=["a", "b"]))  # fmt: skip


def test_score_runs_every_applicable_metric_and_exports_clip_benchmark():
    r = score(classification_embeddings(), probe_train=None)
    assert r["kind"] == "classification" and r["num_samples"] == 5
    assert {"top1", "alignment", "uniformity_image", "kmeans_nmi"} <= set(r)
    assert not any("retrieval" in k for k in r)
    t = score(retrieval_embeddings())
    assert t["kind"] == "retrieval" and "image_retrieval_recall@5" in t and "kmeans_nmi" not in t  # no labels
    records = to_clip_benchmark({"cls": r, "ret": t}, "clip-pipe-test", "model.pt")
    assert [(x["dataset"], x["task"]) for x in records] == [
        ("cls", "zeroshot_classification"),
        ("ret", "zeroshot_retrieval"),
    ]
    assert records[0]["metrics"] == {"acc1": 0.4, "acc5": 1.0, "mean_per_class_recall": pytest.approx(1 / 3)}
    assert set(records[1]["metrics"]) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
    }


def test_merge_of_rank_shares_restores_the_single_process_order():
    # Rank r reads samples r, r + 2, ...; sample 3 was unreadable on rank 1. Captions vary in number.
    eval_set = EvalSet("toy", "retrieval", [])
    x = torch.randn(5, 4)
    caps = {0: ["a0"], 1: ["b0", "b1"], 2: ["c0"], 4: ["e0", "e1", "e2"]}
    tx = {c: torch.randn(4) for cs in caps.values() for c in cs}

    def share(indices, skipped):
        captions = [c for i in indices for c in caps[i]]
        return {
            "indices": indices, "keys": [f"k{i}" for i in indices], "groups": [f"g{i}" for i in indices],
            "labels": [-1] * len(indices), "captions": captions,
            "caption_owner": [i for i in indices for _ in caps[i]], "num_skipped": skipped,
            "images": x[indices], "texts": torch.stack([tx[c] for c in captions]),
        }  # fmt: skip

    one = _merge(eval_set, [share([0, 1, 2, 4], 1)], None)
    two = _merge(eval_set, [share([0, 2, 4], 0), share([1], 1)], None)
    assert two.keys == one.keys == ["k0", "k1", "k2", "k4"] and two.num_skipped == 1
    assert two.captions == one.captions == ["a0", "b0", "b1", "c0", "e0", "e1", "e2"]
    assert torch.equal(two.images, one.images) and torch.equal(two.texts, one.texts)
    assert two.text_owner.tolist() == [0, 1, 1, 2, 3, 3, 3] and two.labels is None
