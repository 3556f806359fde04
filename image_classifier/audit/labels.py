"""Label issues by confident learning: out-of-sample class probabilities from K-fold
cross-validation of a scikit-learn classifier on each view of the audit's features, ranked by
cleanlab (its tutorials' recipe: `cross_val_predict` probabilities, then `find_label_issues`).

The classifier is fitted to convergence whatever the number of images: an RBF support vector
machine with libsvm's pairwise Platt probabilities up to `SVC_MAX` images, above that a logistic
regression on a Nystroem approximation of the same kernel (linear in the number of images). Two
views of the data, one classifier each: a pretrained backbone's features (the feature cache's
when one matches, else computed here at twice the images' own size and kept per image content,
data/features.py) and the pixels; of each alone and their average, the probabilities that fit
the given labels best are kept.

The suspects: every image cleanlab flags (`find_label_issues`, pruned by its estimated noise
rates), every image each view's classifier puts below chance and every image inside the
recommended cut, most suspicious first
(cleanlab's self-confidence: the out-of-sample probability of the given label). The recommended
cut is the suspects whose given label is less likely than audit.label_cut x chance; cleanlab's
own count is reported beside it. Measured on planted label flips: docs/benchmarks.md, "The audit
on data sets that are not the benchmark".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FEATURE_SOURCES = ("auto", "cache", "backbone", "pixels")  # audit.features
# The backbone view's input side: UPSCALE x the images' median longer side, within BACKBONE_SIDE.
# ImageNet features separate small photos better enlarged toward the 224 px they were trained at:
# colour-96 (96 px) 51 -> 55-59 % out of sample at 160-224 px; photos-7 (81 px) at 162 px put all
# 10 planted flips of its 1 % copy in the first 20 rows, not 9 (docs/benchmarks.md)
BACKBONE_SIDE = (64, 224)
UPSCALE = 2
BATCH = 64
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
        return " + ".join(names) + ", one classifier each, averaged: the best fit of the labels"
    others = " or ".join(names[:which] + names[which + 1 :])
    return f"{names[which]}, which fit the labels better than {others} or both averaged"


def out_of_sample_probs(views: list, labels: np.ndarray, folds: int, seed: int):
    """((N, C) class probabilities from classifiers that never saw the image, the view(s) they
    came from, [each view's own (N, C) probabilities]). Every view uses the same stratified
    folds; of each view alone and the average of all, the one whose probabilities fit the given
    labels best (lowest log loss) is kept: the backbone's features know photographs, the pixels
    know tiny grey images, and the average is best where both see something."""
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
    candidates = [(sum(each) / len(each), -1)] + [(p, i) for i, p in enumerate(each)]
    loss = [-np.log(np.clip(p[np.arange(n), labels], 1e-12, None)).mean() for p, _ in candidates]
    probs, which = candidates[int(np.argmin(loss))]
    return probs.astype(np.float32), which, each


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


def label_issues(labels: np.ndarray, probs: np.ndarray, each: list, cut: float):
    """([(index, self-confidence, suggested class)] the suspects, most suspicious first; the
    recommended cut; cleanlab's calibrated estimate of how many labels are wrong).

    The suspects: every image cleanlab flags, every image whose given label each view's
    classifier (`each`) on its own finds less likely than chance (1 / the number of classes),
    which cleanlab's pruning by estimated noise rates leaves out on classes that genuinely look
    alike, and every image inside the recommended cut (one view sure of another class is
    enough: a cat's eye labelled astronaut, 0.05 by the backbone, 0.18 by the pixels). Images
    of a class with fewer than FEW_TO_LEARN images are not suspects. The recommended cut: the
    suspects whose given label is less likely than `cut` x chance (audit.label_cut). Cleanlab's
    own estimate counts every image the classifier confidently assigns elsewhere, which on such
    classes (Fashion-MNIST's shirts and T-shirts) is several times the wrong labels. Both rules
    were chosen on planted label flips (docs/benchmarks.md)."""
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
    flagged = find_label_issues(y, p)
    rows = np.arange(len(y))
    flagged |= np.all([_rows(q[:, present])[rows, y] < chance for q in each], axis=0)
    flagged |= scores < cut * chance  # all the recommended cut says to review, flagged or not
    # a class of a few images cannot be learnt by the classifiers: its images would all come
    # first, whatever their labels; they are left to the report's too_few_to_rank
    flagged &= ~too_few(labels, int(labels.max()) + 1)[labels]
    ranked = sorted(rows[flagged].tolist(), key=lambda i: scores[i])
    out = [(int(i), float(scores[i]), int(present[p[i].argmax()])) for i in ranked]
    estimate = int(num_label_issues(y, p, estimation_method="off_diagonal_calibrated"))
    return out, sum(1 for _, q, _ in out if q < cut * chance), estimate


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
    (from a matching feature cache, else computed here by cfg.features' pretrained backbone at the
    images' size x UPSCALE) and the pixels; both, side by side, for the outliers. The pixels alone
    with audit.features=pixels, or when no pretrained backbone can be loaded. Each view is the
    principal components (audit.feature_dims) of the standardised features, scaled as a whole:
    each component keeps its share of the variance, so the noise in the small ones is not blown
    up."""
    import torch

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
    if source in ("auto", "cache"):
        found = _cached_features(d, cfg)
        if found is None and source == "cache":
            raise UserError(
                "audit.features=cache, but no feature cache matches this data and backbone. Build "
                "it with `uv run python commands.py command=cache-features` (same data options), "
                "or use audit.features=auto."
            )
    if found is None and source in ("auto", "backbone"):
        try:
            found = backbone_features(d, cfg)
        except UserError as e:
            if source == "backbone":
                raise
            why = f" (no backbone view: {e})"
    if found is None:
        return [pixels], pixels, [pixels_name + why]
    backbone = _view(found[0], dims)
    both = torch.cat([backbone, pixels], 1)  # outliers: far from their neighbours in either view
    return [backbone, pixels], both, [found[1], pixels_name]


def backbone_features(d, cfg):
    """(N, dim) features of every audited image from cfg.features' pretrained backbone, at the
    UPSCALE x the images' median longer side, within BACKBONE_SIDE; and a name for them. Images
    whose content the per-image store holds (data/features.py) are read from it, the others
    computed and added to it."""
    import torch
    from tqdm.auto import tqdm

    from image_classifier.data.features import (
        add_image_features,
        image_store_folder,
        read_image_features,
    )
    from image_classifier.errors import UserError
    from image_classifier.models.factory import create_backbone
    from image_classifier.models.pretrained import weights_id

    fcfg = cfg.features
    if fcfg.pretrained is False or str(fcfg.pretrained).lower() == "false":
        raise UserError("features.pretrained=false: an untrained backbone says nothing of labels")
    side, n = backbone_side(d.sizes), len(d.labels)
    store = image_store_folder(fcfg, weights_id(fcfg), side)
    found, stored = read_image_features(store, d.digests)
    todo = sorted(set(range(n)) - set(found))
    if todo:
        net, channels, out = create_backbone(fcfg), int(fcfg.channels), []
        quiet = len(todo) < 2000 or None  # None: a bar on a terminal only
        bar = tqdm(total=len(todo), desc="audit: backbone features", unit="img", disable=quiet)
        with torch.inference_mode():
            for start in range(0, len(todo), BATCH):
                batch = _images(d, todo[start : start + BATCH], side, channels)
                out.append(net(batch).float().numpy())
                bar.update(len(batch))
        bar.close()
        computed = np.concatenate(out)
        try:
            add_image_features(store, [d.digests[i] for i in todo], computed)
        except OSError as e:  # a full disk or a read-only cache costs the next audit time only
            log.warning("Could not keep the backbone features in %s (%s)", store, e)
    x = np.zeros((n, (computed if todo else stored).shape[1]), np.float32)
    if found:
        x[found] = stored
    if todo:
        x[todo] = computed
    reused = f" ({len(found):,} of {n:,} read from {store})" if found else ""
    return torch.from_numpy(x), f"{fcfg.backbone} features at {side}x{side}{reused}"


def backbone_side(sizes: np.ndarray) -> int:
    """The backbone view's input side for images of these (N, 2) sizes."""
    median = np.median(sizes.max(1)) if len(sizes) else 0
    return int(np.clip(UPSCALE * median, *BACKBONE_SIDE))


def _images(d, rows: list[int], side: int, channels: int):
    """(len(rows), channels, side, side) float 0..255: array data from d.pixels, files re-read."""
    import torch
    import torch.nn.functional as F

    if d.pixels is not None and len(d.pixels) == len(d.labels):
        x = torch.from_numpy(d.pixels[rows]).float()
        if x.shape[1] != channels:
            x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from image_classifier.data.images import open_bytes, to_model_mode

    def read(i):
        im = open_bytes(Path(d.names[i]).read_bytes(), d.names[i], fit=side)
        im = to_model_mode(im, channels).resize((side, side), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return torch.from_numpy(np.stack(list(pool.map(read, rows))))


def _view(x, dims: int):
    from image_classifier.audit.neighbours import principal_components

    std = x.std(0)
    # a floor, so a pixel that is almost constant (an image border) is not blown up into noise
    z = principal_components((x - x.mean(0)) / std.clamp_min(1e-3 * float(std.mean()) + 1e-9), dims)
    return z / z.std().clamp_min(1e-6)


def _cached_features(d, cfg):
    import torch

    from image_classifier.data.cachedir import read_manifest
    from image_classifier.data.features import cache_folder
    from image_classifier.data.identity import SPLITS
    from image_classifier.models.pretrained import weights_id

    folder, key = cache_folder(cfg, d.data_hash, weights_id(cfg.features), d.classes)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return None
    parts = [np.load(folder / f"{s}_features.npy", mmap_mode="r") for s in SPLITS]
    x = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    if len(x) != len(d.labels):  # unreadable files dropped since the cache was built
        return None
    return x, f"{manifest['backbone']} features from the cache ({folder.name})"
