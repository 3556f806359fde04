"""Label issues by confident learning: out-of-sample class probabilities from K-fold
cross-validation of a scikit-learn classifier on each view of the audit's features, ranked by
cleanlab (its tutorials' recipe: `cross_val_predict` probabilities, then `find_label_issues`).

The classifier is fitted to convergence whatever the number of images: an RBF support vector
machine with Platt-scaled probabilities up to `SVC_MAX` images, above that a logistic regression
on a Nystroem approximation of the same kernel (linear in the number of images). Each view of the
data (the cached backbone features and the pixels when a feature cache exists, else the pixels
alone) gets its own classifier; an image's probabilities are the average over the views.
Measured on planted label flips (docs/benchmarks.md, `scripts/benchmark_datasets.py`): on 1,797
8x8 digits with 1 % of the labels moved the audit flags 39 images, 17 of the 18 planted among them;
at 5 %, recall 80 % at precision 75 % (the small torch heads this replaced reported 4 suspects on
such data, 2 of 20 planted).

Every image cleanlab flags (`find_label_issues`, pruned by its estimated noise rates) is a
suspect, most suspicious first (cleanlab's self-confidence: the out-of-sample probability of the
given label). The report states the recommended cut: cleanlab's calibrated estimate of how many
labels are wrong (`num_label_issues`), the number of rows to review first.
"""

from __future__ import annotations

import numpy as np

FEATURE_SOURCES = ("auto", "cache", "pixels")  # audit.features
SVC_MAX = 5000  # above this many images the SVM's quadratic cost is too high: kernel features
NYSTROEM_COMPONENTS = 1000


def classifier(n: int, smallest: int, seed: int):
    """The classifier fitted in each fold: an RBF SVM with sigmoid-calibrated (Platt)
    probabilities for up to SVC_MAX images, a logistic regression on Nystroem RBF features above
    (and where a class is too small for the calibration's own folds). `smallest`: the fewest
    training images a class has in a fold."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    if n <= SVC_MAX and smallest >= 2:
        return CalibratedClassifierCV(SVC(random_state=seed), cv=min(5, smallest), ensemble=False)
    return make_pipeline(
        Nystroem(n_components=min(NYSTROEM_COMPONENTS, n), random_state=seed),
        LogisticRegression(max_iter=2000),
    )


def describe(n: int) -> str:
    if n <= SVC_MAX:
        return "an RBF support vector machine (Platt probabilities)"
    return f"a logistic regression on {NYSTROEM_COMPONENTS} Nystroem RBF features"


def out_of_sample_probs(views: list, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N, C) class probabilities, each row the average over views of a classifier that never
    saw that image; every view uses the same stratified folds."""
    import warnings

    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n, c = len(labels), int(labels.max()) + 1
    folds = max(2, min(folds, int(np.bincount(labels, minlength=c).max())))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = np.zeros((n, c), np.float64)
    present = np.unique(labels)  # classes with no image in these splits get no column
    counts = np.bincount(labels)[present]
    smallest = int((counts - np.ceil(counts / folds)).min())
    for x in views:
        with warnings.catch_warnings():  # "the least populated class has only k members"
            warnings.simplefilter("ignore", UserWarning)
            p = cross_val_predict(
                classifier(n, smallest, seed), np.asarray(x), labels, cv=cv, method="predict_proba"
            )
        probs[:, present] += p / len(views)
    return probs.astype(np.float32)


def label_issues(labels: np.ndarray, probs: np.ndarray):
    """([(index, self-confidence, suggested class)] every image cleanlab flags, most suspicious
    first; the recommended cut: cleanlab's calibrated estimate of how many labels are wrong)."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(labels)
    if len(present) < 2:
        return [], 0
    # cleanlab wants classes 0..K-1 with every one present: drop the columns of absent classes
    remap = np.full(int(labels.max()) + 1, -1)
    remap[present] = np.arange(len(present))
    y, p = remap[labels], probs[:, present]
    p = p / p.sum(1, keepdims=True).clip(1e-12)
    ranked = find_label_issues(y, p, return_indices_ranked_by="self_confidence")
    scores = get_label_quality_scores(y, p, method="self_confidence")
    out = [(int(i), float(scores[i]), int(present[p[i].argmax()])) for i in ranked]
    cut = int(num_label_issues(y, p, estimation_method="off_diagonal_calibrated"))
    return out, min(cut, len(out))


def features(d, cfg, source: str):
    """([views for the heads], features for the outliers, a name for their source). With a feature
    cache for this data (or audit.features=cache): the backbone's features and the pixels, the
    backbone's for outliers; else the pixels alone. Each view is the principal components
    (audit.feature_dims) of the standardised features, scaled as a whole: each component keeps its
    share of the variance, so the noise in the small ones is not blown up."""
    import torch

    from image_classifier.errors import UserError

    if source not in FEATURE_SOURCES:
        raise UserError(f"audit.features={source!r} is not one of {', '.join(FEATURE_SOURCES)}.")
    dims = int(cfg.audit.feature_dims)
    pixels = _view(torch.from_numpy(d.thumbs.reshape(len(d.thumbs), -1).astype(np.float32)), dims)
    pixels_name = f"pixels (PCA-{dims} of 32x32 thumbnails)"
    if source in ("auto", "cache"):
        cached = _cached_features(d, cfg)
        if cached is not None:
            x, name = cached
            backbone = _view(x, dims)
            return [backbone, pixels], backbone, f"{name} + {pixels_name}, one head each"
        if source == "cache":
            raise UserError(
                "audit.features=cache, but no feature cache matches this data and backbone. Build "
                "it with `uv run python commands.py command=cache-features` (same data options), "
                "or use audit.features=pixels."
            )
    return [pixels], pixels, pixels_name


def _view(x, dims: int):
    from image_classifier.audit.neighbours import principal_components

    std = x.std(0)
    # a floor, so a pixel that is almost constant (an image border) is not blown up into noise
    z = principal_components((x - x.mean(0)) / std.clamp_min(1e-3 * float(std.mean()) + 1e-9), dims)
    return z / z.std().clamp_min(1e-6)


def _cached_features(d, cfg):
    import torch

    from image_classifier.data.features import cache_folder, read_manifest
    from image_classifier.data.layouts import SPLITS
    from image_classifier.models.pretrained import weights_id

    folder, key = cache_folder(cfg, d.data_hash, weights_id(cfg.features))
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return None
    parts = [np.load(folder / f"{s}_features.npy", mmap_mode="r") for s in SPLITS]
    x = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    if len(x) != len(d.labels):  # unreadable files dropped since the cache was built
        return None
    return x, f"{manifest['backbone']} features from the cache ({folder.name})"
