"""What a folder of images is like, from a sample of their headers (no decoding): how many, grey
or colour, and their typical size; and the training size that follows from it (`data.size=auto`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from image_classifier.data.images import GREY_MODES, ImageError, header, is_image_name

SAMPLE = 200  # headers read to judge colour and size
# data.size=auto: the images' median size, scaled down to fit the largest side and up to the
# smallest, each side a multiple of `step` (a network trained from scratch; a pretrained backbone
# wants its stride of 32, and small images enlarged toward the 224 px its ImageNet features were
# learned at: fine-tuned at 160 px rather than 96, colour-96 reached 80.4 / 78.8 % on validation
# against 70.8 / 73.6 % (seeds 42 / 1), photos-7 the same 99.05 %; docs/benchmarks.md)
SCRATCH_SIZES = {"smallest": 16, "largest": 64, "step": 4}
PRETRAINED_SIZES = {"smallest": 160, "largest": 224, "step": 32}


@dataclass(frozen=True)
class ImageProfile:
    images: int
    colour: bool
    median_size: tuple[int, int]  # (height, width)

    def describe(self) -> str:
        h, w = self.median_size
        return f"{self.images} {'colour' if self.colour else 'grey'} images, median {h}x{w} px"


def profile_folder(root: str | Path, sample: int = SAMPLE) -> ImageProfile:
    """An evenly spaced sample of the image files under root (any layout); unreadable ones are
    left to the data scan, which reports them."""
    paths = sorted(p for p in Path(root).rglob("*") if is_image_name(p) and p.is_file())
    step = max(1, len(paths) // sample)
    modes, heights, widths = [], [], []
    for p in paths[::step]:
        try:
            mode, (w, h) = header(p)
        except ImageError:
            continue
        modes.append(mode)
        heights.append(h)
        widths.append(w)
    if not modes:
        return ImageProfile(len(paths), False, (28, 28))
    median = (int(sorted(heights)[len(heights) // 2]), int(sorted(widths)[len(widths) // 2]))
    return ImageProfile(len(paths), any(m not in GREY_MODES for m in modes), median)


def auto_size(median: tuple[int, int], pretrained: bool) -> list[int]:
    """[height, width] for data.size=auto: the median size, kept in proportion where the
    model's limits allow (a side past them is clamped), each side rounded up to the model's
    step."""
    limits = PRETRAINED_SIZES if pretrained else SCRATCH_SIZES
    h, w = median
    scale = min(1.0, limits["largest"] / max(h, w))
    scale = max(scale, limits["smallest"] / min(h, w))
    step = limits["step"]

    def side(x: int) -> int:
        return min(limits["largest"], max(step, math.ceil(x * scale / step) * step))

    return [side(h), side(w)]
