"""Training-time augmentation: cheap flips and shifts on whole uint8 batches (on the device), and
per-image torchvision presets for the train split. Torch is imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


HFLIP = (False, True, "alternate")  # train.augment.hflip


def augment_batch(
    x: torch.Tensor,
    hflip: bool | str = False,
    shift: int = 0,
    erase: float = 0.0,
    epoch: int = 0,
    **_,
) -> torch.Tensor:
    """Whole-batch augmentation on whatever device `x` is on: horizontal flips, random
    translations of up to `shift` pixels (zero fill; torchvision's RandomCrop(padding=shift) per
    image) and, with probability `erase`, a random rectangle set to 0 (RandomErasing's sampling:
    2-33 % of the area, aspect ratio 0.3-3.3).

    `hflip=True` mirrors each image with probability 1/2. `hflip="alternate"` is airbench's
    alternating flip: every image is mirrored in every other epoch, so each one is seen both ways
    in any two consecutive epochs; which half starts mirrored is a per-image bit, the parity of the
    image's pixel sum, so it needs no sample indices and is the same under any batching."""

    x = _flip_and_shift(x, hflip, shift, epoch)
    if erase > 0:
        x = random_erase(x, erase)
    return x


def _flip_and_shift(x: torch.Tensor, hflip: bool | str, shift: int, epoch: int) -> torch.Tensor:
    import torch

    n, _, h, w = x.shape
    if hflip == "alternate":
        parity = x.reshape(n, -1).to(torch.int64).sum(1) % 2
        flip = parity != epoch % 2
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    elif hflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if shift > 0:
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * shift + 1, (n, 1, 1), device=x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1) + dy
        cols = torch.arange(w, device=x.device).view(1, 1, w) + dx
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    return x


def random_erase(
    x: torch.Tensor, p: float, scale=(0.02, 0.33), ratio=(0.3, 3.3), tries: int = 10
) -> torch.Tensor:
    """torchvision's RandomErasing (value 0) for every image of a batch at once: each image draws
    up to `tries` (area, log-aspect) pairs and takes the first rectangle that fits."""
    import math

    import torch

    n, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(n, tries, device=dev).uniform_(*scale)
    aspect = torch.exp(
        torch.empty(n, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    )
    eh = torch.sqrt(area * aspect).round().long()
    ew = torch.sqrt(area / aspect).round().long()
    ok = (eh < h) & (ew < w)
    first = torch.where(
        ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=dev)
    )
    eh = eh.gather(1, first[:, None]).squeeze(1)
    ew = ew.gather(1, first[:, None]).squeeze(1)
    apply = ok.any(1) & (torch.rand(n, device=dev) < p)
    top = (torch.rand(n, device=dev) * (h - eh + 1).float()).long()
    left = (torch.rand(n, device=dev) * (w - ew + 1).float()).long()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
        & apply.view(n, 1, 1)
    )
    return x.masked_fill(inside[:, None], 0)


def progressive_size(
    full: tuple[int, int],
    epoch: int,
    epochs: int,
    min_scale: float = 1.0,
    ramp: tuple[float, float] = (0.0, 0.0),
) -> tuple[int, int]:
    """train.progressive: the training image size (h, w) of `epoch` (0-based) out of `epochs`.

    Epochs that begin before `ramp[0]` (a fraction of the training) see images shrunk to
    `min_scale` of the `full` size; the scale then grows linearly to 1 at `ramp[1]` (FFCV's
    progressive resizing). Shrunk sides are multiples of 4, so two 2x2 poolings stay exact."""
    min_scale = float(min_scale)
    if min_scale >= 1:
        return tuple(full)
    start, end = (float(r) for r in ramp)
    progress = epoch / max(int(epochs), 1)
    if progress >= max(end, start):
        return tuple(full)
    if progress < start:
        scale = min_scale
    else:
        scale = min_scale + (1 - min_scale) * (progress - start) / (end - start)
    return tuple(min(side, max(4, 4 * round(side * scale / 4))) for side in full)


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A batch resized to `size` (float pixels, same range) by antialiased bilinear resampling,
    on whatever device it is on; unchanged when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    import torch.nn.functional as F

    return F.interpolate(
        x.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )


def _light(v2, channels: int) -> list:
    return [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1))]


def _standard(v2, channels: int) -> list:
    jitter = v2.ColorJitter(0.2, 0.2, 0.2, 0.02) if channels == 3 else v2.ColorJitter(0.2, 0.2)
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(15),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        jitter,
    ]


def _randaugment(v2, channels: int) -> list:
    return [v2.RandomHorizontalFlip(), v2.RandAugment()]


def _trivialaugment(v2, channels: int) -> list:
    return [v2.RandomHorizontalFlip(), v2.TrivialAugmentWide()]


# train.augment.preset: name -> the per-image transforms (torchvision v2 on uint8 CHW tensors)
PRESETS = {
    "none": None,
    "light": _light,
    "standard": _standard,
    "randaugment": _randaugment,
    "trivialaugment": _trivialaugment,
}


def sample_augment(preset: str | None, channels: int):
    """Per-image transforms for the train split, or None."""
    if preset is None:
        return None
    if preset not in PRESETS:
        from image_classifier.errors import UserError, did_you_mean

        raise UserError(
            f"Unknown augmentation preset {preset!r}.{did_you_mean(preset, PRESETS)} "
            f"train.augment.preset takes {', '.join(PRESETS)}."
        )
    if PRESETS[preset] is None:
        return None
    from torchvision.transforms import v2

    return v2.Compose(PRESETS[preset](v2, channels))
