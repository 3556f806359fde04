"""Label issues by confident learning: out-of-sample class probabilities from K-fold
cross-validation of a scikit-learn classifier on each view of the audit's features, ranked by
cleanlab (its tutorials' recipe: `cross_val_predict` probabilities, then `find_label_issues`).

The classifier is fitted to convergence whatever the number of images: an RBF support vector
machine with libsvm's pairwise Platt probabilities up to `SVC_MAX` images, above that a logistic
regression on a Nystroem approximation of the same kernel (linear in the number of images). Two
views of the data, one classifier each: a pretrained backbone's last two feature stages, pooled
(computed at twice the images' own size and kept per image content, data/features.py; the
feature cache's pooled output with audit.features=cache) and the pixels. Their average is kept,
unless one view alone fits the given labels clearly better (SINGLE_VIEW_GAIN).

The suspects: every image cleanlab flags (`find_label_issues`, pruned by its estimated noise
rates) and every image whose given label is less likely than chance, most suspicious first
(cleanlab's self-confidence: the out-of-sample probability of the given label). The recommended
cut is the suspects whose given label is less likely than audit.label_cut x chance; cleanlab's
own count is reported beside it. Measured on planted label flips: docs/benchmarks.md, "The audit
on data sets that are not the benchmark".
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

FEATURE_SOURCES = ("auto", "cache", "backbone", "pixels")  # audit.features
PROBABILITY_SOURCES = ("features", "trained")  # audit.probabilities (trained: audit/crossfit.py)
# audit.label_cut=auto, by audit.probabilities: x chance. Chosen on planted flips (colour-96,
# plant seeds 0 and 2 at 5 %: the smallest cut with recall >= 80 % at precision >= 50 % on
# both; docs/benchmarks.md): the features' classifiers 0.45; the trained fits averaged with them
# 0.8, since an average of two views is less sure of a wrong label than either alone
LABEL_CUTS = {"features": 0.45, "trained": 0.8}
# One view alone replaces the views' average only when its log loss is this much lower: on the
# Fashion-MNIST sets the backbone alone fit 1-2 % better, and its cut lost about 20 points of
# precision at 1 % planted flips (docs/benchmarks.md)
SINGLE_VIEW_GAIN = 0.1
SVC_MAX = 5000  # above this many images the SVM's quadratic cost is too high: kernel features
NYSTROEM_COMPONENTS = 1000


def classifier(n: int, smallest: int, seed: int):
    """The classifier fitted in each fold: an RBF SVM with libsvm's own Platt probabilities
    (pairwise, fitted on its internal 5-fold cross-validation) for up to SVC_MAX images, a
    logistic regression on Nystroem RBF features above (and where a class has fewer than 2
    training images in a fold). `smallest`: the fewest training images a class has in a fold."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    if n <= SVC_MAX and smallest >= 2:
        return SVC(probability=True, random_state=seed)
    return make_pipeline(
        Nystroem(n_components=min(NYSTROEM_COMPONENTS, n), random_state=seed),
        LogisticRegression(max_iter=2000),
    )


def describe(n: int) -> str:
    if n <= SVC_MAX:
        return "an RBF support vector machine (libsvm's Platt probabilities)"
    return f"a logistic regression on {NYSTROEM_COMPONENTS} Nystroem RBF features"


def describe_views(names: list[str], which: int) -> str:
    """What the label probabilities came from: `which` is a view's index, or -1 for the average."""
    if len(names) == 1:
        return names[0]
    if which < 0:
        return " + ".join(names) + ", one classifier each, averaged"
    others = " or ".join(names[:which] + names[which + 1 :])
    return f"{names[which]}, which fit the labels clearly better than {others} or both averaged"


def out_of_sample_probs(views: list, labels: np.ndarray, folds: int, seed: int):
    """((N, C) class probabilities from classifiers that never saw the image, the view(s) they
    came from: a view's index, or -1 for the average; [each view's own (N, C) probabilities]).
    Every view uses the same stratified folds. The views' average is kept unless one view alone
    fits the given labels clearly better (log loss SINGLE_VIEW_GAIN lower): the backbone knows
    photographs, the pixels know tiny grey images, and where both see something the average
    ranks the wrong labels better than the sharper view alone."""
    import os
    import warnings

    from joblib import Parallel, delayed, parallel_config
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    n, c = len(labels), int(labels.max()) + 1
    folds = max(2, min(folds, int(np.bincount(labels, minlength=c).max())))
    present = np.unique(labels)
    counts = np.bincount(labels)[present]
    smallest = int((counts - np.ceil(counts / folds)).min())
    model, xs = classifier(n, smallest, seed), [np.asarray(x) for x in views]
    # Every (view, fold) fit side by side, each with one BLAS/OpenMP thread. Measured on 2 cores:
    # the Nystroem logistic regression ran 2x faster with one BLAS thread than with two (small
    # products: the hand-offs cost more than they share); fmnist-10000's two views 40 s -> 11 s,
    # colour-96's SVMs 21 s -> 11 s. The SVMs in processes: libsvm draws Platt's internal folds
    # from one random generator per process, and SVMs fitted in threads raced on it (colour-96's
    # list moved by a few rows from run to run); the regression has no such state: threads.
    each = [np.zeros((n, c)) for _ in xs]
    loky = isinstance(model, SVC)
    side_by_side = parallel_config(
        backend="loky" if loky else "threading",
        n_jobs=min(folds * len(xs), os.cpu_count() or 1),
        **({"inner_max_num_threads": 1} if loky else {}),
    )
    with warnings.catch_warnings(), side_by_side, threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k"
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        jobs = [(v, s) for v in range(len(xs)) for s in cv.split(np.zeros((n, 1)), labels)]
        bar = tqdm(total=len(jobs), desc="audit: label fits", unit="fit", disable=n < 2000 or None)
        fits = Parallel(return_as="generator")(
            delayed(_fit_fold)(model, xs[v], labels, train, test, c) for v, (train, test) in jobs
        )
        for (v, (_, test)), out in zip(jobs, fits, strict=True):
            each[v][test] = out
            bar.update()
        bar.close()
    probs, which = choose_view(each, labels)
    return probs.astype(np.float32), which, each


def choose_view(each: list, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(probabilities, -1) for the views' average; (a view's, its index) where that view alone
    fits the given labels with a log loss SINGLE_VIEW_GAIN lower than the average's."""
    rows = np.arange(len(labels))

    def loss(p):
        return -np.log(np.clip(p[rows, labels], 1e-12, None)).mean()

    average = sum(each) / len(each)
    alone = min(range(len(each)), key=lambda i: loss(each[i]))
    if loss(each[alone]) < (1 - SINGLE_VIEW_GAIN) * loss(average):
        return each[alone], alone
    return average, -1


def _fit_fold(model, x: np.ndarray, labels: np.ndarray, train, test, classes: int) -> np.ndarray:
    """(len(test), classes) probabilities from `model` fitted without the test fold (classes
    absent from the training folds get 0)."""
    import warnings

    from sklearn.base import clone

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `probability` parameter", FutureWarning)
        fitted = clone(model).fit(x[train], labels[train])
    out = np.zeros((len(test), classes))
    out[:, fitted.classes_] = fitted.predict_proba(x[test])
    return out


def label_issues(labels: np.ndarray, probs: np.ndarray, cut: float):
    """([(index, self-confidence, suggested class)] the suspects, most suspicious first; the
    recommended cut; cleanlab's calibrated estimate of how many labels are wrong).

    The suspects: every image cleanlab flags and every image whose given label `probs` find less
    likely than chance (1 / the number of classes): cleanlab's pruning by estimated noise rates
    leaves such images out on classes that look alike, or where no class is confident enough (a
    retina crop labelled immunohistochemistry, 0.095 by the backbone, 0.84 by the pixels: on
    photos-7 at 5 % planted flips, 1 of 52 left out of the list on one plant seed of three).
    Images of a class with fewer than FEW_TO_LEARN images are not suspects. The recommended cut:
    the suspects whose given label is less likely than `cut` x chance (audit.label_cut).
    Cleanlab's own estimate counts every image the classifier confidently assigns elsewhere,
    which on such classes (Fashion-MNIST's shirts and T-shirts) is several times the wrong
    labels. Both rules were chosen on planted label flips (docs/benchmarks.md)."""
    import warnings

    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(labels)
    if len(present) < 2:
        return [], 0, 0
    # cleanlab wants classes 0..K-1 with every one present: drop the columns of absent classes
    remap = np.full(int(labels.max()) + 1, -1)
    remap[present] = np.arange(len(present))
    y, p = remap[labels], _rows(probs[:, present])
    chance = 1 / len(present)
    scores = get_label_quality_scores(y, p, method="self_confidence")
    with warnings.catch_warnings():  # the report names the classes too small to rank
        warnings.filterwarnings("ignore", "May not flag all label issues", UserWarning)
        flagged = find_label_issues(y, p) | (scores < max(1.0, cut) * chance)
    rows = np.arange(len(y))
    # a class of a few images cannot be learnt by the classifiers: its images would all come
    # first, whatever their labels; they are left to the report's too_few_to_rank
    flagged &= ~too_few(labels, int(labels.max()) + 1)[labels]
    ranked = sorted(rows[flagged].tolist(), key=lambda i: scores[i])
    out = [(int(i), float(scores[i]), int(present[p[i].argmax()])) for i in ranked]
    estimate = int(num_label_issues(y, p, estimation_method="off_diagonal_calibrated"))
    return out, sum(1 for _, q, _ in out if q < cut * chance), estimate


def multi_label_issues(views: list, sets: list[tuple], names: list[str], folds: int, seed: int):
    """Multi-label data: ([(index, label quality, suggested labels)], cleanlab's count). Per
    label, out-of-sample probabilities of a logistic regression on each view, averaged;
    cleanlab's multi-label quality score ranks the images its `find_label_issues(multi_label=
    True)` flags, lowest first. Ranking each label set as a class instead put 23 of 125 planted
    wrong sets in the first 250 rows of 2x2 Fashion-MNIST mosaics (docs/benchmarks.md)."""
    import warnings

    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores

    y = np.zeros((len(sets), len(names)), dtype=np.int64)
    for i, t in enumerate(sets):
        y[i, list(t)] = 1
    held = y.sum(0)
    varies, always = (
        (held > 0) & (held < len(sets)),
        [names[j] for j in np.flatnonzero(held == len(sets))],
    )
    if not varies.any():  # a label every image holds, or none, says nothing to check
        return [], 0
    y, names = y[:, varies], [n for n, v in zip(names, varies, strict=True) if v]
    each = [_per_label_probs(np.asarray(v), y, folds, seed) for v in views]
    probs, given = sum(each) / len(each), [list(np.flatnonzero(row)) for row in y]
    if y.shape[1] == 1:  # one label varies: a yes/no question, cleanlab's single-label check
        from cleanlab.rank import get_label_quality_scores as single

        two = np.hstack([1 - probs, probs])
        with warnings.catch_warnings():  # as label_issues: a rare label is named, not warned of
            warnings.filterwarnings("ignore", "May not flag all label issues", UserWarning)
            quality, flagged = single(y[:, 0], two), find_label_issues(y[:, 0], two)
    else:
        quality = get_label_quality_scores(given, probs)
        flagged = find_label_issues(given, probs, multi_label=True)
    flagged = np.flatnonzero(flagged)
    order = flagged[np.argsort(quality[flagged], kind="stable")]
    out = [(int(i), float(quality[i]), suggested(probs[i], names, always)) for i in order]
    return out, len(flagged)


def suggested(p: np.ndarray, names: list[str], always: list[str]) -> str:
    """The labels at 0.5 or more, or else the likeliest one (as `infer`'s predicted_class), and
    those every image holds, as "a;b"."""
    likely = np.flatnonzero(p >= 0.5) if p.max() >= 0.5 else [int(p.argmax())]
    return ";".join(sorted(always + [names[j] for j in likely]))


def _per_label_probs(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N, labels) out-of-sample probabilities, a logistic regression per label, its folds
    stratified by that label; a label on fewer images than two folds need gets its share."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    out = np.empty(y.shape, dtype=np.float64)
    for j in range(y.shape[1]):
        k = min(folds, int(y[:, j].sum()), int(len(y) - y[:, j].sum()))
        if k < 2:
            out[:, j] = y[:, j].mean()
            continue
        cv = StratifiedKFold(k, shuffle=True, random_state=seed)
        model = LogisticRegression(max_iter=2000)
        out[:, j] = cross_val_predict(model, x, y[:, j], cv=cv, method="predict_proba")[:, 1]
    return out


def too_few(labels: np.ndarray, classes: int) -> np.ndarray:
    """Per class, whether it has images but fewer than FEW_TO_LEARN: too few for the classifiers
    to learn, so its images would head the suspects whatever their labels."""
    from image_classifier.data.splits import FEW_TO_LEARN  # torch: not at import (settings)

    counts = np.bincount(labels, minlength=classes)
    return (counts > 0) & (counts < FEW_TO_LEARN)


def _rows(p: np.ndarray) -> np.ndarray:
    return p / p.sum(1, keepdims=True).clip(1e-12)


def features(d, cfg, source: str):
    """([views for the classifiers], features for the outliers, [a name for each view]).

    Two views when a backbone is at hand, each with its own classifier: the backbone's features
    (audit/backbone.py: its last stages, computed here; a matching feature cache's pooled output
    with audit.features=cache) and the pixels; both, side by side, for the outliers. The pixels
    alone with audit.features=pixels, or when no pretrained backbone can be loaded. Each view is the
    principal components (audit.feature_dims) of the standardised features, scaled as a whole:
    each component keeps its share of the variance, so the noise in the small ones is not blown
    up."""
    import torch

    from image_classifier.audit import backbone
    from image_classifier.errors import UserError

    if source not in FEATURE_SOURCES:
        raise UserError(
            f"audit.features={source!r} is not one of {', '.join(FEATURE_SOURCES)}. Use auto "
            "(the default) unless you want one source only."
        )
    dims = int(cfg.audit.feature_dims)
    pixels = _view(torch.from_numpy(d.thumbs.reshape(len(d.thumbs), -1).astype(np.float32)), dims)
    pixels_name = f"pixels (PCA-{dims} of 32x32 thumbnails)"
    found, why = None, ""
    if source == "cache":
        found = backbone.cached_features(d, cfg)
        if found is None:
            raise UserError(
                "audit.features=cache, but no feature cache matches this data and backbone. Build "
                "it with `uv run python commands.py command=cache-features` (same data options), "
                "or use audit.features=auto."
            )
    if found is None and source in ("auto", "backbone"):
        try:
            found = backbone.backbone_features(d, cfg)
        except UserError as e:
            if source == "backbone":
                raise
            why = f" (no backbone view: {e})"
    if found is None:
        return [pixels], pixels, [pixels_name + why]
    net_view = _view(found[0], dims)
    both = torch.cat([net_view, pixels], 1)  # outliers: far from their neighbours in either view
    return [net_view, pixels], both, [found[1], pixels_name]


def _view(x, dims: int):
    from image_classifier.audit.neighbours import principal_components

    std = x.std(0)
    # a floor, so a pixel that is almost constant (an image border) is not blown up into noise
    z = principal_components((x - x.mean(0)) / std.clamp_min(1e-3 * float(std.mean()) + 1e-9), dims)
    return z / z.std().clamp_min(1e-6)
