"""Linear probe, as in the CLIP paper: logistic regression on frozen image features, fitted on a labelled
training split, scored on the test split. Its regularisation strength is picked on a held-out fifth of
the training split, then the probe is refitted on all of it."""

from __future__ import annotations

import numpy as np

from clip_pipe.eval.embed import Embeddings

C_VALUES = (0.1, 1.0, 10.0, 100.0)


def linear_probe(train: Embeddings, test: Embeddings, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = train.images.numpy(), train.labels.numpy()
    x_test, y_test = test.images.numpy(), test.labels.numpy()
    if test.num_classes is not None and y_train.max() >= test.num_classes:
        raise ValueError(
            f"linear probe: training labels reach {y_train.max()}, but {test.name} has {test.num_classes} classes"
        )
    order = np.random.default_rng(seed).permutation(len(x_train))
    held_out, fit = order[: len(order) // 5], order[len(order) // 5 :]

    def probe(c: float, rows) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=1000).fit(x_train[rows], y_train[rows])

    best_c = max(C_VALUES, key=lambda c: probe(c, fit).score(x_train[held_out], y_train[held_out]))
    final = probe(best_c, order)
    scores = final.predict_proba(x_test)  # (N, classes seen in training), columns in final.classes_
    ranked = final.classes_[np.argsort(-scores, axis=1)[:, :5]]
    correct = ranked[:, 0] == y_test
    recalls = [correct[y_test == c].mean() for c in np.unique(y_test)]
    return {
        "linear_probe_top1": float(correct.mean()),
        "linear_probe_top5": float((ranked == y_test[:, None]).any(axis=1).mean()),
        "linear_probe_mean_per_class_recall": float(np.mean(recalls)),
        "linear_probe_C": best_c,
        "linear_probe_train_samples": len(x_train),
    }
