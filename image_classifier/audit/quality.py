"""Image-quality checks with cleanvision's measures, computed on whole arrays at once.

cleanvision itself decodes and scores image by image (about 55 images/s on 2 cores: 20 minutes
for 70,000 images), so the same measures run here on the thumbnails the audit already holds:
  dark            the brightest pixels are dim: 99th-percentile brightness / 255 below `dark`
  light           the darkest pixels are bright: 5th-percentile brightness / 255 above `light`
  low_information the grey-level histogram's entropy / 8 bits below `low_information`
                  each of these three also standing out from the image's class: its brightest
                  pixels' brightness, its darkest pixels' distance from white, or its entropy at
                  most `class_share` x the class's median. Page scans are light, fluorescence
                  micrographs dark and of few grey levels by nature (38 % of a folder of pages
                  was "light", 35 % of one of micrographs "dark"); an underexposed photo among
                  photos, a blank page among pages, still stand out
  blurry          the variance of the Laplacian below `blurry` x the median of the image's class
                  (of the data, for a class of fewer than MIN_CLASS images), and that variance per
                  unit of the grey-level variance below `blurry_contrast` x its class's median: a
                  class that is smooth by nature (a moon's surface, sky) is not blurry, an image
                  blurrier than its classmates is, and a sharp image of low contrast (a dim item on
                  a dark ground) keeps its detail in proportion to its contrast, so is not; an
                  image low_information flags is not also called blurry
  odd_size        sqrt(width x height) more than `odd_size` times off the data's median
  odd_aspect_ratio w/h more than 1 / `odd_aspect_ratio` times off the data's median w/h (in a
                  folder of wide strips, a text line or a spectrogram each, the square image is odd)
  grey_in_colour  a grey file in a colour data set
"""

from __future__ import annotations

import numpy as np

MIN_CLASS = 10
CLASS_SHARE_CHECKS = ("dark", "light", "low_information")  # also judged against the class


def _relative(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """x / the median of x over the image's class (over all, for a class under MIN_CLASS)."""
    ref = np.full(len(x), max(float(np.median(x)), 1e-9) if len(x) else 1.0)
    for k in np.unique(labels):
        if (inside := labels == k).sum() >= MIN_CLASS:
            ref[inside] = max(float(np.median(x[inside])), 1e-9)
    return x / ref


def scores(thumbs: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    flat = thumbs.reshape(len(thumbs), -1)
    hist = np.stack([np.bincount(r, minlength=256) for r in flat.clip(0, 255).astype(np.int64)])
    p = hist / hist.sum(1, keepdims=True)
    entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(1) / 8.0
    lap = (
        -4 * thumbs[:, 1:-1, 1:-1]
        + thumbs[:, :-2, 1:-1]
        + thumbs[:, 2:, 1:-1]
        + thumbs[:, 1:-1, :-2]
        + thumbs[:, 1:-1, 2:]
    )
    sharp = lap.reshape(len(thumbs), -1).var(1)
    contrast = flat.var(1)
    side = np.sqrt(sizes[:, 0].astype(float) * sizes[:, 1])
    aspect = sizes[:, 0] / np.maximum(sizes[:, 1], 1)
    dark, light = np.percentile(flat, 99, axis=1) / 255.0, np.percentile(flat, 5, axis=1) / 255.0
    return {
        "dark": dark,
        "light": light,
        "low_information": entropy,
        # the same three against the image's class: brightness, distance from white, entropy
        "dark_of_class": _relative(dark, labels),
        "light_of_class": _relative(1 - light, labels),
        "low_information_of_class": _relative(entropy, labels),
        "blurry": _relative(sharp, labels),
        "blurry_contrast": _relative(sharp / np.maximum(contrast, 1e-6), labels),
        "odd_size": np.maximum(side / np.median(side), np.median(side) / np.maximum(side, 1)),
        "odd_aspect_ratio": np.minimum(aspect / np.median(aspect), np.median(aspect) / aspect),
    }


def find(thumbs, sizes, labels, grey, colour_data: bool, limits: dict) -> dict[str, list[int]]:
    """Check name -> indices of the images it flags (each list sorted, worst first)."""
    s = scores(thumbs, sizes, labels)
    share = {k: s[f"{k}_of_class"] < limits["class_share"] for k in CLASS_SHARE_CHECKS}
    blank = (s["low_information"] < limits["low_information"]) & share["low_information"]
    blurred = (s["blurry"] < limits["blurry"]) & (s["blurry_contrast"] < limits["blurry_contrast"])
    flagged = {
        "dark": np.flatnonzero((s["dark"] < limits["dark"]) & share["dark"]),
        "light": np.flatnonzero((s["light"] > limits["light"]) & share["light"]),
        "low_information": np.flatnonzero(blank),
        "blurry": np.flatnonzero(blurred & ~blank),  # a blank frame has no detail to lose
        "odd_size": np.flatnonzero(s["odd_size"] > limits["odd_size"]),
        "odd_aspect_ratio": np.flatnonzero(s["odd_aspect_ratio"] < limits["odd_aspect_ratio"]),
        "grey_in_colour": np.flatnonzero(grey) if colour_data else np.array([], int),
    }
    worst_first = {"light": -1, "odd_size": -1}
    out = {}
    for name, idx in flagged.items():
        if name in s:
            idx = idx[np.argsort(worst_first.get(name, 1) * s[name][idx], kind="stable")]
        out[name] = idx.tolist()
    return out
