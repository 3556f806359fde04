"""Data-path benchmark: decoding every epoch vs the decoded cache, DataLoader vs on-device batches.

    uv run python scripts/benchmark_data.py              # all parts (about 10 minutes on 2 cores)
    uv run python scripts/benchmark_data.py --quick      # smaller folders, fewer steps
    uv run python scripts/benchmark_data.py --parts loader   # one part: loader,train,compile,photos

Part 1, loader throughput (images/s through one pass of the train split, no model): a JPEG
folder of Fashion-MNIST images at 28x28 grey and the same images resized to 224x224 RGB, read by
decoding every file (DataLoader, `train.num_workers` workers: what every epoch cost before the
cache) vs from the decoded cache; the cache's one-off build time is printed beside it.
Part 2, training throughput (images/s of `command=train` steps, default CNN, validation off),
alternating rounds so every variant sees the same machine load:
  IDX arrays through the DataLoader | IDX arrays as on-device batches (the default) |
  the same with the previous default CNN layout (`model.downsample=end model.global_pool=avg`) |
  the JPEG folder decoded every epoch | the JPEG folder from the decoded cache (the default).
The target: the folder with the cache within 10 % of the IDX arrays.
Part 3, torch.compile of the default CNN on this device: steps/s after compiling, and the
compile time, against eager.
Part 4, phone photos: what the scan and the decoded cache spend on 12 MP JPEGs (4032x3024) for a
160 px model, each JPEG decoded at the DCT scale the model needs (the default) against decoded
whole, alternating rounds; and the same for the audit's reads of each image.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides):
    """The project's config with these overrides; the CNN unless another network is named (the
    benchmarks build the network themselves, before model=auto would choose it)."""
    from image_classifier.config import compose_config

    named = any(o.startswith("model=") for o in overrides)
    return compose_config(*([] if named else ["model=cnn"]), *overrides)


def write_jpeg_folder(dst: Path, per_split: dict[str, int], size: int, rgb: bool) -> Path:
    """Fashion-MNIST as a pre-split folder of JPEGs: train/<class>/*.jpg, test/<class>/*.jpg."""
    from PIL import Image

    from image_classifier.data.datamodule import build_datamodule

    dm = build_datamodule(compose(f"paths.root={ROOT}", "data.cache=none"))
    info = dm.prepare()
    for split, n in per_split.items():
        ds = dm.dataset(split)
        for i in range(min(n, len(ds))):
            x, y = ds[i]
            im = Image.fromarray(x[0].numpy())
            if size != im.size[0]:
                im = im.resize((size, size), Image.BILINEAR)
            if rgb:
                im = im.convert("RGB")
            d = dst / split / info.classes[int(y)].replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:05d}.jpg", quality=90)
    return dst


def folder_cfg(root: Path, folder: Path, size: int, *extra: str):
    return compose(
        f"paths.root={root}",
        "data=folder",
        f"data.root={folder}",
        f"data.size=[{size},{size}]",
        f"data.channels={3 if size > 28 else 1}",
        *extra,
    )


def loader_throughput(tmp: Path, folder: Path, size: int) -> None:
    from image_classifier.data.datamodule import build_datamodule

    def one_pass(batches) -> float:
        t0, n = time.perf_counter(), 0
        for _, y in batches:
            n += len(y)
        return n / (time.perf_counter() - t0)

    plain = build_datamodule(folder_cfg(tmp, folder, size, "data.cache=none"))
    plain.prepare()
    decode = one_pass(plain.loader("train", shuffle=True))
    t0 = time.perf_counter()
    cached = build_datamodule(folder_cfg(tmp, folder, size))
    cached.prepare()
    build = time.perf_counter() - t0
    batches = cached.device_batches("train", shuffle=True)
    from_cache = statistics.median(one_pass(batches) for _ in range(3))
    n = len(cached.dataset("train"))
    print(
        f"  {size}x{size} JPEG folder, {n} train images: decode every epoch {decode:,.0f} img/s "
        f"({plain.num_workers} workers); decoded cache {from_cache:,.0f} img/s, "
        f"{from_cache / decode:.0f}x (one-off build, scan included: {build:.1f} s)"
    )


def training_throughput(tmp: Path, folder: Path, rounds: int, steps: int, warmup: int) -> None:
    from lightning.pytorch.callbacks import Callback

    from image_classifier.training.train import run_train

    class Timer(Callback):
        rate = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx >= warmup:
                self.n += len(batch[1])
                self.rate = self.n / (time.perf_counter() - self.t0)

    base = [
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "train.epochs=1",
        f"trainer.limit_train_batches={steps}",
        "logger.enabled=false",
        "train.calibrate=false",
    ]
    variants = {
        "IDX, DataLoader": compose(f"paths.root={ROOT}", "train.device_data=false", *base),
        "IDX, on-device batches": compose(f"paths.root={ROOT}", *base),
        "IDX, on-device, previous cnn": compose(
            f"paths.root={ROOT}", "model.downsample=end", "model.global_pool=avg", *base
        ),
        "JPEG folder, decode every epoch": folder_cfg(tmp, folder, 28, "data.cache=none", *base),
        "JPEG folder, decoded cache": folder_cfg(tmp, folder, 28, *base),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(rounds):
        for name, cfg in variants.items():
            timer = Timer()
            cfg.paths.output_dir = str(tmp / f"run-{i}-{len(rates[name])}-{hash(name)}")
            run_train(cfg, callbacks=[timer])
            rates[name].append(timer.rate)
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"Training throughput (img/s, default CNN, {steps - warmup} timed steps x {rounds} "
        "rounds, medians):"
    )
    for k, v in med.items():
        print(f"  {k:34s} {v:7.0f}")
    idx, device = med["IDX, DataLoader"], med["IDX, on-device batches"]
    cached, decoding = med["JPEG folder, decoded cache"], med["JPEG folder, decode every epoch"]
    previous = med["IDX, on-device, previous cnn"]
    print(
        f"  default cnn (early pooling) / previous layout (pool after each stage): "
        f"{device / previous:.2f}x"
    )
    print(
        f"  on-device / DataLoader (IDX): {device / idx:.2f}x; folder with cache / IDX: "
        f"{cached / device:.2f} (target >= 0.9); folder with cache / decoding every epoch: "
        f"{cached / decoding:.2f}x"
    )


def compile_gain(steps: int) -> None:
    import torch

    from image_classifier.models.factory import create_model

    cfg = compose(f"paths.root={ROOT}")
    spec = dict(cfg.model)

    def rate(net) -> tuple[float, float]:
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        t0 = time.perf_counter()
        for i in range(steps + 3):
            if i == 3:
                first, t1 = time.perf_counter() - t0, time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return 128 * steps / (time.perf_counter() - t1), first

    def fresh():
        net = create_model(spec.pop("name", "cnn"), num_classes=10, in_chans=1, **spec)
        return net.to(memory_format=torch.channels_last)

    eager, _ = rate(fresh())
    spec = dict(cfg.model)
    try:
        compiled, first = rate(torch.compile(fresh()))
    except Exception as e:  # no compiler toolchain here
        print(f"torch.compile: not measured ({type(e).__name__}: {str(e)[:200]})")
        return
    print(
        f"torch.compile (default CNN, batch 128, CPU): eager {eager:.0f} img/s, compiled "
        f"{compiled:.0f} img/s ({compiled / eager:.2f}x), first 3 steps incl. compiling "
        f"{first:.0f} s"
    )


def photo_decoding(tmp: Path, n: int, rounds: int) -> None:
    import numpy as np
    from PIL import Image

    from image_classifier.data.images import (
        Preprocessing,
        _converted,
        header,
        load_array,
        open_bytes,
        open_image,
    )

    rng, files = np.random.default_rng(0), []
    y, x = np.mgrid[0:3024, 0:4032].astype(np.float32)
    for i in range(n):  # smooth colour fields with sensor-like noise: about 2.5 MB at quality 90
        base = np.stack([np.sin(x / rng.uniform(200, 900)), np.cos(y / 700), x / 4032], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 6, (3024, 4032, 3))).clip(0, 255)
        files.append(tmp / f"photo{i}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(files[-1], quality=90)
    pre = Preprocessing(size=(160, 160), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    side = (224, 224)
    ways = {
        "whole": lambda p: (open_image(p), _converted(open_image(p), pre, p.name)),
        "scaled": lambda p: (open_image(p, fit=1), load_array(p, pre)),
        # the audit: a 32 px thumbnail and the size, then the backbone view at 224 px
        "audit whole": lambda p: (open_bytes(b := p.read_bytes()), open_bytes(b).resize(side)),
        "audit scaled": lambda p: (
            header(p, data=(b := p.read_bytes())),
            open_bytes(b, fit=32),
            open_bytes(b, fit=224).resize(side),
        ),
    }
    took = {k: [] for k in ways}
    for _ in range(rounds):
        for k, read in ways.items():
            t = time.perf_counter()
            for p in files:
                read(p)
            took[k].append((time.perf_counter() - t) / n)
    whole, scaled, audit_whole, audit_scaled = (statistics.median(took[k]) for k in ways)
    print(
        f"  {n} JPEGs 4032x3024, scan + cache for 160 px, per image: decoded whole "
        f"{whole * 1000:.0f} ms, at the scale needed {scaled * 1000:.0f} ms ({whole / scaled:.1f}x)"
    )
    print(
        f"  the audit's reads (thumbnail, size, 224 px backbone view), per image: decoded whole "
        f"{audit_whole * 1000:.0f} ms, at the scale needed {audit_scaled * 1000:.0f} ms "
        f"({audit_whole / audit_scaled:.1f}x)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="loader,train,compile,photos", help="which parts to run")
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    parts = args.parts.split(",")
    quick = args.quick
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        n28 = {"train": 6000, "test": 1000} if quick else {"train": 60000, "test": 10000}
        n224 = {"train": 600, "test": 100} if quick else {"train": 3000, "test": 500}
        if {"loader", "train"} & set(parts):
            print("Writing the JPEG folders ...", flush=True)
            f28 = write_jpeg_folder(tmp / "jpeg28", n28, 28, rgb=False)
            f224 = write_jpeg_folder(tmp / "jpeg224", n224, 224, rgb=True)
        if "loader" in parts:
            print("Loader throughput (one pass over the train split, no model):")
            loader_throughput(tmp, f28, 28)
            loader_throughput(tmp, f224, 224)
        if "train" in parts:
            steps = 40 if quick else 110
            training_throughput(tmp, f28, 1 if quick else args.rounds, steps, 10)
        if "compile" in parts:
            compile_gain(10 if quick else 30)
        if "photos" in parts:
            print("Phone photos (one thread):")
            photo_decoding(tmp, 4 if quick else 12, 1 if quick else args.rounds)
