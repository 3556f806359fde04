"""One image's answer, as docs/commands.md shows it: the row that `infer` writes, `serve` and
the MLflow model return, and the Ray engine computes, for a readable image or with the reason
an image could not be used."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from image_classifier.data.images import (
    ImageError,
    Preprocessing,
    decode_bytes,
    display_name,
    load_array,
    path_problem,
)
from image_classifier.errors import Interrupted


def load_image(path: Path, pre: Preprocessing):
    """(the model's uint8 CHW array, None) for a usable image file, or (None, why it is not)."""
    if problem := path_problem(path):
        return None, problem
    try:
        return load_array(path, pre), None
    except ImageError as e:
        return None, e.reason


def decoded(data: bytes, pre: Preprocessing, name: str):
    """(array, None) for an encoded image, or (None, why it cannot be used)."""
    try:
        return decode_bytes(data, pre, name=name), None
    except ImageError as e:
        return None, e.reason


def predict_paths(
    predictor,
    paths: list[Path],
    batch_size: int = 32,
    top_k: int | None = None,
    threshold: float | None = None,
) -> list[dict]:
    """One row per path, in order; a bar with a count and an ETA on stderr past a few batches.
    Ctrl-C raises `Interrupted` holding the rows of the batches finished before it."""
    from tqdm.auto import tqdm

    thresholds = predictor.meta.thresholds(threshold)
    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc="infer", unit="img", disable=len(paths) <= 4 * batch_size)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            names = [display_name(p) for p in chunk]
            try:
                rows += predict_batch(predictor, chunk, names, pool, top_k, thresholds)
            except KeyboardInterrupt:
                raise Interrupted(done=rows) from None
            bar.update(len(chunk))
    return rows


def predict_batch(predictor, paths, names, pool, top_k, thresholds) -> list[dict]:
    """Rows for one batch of files (`names` as the rows show them), read in `pool`'s threads."""
    pre = predictor.meta.preprocessing
    return rows_for(
        predictor, names, list(pool.map(lambda p: load_image(p, pre), paths)), top_k, thresholds
    )


def rows_for(predictor, names, loaded, top_k, thresholds) -> list[dict]:
    """One row per name from `loaded` ((array, None) or (None, why)): one model call for the
    arrays, the reason for each of the others."""
    good = [i for i, (arr, _) in enumerate(loaded) if arr is not None]
    probs = predictor.predict(np.stack([loaded[i][0] for i in good])) if good else []
    by_index = dict(zip(good, probs, strict=True))
    classes = predictor.meta.classes
    return [
        prediction_row(name, by_index[i], classes, top_k, thresholds)
        if i in by_index
        else error_row(name, loaded[i][1])
        for i, name in enumerate(names)
    ]


def prediction_row(
    path: str,
    probs: np.ndarray,
    classes: list[str],
    k: int | None = None,
    thresholds: list[float] | None = None,
) -> dict:
    """One image's answer, as docs/commands.md shows it (infer, serve and the MLflow model).
    Multi-label models (`thresholds` given) add `predicted_labels`: every label whose probability
    reaches its threshold, most probable first; `predicted_class` is the most probable label."""
    k = len(classes) if not k else max(1, min(int(k), len(classes)))
    order = np.argsort(-probs, kind="stable")
    row = {
        "path": path,
        "predicted_class": classes[int(order[0])],
        "confidence": round(float(probs[order[0]]), 6),
        "all_predictions": {classes[int(j)]: round(float(probs[j]), 6) for j in order[:k]},
    }
    if thresholds is not None:
        row["predicted_labels"] = [classes[int(j)] for j in order if probs[j] >= thresholds[j]]
    return row


def error_row(path: str, message: str) -> dict:
    """An image that could not be used, in the same shape, with the reason."""
    return {
        "path": path,
        "predicted_class": None,
        "confidence": None,
        "all_predictions": {},
        "error": message,
    }
