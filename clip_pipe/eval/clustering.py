"""k-means on the image embeddings, k = the number of classes, scored against the labels."""

from __future__ import annotations

from clip_pipe.eval.embed import Embeddings


def kmeans_scores(emb: Embeddings, seed: int = 0) -> dict:
    """Normalised mutual information and adjusted Rand index (1: the clusters are the classes; ~0: chance)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = emb.labels.numpy()
    clusters = KMeans(n_clusters=emb.num_classes, n_init=4, random_state=seed).fit_predict(emb.images.numpy())
    return {
        "kmeans_nmi": float(normalized_mutual_info_score(labels, clusters)),
        "kmeans_ari": float(adjusted_rand_score(labels, clusters)),
    }
