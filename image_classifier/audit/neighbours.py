"""Nearest neighbours in one pass, and what they show: near-duplicates and outliers.

Distances are cosine distances between L2-normalised vectors, found with chunked matrix products
(70,000 images in seconds).
  - near-duplicates, in two steps: candidates are neighbours on the images' own pixels (mean-centred
    per image, so a brightness shift does not hide a copy) closer than `audit.near_candidates` x
    the data's median nearest-neighbour distance (cleanlab's calibrated near-duplicate scale);
    a candidate is a near-duplicate when its two thumbnails, once brightness and contrast are
    matched, differ by at most `audit.near_threshold` grey levels (RMS, 0-255), and, for colour
    data, so do their colour thumbnails, each channel matched on its own: a star and the
    background it is drawn on can have one grey level and two colours. That scale means the
    same on every dataset: noise, JPEG re-encoding and a brightness change stay within a few
    grey levels, while two photos of similar things differ by more;
  - outliers: the score exp(-d / median d) of the distance d to the k-th nearest neighbour in
    the audit's feature space (not cleanlab's average over the k: see `outlier_scores`), flagged
    beyond Tukey's far side of that distance's spread on this data (d / median d above Q3 +
    `audit.outlier_fence` x IQR), so the cut follows each data set's own spread instead of one
    absolute score. Measured on the suite with 5 foreign images planted (docs/benchmarks.md): the
    absolute cut 0.05 it replaced found none of them on digits or Fashion-MNIST subsets.
"""

from __future__ import annotations

import numpy as np

PIXEL_DIMS = 64  # principal components kept of the pixel vectors (distances barely change)


def principal_components(x, dims: int, seed: int = 0):
    """Centre and project on the top principal axes (fitted on up to 20,000 rows)."""
    import torch

    x = x - x.mean(0, keepdim=True)
    dims = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    g = torch.Generator().manual_seed(seed)
    _, _, v = torch.linalg.svd(x[torch.randperm(len(x), generator=g)[:20000]], full_matrices=False)
    return x @ v[:dims].T


def pca(x, dims: int, seed: int = 0):
    """The principal components of each row, L2-normalised (for cosine distances)."""
    z = principal_components(x, dims, seed)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-6)


def pixel_vectors(thumbs: np.ndarray):
    """Each thumbnail mean-centred and L2-normalised (brightness and contrast do not count)."""
    import torch

    x = torch.from_numpy(thumbs.reshape(len(thumbs), -1).astype(np.float32))
    x = x - x.mean(1, keepdim=True)
    return pca(x / x.norm(dim=1, keepdim=True).clamp_min(1e-6), PIXEL_DIMS)


def knn(z, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (N, k), ascending; an image is never its own neighbour."""
    import torch

    n = len(z)
    k = max(1, min(k, n - 1))
    dist, idx = np.zeros((n, k), np.float32), np.zeros((n, k), np.int64)
    for start in range(0, n, chunk):
        sim = z[start : start + chunk] @ z.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -2.0
        v, i = sim.topk(k, dim=1)
        dist[start : start + chunk] = (1 - v).clamp_min(0).numpy()
        idx[start : start + chunk] = i.numpy()
    return dist, idx


def near_duplicates(
    thumbs: np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    candidates: float,
    threshold: float,
    exact: set,
    colour: np.ndarray | None = None,
) -> list:
    """[(i, j, grey-level difference)] with i < j, not exact copies (see the module's text);
    the difference is the larger of the grey one and, given colour thumbnails, the colour one."""
    median = max(float(np.median(dist[:, 0])), 1e-9)
    rows, cols = np.nonzero(dist < candidates * median)
    pairs = {
        (min(a, int(idx[a, c])), max(a, int(idx[a, c]))) for a, c in zip(rows, cols, strict=True)
    }
    pairs = sorted(pairs - exact)
    if not pairs:
        return []
    diff = matched_difference(thumbs, np.array(pairs))
    if colour is not None:
        diff = np.maximum(diff, colour_difference(colour, np.array(pairs)))
    return [
        (i, j, round(float(d), 2)) for (i, j), d in zip(pairs, diff, strict=True) if d <= threshold
    ]


def colour_difference(colour: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """RMS over the three channels of each channel's matched difference (`matched_difference`
    on (N, 3, h, w) colour thumbnails): a tint or white-balance change is matched away, a shape
    that only its colour sets apart from its background is not."""
    n, channels = colour.shape[:2]
    rows = colour.reshape(n * channels, -1)
    each = (pairs[:, None, :] * channels + np.arange(channels)[None, :, None]).reshape(-1, 2)
    d = matched_difference(rows, each).reshape(len(pairs), channels)
    return np.sqrt((d.astype(np.float64) ** 2).mean(1)).astype(np.float32)


def matched_difference(thumbs: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """RMS grey-level difference of each pair's thumbnails after least-squares matching of
    brightness (mean) and contrast (gain), fitted both ways; the larger of the two, so a flat
    image is not "matched" to a textured one by shrinking the texture to nothing."""
    x = thumbs.reshape(len(thumbs), -1)
    out = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), chunk):
        # float64: the residual is a small difference of large sums
        a, b = (
            x[pairs[s : s + chunk, 0]].astype(np.float64),
            x[pairs[s : s + chunk, 1]].astype(np.float64),
        )
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        ab, aa, bb = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)
        # residual of b ~ g a is (bb - ab^2 / aa) / n, and the other way round (aa - ab^2 / bb) / n
        r1 = bb - ab**2 / np.maximum(aa, 1e-6)
        r2 = aa - ab**2 / np.maximum(bb, 1e-6)
        out[s : s + chunk] = np.sqrt(np.maximum(np.maximum(r1, r2), 0) / a.shape[1])
    return out


def outlier_scores(dist: np.ndarray) -> np.ndarray:
    """Per image, exp(-d / median d), d its distance to its k-th nearest neighbour (1 typical,
    toward 0 far away). The k-th neighbour's distance, not the average over the k (cleanlab's
    `OutOfDistribution` score, used before): a few unusual images that look alike (five digits
    among photos) are each other's nearest neighbours and hid in the average. On the suite's
    planted outliers (seed 0's copies): 46 of 60 found against 28, with fewer other images
    flagged (docs/benchmarks.md)."""
    d = dist[:, -1].astype(np.float64)
    return np.exp(-d / max(float(np.median(d)), 1e-12))


def outliers(scores: np.ndarray, fence: float, most: int) -> list[int]:
    """Indices of the images whose neighbour distance lies beyond Tukey's upper fence (Q3 +
    fence x IQR of d / median d, from the scores), most unusual first, at most `most`."""
    d = -np.log(np.clip(scores, 1e-12, None))
    q1, q3 = np.quantile(d, [0.25, 0.75])
    order = np.argsort(scores, kind="stable")
    return [int(i) for i in order if d[i] > q3 + fence * (q3 - q1)][:most]
