"""Training-time augmentation: cheap flips and shifts on whole uint8 batches (on the device), and
per-image torchvision presets for the train split. Torch is imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


HFLIP = (False, True, "auto")  # train.augment.hflip; auto: training/mirror.py decides


def augment_batch(
    x: torch.Tensor,
    hflip: bool = False,
    shift: int = 0,
    erase: float = 0.0,
    **_,
) -> torch.Tensor:
    """Whole-batch augmentation on whatever device `x` is on: horizontal flips, random
    translations of up to `shift` pixels (zero fill; torchvision's RandomCrop(padding=shift) per
    image) and, with probability `erase`, a random rectangle set to 0 (RandomErasing's sampling:
    2-33 % of the area, aspect ratio 0.3-3.3)."""
    x = _flip_and_shift(x, hflip, shift)
    if erase > 0:
        x = random_erase(x, erase)
    return x


def _flip_and_shift(x: torch.Tensor, hflip: bool, shift: int) -> torch.Tensor:
    import torch

    n, _, h, w = x.shape
    if hflip:
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
