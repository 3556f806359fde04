"""`audit.probabilities=trained`: label probabilities from the training job itself, cross-fitted.

The data's images are cut into audit.folds stratified folds; for each, `train` runs as the
command line asks (model=auto's choices, the train.* options given) on the other folds, from a
CSV manifest of their files and given labels, with a tenth of them for validation, and its best
checkpoint predicts the fold it never saw. What cleanlab's image tutorial does, at audit.folds
times a training run's cost. On colour-96 (Fashion-MNIST items on photo crops, 3,250 images, 5 %
planted flips) the backbone features' classifiers named 63 % of the true labels out of sample,
the cross-fitted EfficientNet-Lite0 79 %; the two averaged (what run.py keeps) lifted the
ranking's precision at 80 % recall from 44 / 33 % to 63 / 60 % on two plantings, and at its cut
(audit.label_cut=auto: 0.8 x chance) recall / precision are 84 / 56 % and 81 / 60 %
(docs/benchmarks.md).

Each fold's training log and summary stay in `<audit folder>/folds/<k>/`; its checkpoints and
decoded cache are removed once it has predicted.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from image_classifier.errors import Interrupted, UserError

VAL_SHARE = 0.1  # of each fold's training images, for its early stopping and best checkpoint


def trained_probs(d, cfg, out: Path, train) -> tuple[np.ndarray, str, str]:
    """((N, C) out-of-sample probabilities of d's images, what they came from, a warning when a
    fit stayed at chance, else ""). `train`: the train command's function (run_train), handed
    over by commands.py: the audit package does not import the training code (pyproject.toml's
    import contracts)."""
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    check_trainable(d, train)
    counts = np.bincount(d.labels, minlength=len(d.classes))
    folds = max(2, min(int(cfg.audit.folds), int(counts[counts > 0].min())))
    cv = StratifiedKFold(folds, shuffle=True, random_state=int(cfg.seed))
    probs, models, weak = np.zeros((len(d.labels), len(d.classes))), set(), []
    augment: dict = {}  # the first fit's flips and shifts, as train chose them
    bar = tqdm(total=folds, desc="audit: cross-fitted training", unit="fit")
    for k, (rows, held) in enumerate(cv.split(np.zeros((len(d.labels), 1)), d.labels)):
        where = out / "folds" / str(k)
        try:
            result = _fit(d, cfg, rows, where, train, augment)
        except KeyboardInterrupt:
            raise Interrupted(
                f"audit interrupted in its cross-fitted training (fit {k + 1} of {folds}); no "
                "report was written. Run it again, or without audit.probabilities=trained."
            ) from None
        probs[held], model = _predict(result["checkpoint"], [d.names[i] for i in held], d.classes)
        augment = augment or _augment_of(result["checkpoint"])  # kept from _predict's one read
        models.add(model)
        if stayed_at_chance(result):  # its own summary says so, in a log no one reads
            weak.append(str(k))
        for done in ("checkpoints", "cache"):
            shutil.rmtree(where / done, ignore_errors=True)
        bar.update()
    bar.close()
    what = f"the training job ({', '.join(sorted(models))}), fitted {folds} times, each fit "
    what += f"predicting the 1/{folds} of the images it did not train on"
    warning = (
        f"fit {', '.join(weak)} did no better than chance on its validation images, so the "
        f"ranking leans on the features alone (why: {out}/folds/<k>/train.log)"
        if weak
        else ""
    )
    return probs, what, warning


def stayed_at_chance(result: dict) -> bool:
    """Whether a fit's best val accuracy was not above always answering the largest class. A
    fit right on every one of its validation images, too few to show it (a tenth of a fold of a
    small, uneven folder: 17 images, 16 of one class), is not: the audit said all three fits on
    such a folder "did no better than chance" at 100 %."""
    c = result.get("at_chance")
    return bool(c) and (not c.get("too_few") or (result.get("best_score") or 0.0) <= c["rate"])


def check_trainable(d, train) -> None:
    if train is None:
        raise UserError(
            "audit.probabilities=trained needs the training job: call run_audit(cfg, "
            "train=run_train) (image_classifier.training.train), as commands.py does."
        )
    if d.pixels is not None:
        raise UserError(
            "audit.probabilities=trained trains on image files, and this data is arrays "
            f"({d.layout or 'a packaged data set'}). Write it out as class folders, or audit it "
            "with audit.probabilities=features."
        )
    if d.multi_label:
        raise UserError(
            "audit.probabilities=trained is for single-label data; multi-label data is audited "
            "with audit.probabilities=features."
        )


def _augment_of(checkpoint: str) -> dict:
    """The flips and shifts a fit trained with. The later fits take the first one's rather than
    run train.augment.hflip=auto's mirror check again (9-12 s a fit on 2 cores for its
    400-image sample, training/mirror.py; 4-7 s for 176 images)."""
    from image_classifier.models.checkpoint import stored_config

    a = ((stored_config(checkpoint) or {}).get("train") or {}).get("augment") or {}
    return {key: a[key] for key in ("hflip", "shift") if key in a}


def _fit(d, cfg, rows: np.ndarray, where: Path, train, augment: dict) -> dict:
    """`train` on these rows' files and given labels, its output (printed lines included) in
    `where`; `augment`: train.augment values to fix (an earlier fit's)."""
    where.mkdir(parents=True, exist_ok=True)
    manifest = where / "images.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str(Path(d.names[i]).resolve()), d.classes[d.labels[i]]] for i in rows)
    fold = cfg.copy()
    with open_dict(fold):
        fold.command = "train"
        fold.data.root = str(manifest)
        fold.data.split = [1 - VAL_SHARE, VAL_SHARE, 0]
        fold.data.classes = list(d.classes)  # every fold's model answers in the same order
        fold.data.csv_file_column, fold.data.csv_label_column = "path", "label"
        fold.data.label_pattern = None
        fold.data.multi_label = False
        fold.data.cache_dir = str(where / "cache")
        fold.logger.enabled = False
        fold.paths.output_dir = str(where)
        for key, value in augment.items():
            fold.train.augment[key] = value
    with open(where / "train.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        return train(fold)


def _predict(checkpoint: str, names: list[str], classes: list[str]) -> tuple[np.ndarray, str]:
    """(the checkpoint's probabilities of these files, in `classes`' order; its model's name)."""
    from image_classifier.inference.predictor import load_predictor
    from image_classifier.inference.rows import predict_paths

    predictor = load_predictor(checkpoint)
    rows = predict_paths(predictor, [Path(n) for n in names])
    out = np.full((len(rows), len(classes)), 1 / len(classes))
    for i, row in enumerate(rows):
        if row.get("all_predictions"):  # an image unreadable now: it stays at chance
            out[i] = [row["all_predictions"][c] for c in classes]
    return out, str((predictor.meta.extra.get("model") or {}).get("name", "model"))
