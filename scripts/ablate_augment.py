"""Batch augmentation in a short schedule: test accuracy of the default CNN on Fashion-MNIST with
each setting of flips/translations, trained by a plain PyTorch loop with the default job's choices
(AdamW 3e-3, one-cycle, label smoothing 0.1, batch 128, the same 55,000 training images).

    uv run python scripts/ablate_augment.py --epochs 4 --settings none flip flip+1 flip+2

Each setting trains from the same seed; run two at once with --threads 1 to halve the wall time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"none": (False, 0), "flip": (True, 0), "flip+1": (True, 1), "flip+2": (True, 2)}


def load(split: str):
    import torch

    from image_classifier.data.idx import read_idx

    d = ROOT / "data" / "fashion_mnist"
    name = {"train": "train", "test": "t10k"}[split]
    x = torch.from_numpy(read_idx(d / f"{name}-images-idx3-ubyte").copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(d / f"{name}-labels-idx1-ubyte").copy()).long()
    return x, y


def run(setting: str, epochs: int, seed: int, channels) -> tuple[list[float], float]:
    """Test accuracy without and with flip TTA, and the seconds of training."""
    import torch
    from torch import nn

    from image_classifier.data.augment import augment_batch
    from image_classifier.models.factory import SimpleCNN

    torch.manual_seed(seed)
    x, y = load("train")
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[5000:]
    x, y = x[keep], y[keep]
    xt, yt = load("test")
    net = SimpleCNN(1, 10, channels, 2, 0.0, "early", "max").to(memory_format=torch.channels_last)
    steps = math.ceil(len(x) / 128)
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=total, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def prep(b):
        return ((b.float() / 255 - 0.2860) / 0.3530).contiguous(memory_format=torch.channels_last)

    hflip, shift = SETTINGS[setting]
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(steps):
            idx = order[i * 128 : (i + 1) * 128]
            xb = augment_batch(x.index_select(0, idx), hflip=hflip, shift=shift)
            loss = loss_fn(net(prep(xb)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        probs = [net(prep(xt[i : i + 1000])).softmax(1) for i in range(0, len(xt), 1000)]
        mirrored = [net(prep(xt[i : i + 1000].flip(3))).softmax(1) for i in range(0, len(xt), 1000)]
    plain, tta = torch.cat(probs), torch.cat(probs) + torch.cat(mirrored)
    return [(p.argmax(1) == yt).float().mean().item() for p in (plain, tta)], seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--channels", type=int, nargs=3, default=[32, 64, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("| augmentation | epochs | test accuracy | with flip TTA | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for s in args.settings:
        (acc, tta), seconds = run(s, args.epochs, args.seed, args.channels)
        print(f"| {s} | {args.epochs} | {acc:.2%} | {tta:.2%} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
