"""Batch augmentation in a short schedule: test accuracy of the default CNN on Fashion-MNIST with
each setting of flips/translations, trained by a plain PyTorch loop with the default job's model,
optimiser, schedule, label smoothing, batch size and normalisation, read from the configs. The
5,000 images held out of the 60,000 are a seeded random draw, not the job's stratified split.

    uv run python scripts/ablate_augment.py --epochs 4 --settings none flip flip+1 flip+2
    uv run python scripts/ablate_augment.py --epochs 4 --settings none --convs-per-stage 1 2 2

Each setting trains from the same seed; run two at once with --threads 1 to halve the wall time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {"none": (False, 0), "flip": (True, 0), "flip+1": (True, 1), "flip+2": (True, 2)}


def config():
    """The default job's composed config (configs/), with the network model=auto picks for it."""
    from image_classifier.config import compose_config

    return compose_config("model=cnn", root=ROOT)


def load(split: str):
    import torch

    from image_classifier.data.idx import read_idx

    d = ROOT / "data" / "fashion_mnist"
    name = {"train": "train", "test": "t10k"}[split]
    x = torch.from_numpy(read_idx(d / f"{name}-images-idx3-ubyte").copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(d / f"{name}-labels-idx1-ubyte").copy()).long()
    return x, y


def run(setting: str, epochs: int, seed: int, channels, convs=None) -> tuple[list[float], float]:
    """Test accuracy without and with flip TTA, and the seconds of training."""
    import torch
    from torch import nn

    from image_classifier.data.augment import augment_batch
    from image_classifier.data.datamodule import train_batch_size
    from image_classifier.models.factory import create_model
    from image_classifier.models.optim import create_optimizer
    from image_classifier.training.train import label_smoothing

    cfg = config()
    t = cfg.train
    torch.manual_seed(seed)
    x, y = load("train")
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[5000:]
    x, y = x[keep], y[keep]
    xt, yt = load("test")
    spec = {k: v for k, v in cfg.model.items() if k != "name"}
    spec["channels"] = channels or spec["channels"]
    spec["convs_per_stage"] = convs or spec["convs_per_stage"]
    net = create_model(cfg.model.name, num_classes=10, in_chans=1, **spec)
    net = net.to(memory_format=torch.channels_last)
    bs = train_batch_size(cfg)
    steps = math.ceil(len(x) / bs)
    opt = create_optimizer(list(net.parameters()), dict(t), net=net)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, float(t.lr), total_steps=total, pct_start=float(t.warmup)
    )
    single_label = argparse.Namespace(multi_label=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing(t, single_label))
    mean, std = float(cfg.data.mean[0]), float(cfg.data.std[0])

    def prep(b):
        return ((b.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    hflip, shift = SETTINGS[setting]
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
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
    ap.add_argument("--channels", type=int, nargs="+", help="default: the model config's")
    ap.add_argument("--convs-per-stage", type=int, nargs="+", help="default: the model config's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("| augmentation | epochs | test accuracy | with flip TTA | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for s in args.settings:
        (acc, tta), seconds = run(s, args.epochs, args.seed, args.channels, args.convs_per_stage)
        print(f"| {s} | {args.epochs} | {acc:.2%} | {tta:.2%} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
