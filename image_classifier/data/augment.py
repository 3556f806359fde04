"""Training-time augmentation on whole uint8 batches (cheap on CPU, runs on the GPU when there)."""

import torch


def augment_batch(x: torch.Tensor, hflip: bool = False, shift: int = 0, **_) -> torch.Tensor:
    """Random horizontal flips and random translations of up to `shift` pixels (zero fill)."""
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
