"""The audit's backbone view of the images: a pretrained backbone's features of every image,
computed at twice the images' own size and kept per image content (data/features.py), or read
from the matching feature cache (audit.features=cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# The backbone view's input side: UPSCALE x the images' median longer side, within BACKBONE_SIDE.
# ImageNet features separate small photos better enlarged toward the 224 px they were trained at:
# colour-96 (96 px) 51 -> 55-59 % out of sample at 160-224 px; photos-7 (81 px) at 162 px put all
# 10 planted flips of its 1 % copy in the first 20 rows, not 9 (docs/benchmarks.md)
BACKBONE_SIDE = (64, 224)
UPSCALE = 2
BATCH = 64
# The backbone view: the average-pooled outputs of the backbone's last STAGES feature stages, not
# its pooled head. Out of sample (colour-96, EfficientNet-Lite0): 58.5 -> 63.5 % right; photos-7
# 98.5 -> 99.5 %; its cut's precision at 5 % planted flips 49-53 -> 59-65 % (docs/benchmarks.md)
STAGES = 2


def backbone_features(d, cfg):
    """(N, dim) features of every audited image from cfg.features' pretrained backbone, at the
    UPSCALE x the images' median longer side, within BACKBONE_SIDE (stage_features); and a name
    for them. Images whose content the per-image store holds (data/features.py) are read from
    it, the others computed and added to it."""
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
    white = f", {d.grey_white} as white" if d.grey_white else ""  # 16-bit greys read so
    store = image_store_folder(fcfg, weights_id(fcfg), side, view=f"last {STAGES} stages{white}")
    found, stored = read_image_features(store, d.digests)
    todo = sorted(set(range(n)) - set(found))
    if todo:
        net, channels, out = create_backbone(fcfg), int(fcfg.channels), []
        quiet = len(todo) < 2000 or None  # None: a bar on a terminal only
        bar = tqdm(total=len(todo), desc="audit: backbone features", unit="img", disable=quiet)
        with torch.inference_mode():
            for start in range(0, len(todo), BATCH):
                batch = _images(d, todo[start : start + BATCH], side, channels)
                out.append(stage_features(net, batch).numpy())
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
    return torch.from_numpy(x), f"{fcfg.backbone}'s last {STAGES} stages at {side}x{side}{reused}"


def stage_features(net, x):
    """(B, dim) the average-pooled outputs of the backbone's last STAGES feature stages (timm's
    `forward_intermediates`, which every network of timm 1.0.31 that builds has), side by side.
    `net`: a models.factory.Normalized backbone."""
    import torch

    maps = net.net.forward_intermediates(net.normalize(x), indices=STAGES, intermediates_only=True)
    return torch.cat([m.float().mean((2, 3)) for m in maps], 1)


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
        im = to_model_mode(im, channels, d.grey_white).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        a = np.asarray(im, dtype=np.float32)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return torch.from_numpy(np.stack(list(pool.map(read, rows))))


def cached_features(d, cfg):
    """The matching feature cache's pooled features of every audited image and a name, or None."""
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
