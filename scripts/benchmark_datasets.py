"""Data sets that are not the benchmark: the default job, a pixel floor and the audit on each.

    uv run python scripts/benchmark_datasets.py            # the whole suite (about 17 min, 2 cores)
    uv run python scripts/benchmark_datasets.py --quick    # digits and fmnist-500 (about 4)
    uv run python scripts/benchmark_datasets.py --only colour-96 --keep /tmp/suite

Each data set is written as image files (PNG, or JPEG for the photo-like one) in class folders,
built from what installs offline:
- fmnist-500, fmnist-2000, fmnist-10000: Fashion-MNIST training subsets of that many images
  (stratified), with validation and test sets of their own (pre-split folders; test: 1,000
  images of the Fashion-MNIST test set, the same for the three);
- colour-96: Fashion-MNIST items, scaled to 40-80 px and tinted, on random crops of the two
  photographs scikit-learn ships, at 96x96 (2,000 train, 250 val, 1,000 test; JPEG);
- digits: scikit-learn's 1,797 handwritten digits, 8x8 grey, in class folders (the tool splits
  them 80/10/10);
- photos-7: real photographs, not Fashion-MNIST: 150 square crops of 40-120 px from each of the
  seven colour photographs scikit-image ships (astronaut, cat, coffee, Hubble deep field,
  immunohistochemistry, retina, rocket), the class being the photograph; JPEG, in class folders
  (split 80/10/10 by the tool), 1,050 images.
- shapes-10 (only with --only: it is for choosing data.resize, not part of the suite): the items
  of colour-96 on photo crops of mixed shapes, width / height from 1/2 to 2, 96-160 px (1,000
  train, 300 val, 500 test; JPEG).
- spectrograms-4 and digits-colour (only with --only: for train.augment.hflip=auto, images a
  mirror makes another class): spectrograms of four kinds of sound saved by matplotlib (RGBA PNG,
  247x129 px, 400 images), and scikit-learn's digits in colour at 64x64 (JPEG, 1,797 images).
- documents and cells (only with --only: for the audit's image-quality checks, data light or
  dark by nature): 180 page scans of three layouts, 240 fluorescence-like micrographs of three
  cell shapes (grey PNG).

For each: the default job exactly as a user runs it (`uv run python commands.py command=train
data=folder data.root=D`, then `command=test`), its training time and test accuracy (reported
once; nothing here is chosen on test); the floor, scikit-learn's LogisticRegression on the same
images' pixels (at most 32x32, C chosen on the validation split); then `command=audit` on copies
with 1 % and 5 % of the labels moved to another class: recall and precision of what it flags, at
its recommended cut, how many planted errors rank within the first 2x (number planted) rows, and
the precision of the shortest head of the ranking that holds 80 % of them (whatever the cut).
Planted outliers, which have no true label, count neither way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "data" / "fashion_mnist"
SUITE = ("digits", "fmnist-500", "fmnist-2000", "fmnist-10000", "colour-96", "photos-7")
# built and run only when named (--only)
EXTRA = ("shapes-10", "spectrograms-4", "digits-colour", "documents", "cells")
QUICK = ("digits", "fmnist-500")
CUTS = (1, 0.7, 0.5, 0.45, 0.4, 0.3, 0.25)  # audit.label_cut's candidates (x chance)
PLANTED_EXTRA = 5  # near-duplicates and outliers planted beside the label errors


# -- the data sets --------------------------------------------------------------------------
def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from data/fashion_mnist, fetched
    by `command=download` first when absent."""
    from image_classifier.data.idx import read_idx

    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    if not all((FMNIST / n).exists() for n in names):
        command(ROOT, "command=download")
    return tuple(read_idx(FMNIST / n) for n in names)


def stratified(y: np.ndarray, n: int, rng, exclude=()) -> np.ndarray:
    taken = set(int(i) for i in exclude)
    classes = np.unique(y)
    out = []
    for k in classes:
        pool = [i for i in np.flatnonzero(y == k) if int(i) not in taken]
        out += list(rng.choice(pool, n // len(classes), replace=False))
    return np.array(out)


def write(folder: Path, images, labels, classes, ext: str = "png") -> None:
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = folder / classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.{ext}", quality=90)


FMNIST_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]


def build_fmnist(dest: Path, n_train: int, seed: int = 0) -> None:
    xtr, ytr, xte, yte = fashion_mnist()
    rng = np.random.default_rng(seed)
    train = stratified(ytr, n_train, rng)
    val = stratified(ytr, max(100, n_train // 8), rng, exclude=train)
    test = stratified(yte, 1000, np.random.default_rng(1))
    write(dest / "train", xtr[train], ytr[train], FMNIST_CLASSES)
    write(dest / "val", xtr[val], ytr[val], FMNIST_CLASSES)
    write(dest / "test", xte[test], yte[test], FMNIST_CLASSES)


def photo_backgrounds() -> list[np.ndarray]:
    """The two colour photographs that ship with scikit-learn (a temple, a flower), 427x640."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def composite(item: np.ndarray, photos: list[np.ndarray], rng, size: int = 96) -> np.ndarray:
    """A Fashion-MNIST item, scaled to 40-80 px and tinted (its own shading kept), on a random
    crop of a photograph, colour-jittered."""
    photo = photos[int(rng.integers(len(photos)))]
    crop = int(rng.integers(size, 3 * size))
    top = int(rng.integers(0, photo.shape[0] - crop))
    left = int(rng.integers(0, photo.shape[1] - crop))
    bg = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((size, size))
    bg = np.asarray(bg, np.float32) * rng.uniform(0.6, 1.2, 3)
    side = int(rng.integers(40, 81))
    alpha, colour = tinted(item, side, rng)
    y, x = rng.integers(0, size - side + 1, 2)
    return pasted(bg, alpha, colour, y, x)


def tinted(item: np.ndarray, side: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(the item's soft-edged silhouette, its tinted pixels with its own shading) at `side` px."""
    shade = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR)) / 255.0
    return np.clip(shade * 4, 0, 1)[..., None], rng.uniform(40, 255, 3) * (
        0.35 + 0.65 * shade[..., None]
    )


def pasted(bg: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> np.ndarray:
    side = len(alpha)
    bg[y : y + side, x : x + side] = bg[y : y + side, x : x + side] * (1 - alpha) + colour * alpha
    return np.clip(bg, 0, 255).astype(np.uint8)


def build_colour(dest: Path, seed: int = 0) -> None:
    build_composites(dest, composite, (2000, 250, 1000), seed, test_seed=1)


def build_composites(dest: Path, make, sizes: tuple, seed: int, test_seed: int) -> None:
    """Fashion-MNIST items drawn by `make` onto photo crops: (train, val, test) = `sizes`
    images, stratified; JPEG, pre-split."""
    xtr, ytr, xte, yte = fashion_mnist()
    rng = np.random.default_rng(seed)
    train = stratified(ytr, sizes[0], rng)
    val = stratified(ytr, sizes[1], rng, exclude=train)
    test = stratified(yte, sizes[2], np.random.default_rng(test_seed))
    photos = photo_backgrounds()
    parts = (("train", xtr, ytr, train), ("val", xtr, ytr, val), ("test", xte, yte, test))
    for split, x, y, idx in parts:
        write(dest / split, [make(x[i], photos, rng) for i in idx], y[idx], FMNIST_CLASSES, "jpg")


def build_digits(dest: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    write(dest, images, d.target, [str(k) for k in range(10)])


PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)


def build_photos(dest: Path, per_class: int = 150, seed: int = 0) -> None:
    """Square crops of 40-120 px at random places in each of scikit-image's colour photographs;
    the class is the photograph (sizes vary, as in a user's folder of crops)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for k, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        for _ in range(per_class):
            side = int(rng.integers(40, 121))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            crops.append(photo[top : top + side, left : left + side])
            labels.append(k)
    write(dest, crops, labels, list(PHOTOS), "jpg")  # one numbering: no two files share a name


def shaped(item: np.ndarray, photos: list[np.ndarray], rng) -> np.ndarray:
    """composite() on a canvas of its own shape: width / height log-uniform in [1/2, 2], the
    longer side 96-160 px, the item 40-80 px placed near the middle (a normal about it with a
    quarter of the free room as its spread), as product photos of mixed shapes are."""
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2)))
    long = int(rng.integers(96, 161))
    h, w = (
        (long, max(48, int(long * aspect))) if aspect < 1 else (max(48, int(long / aspect)), long)
    )
    photo = photos[int(rng.integers(len(photos)))]
    zoom = rng.uniform(1, 2.5)
    ch, cw = min(int(h * zoom), photo.shape[0]), min(int(w * zoom), photo.shape[1])
    top, left = (
        int(rng.integers(0, photo.shape[0] - ch + 1)),
        int(rng.integers(0, photo.shape[1] - cw + 1)),
    )
    bg = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((w, h))
    bg = np.asarray(bg, np.float32) * rng.uniform(0.6, 1.2, 3)
    side = int(rng.integers(40, min(81, min(h, w) + 1)))
    alpha, colour = tinted(item, side, rng)
    y = int(np.clip(rng.normal((h - side) / 2, (h - side) / 4 + 1e-6), 0, h - side))
    x = int(np.clip(rng.normal((w - side) / 2, (w - side) / 4 + 1e-6), 0, w - side))
    return pasted(bg, alpha, colour, y, x)


def build_shapes(dest: Path) -> None:
    """shapes-10: Fashion-MNIST items on photo crops of mixed shapes (1,000 train, 300 val, 500
    test; JPEG), for choosing data.resize (stretch, crop, pad) where it matters."""
    build_composites(dest, shaped, (1000, 300, 500), 7, test_seed=8)


def build_spectrograms(dest: Path, per_class: int = 100, seed: int = 0) -> None:
    """spectrograms-4: 2 s of noisy audio at 8 kHz as a matplotlib user saves its spectrogram
    (`plt.imsave`, viridis, RGBA PNG, 247x129 px): a rising chirp, a falling one, beeps of one
    tone, a chord of three; each at a random pitch, start, length, loudness and noise level.
    Mirrored, a rising chirp is a falling one."""
    import matplotlib.pyplot as plt
    from scipy import signal

    rng, fs = np.random.default_rng(seed), 8000
    t = np.arange(0, 2.0, 1 / fs)

    def sound(kind: str) -> np.ndarray:
        low, high = rng.uniform(300, 900), rng.uniform(1800, 3200)
        if kind in ("rising", "falling"):
            x = signal.chirp(t, *((low, t[-1], high) if kind == "rising" else (high, t[-1], low)))
        elif kind == "beeps":
            x = np.sin(2 * np.pi * rng.uniform(500, 3000) * t) * ((t * rng.uniform(2, 5)) % 1 < 0.5)
        else:
            x = sum(np.sin(2 * np.pi * rng.uniform(300, 3500) * t) for _ in range(3))
        start = rng.uniform(0, 0.8)
        on = (t > start) & (t < start + rng.uniform(0.6, 1.2))
        return x * on * rng.uniform(0.2, 1) + rng.normal(0, rng.uniform(0.3, 1.0), t.size)

    for kind in ("rising", "falling", "beeps", "chord"):
        (dest / kind).mkdir(parents=True)
        for i in range(per_class):
            _, _, power = signal.spectrogram(sound(kind), fs, nperseg=256, noverlap=192)
            plt.imsave(dest / kind / f"{i:03d}.png", 10 * np.log10(power + 1e-10)[::-1])


def build_colour_digits(dest: Path, seed: int = 0) -> None:
    """digits-colour: scikit-learn's digits enlarged to 64x64, in a random colour on another
    (JPEG): colour scans of handwriting, which is not mirror-symmetric."""
    from sklearn.datasets import load_digits

    d, rng = load_digits(), np.random.default_rng(seed)
    images = []
    for im in d.images:
        ink = Image.fromarray((im / 16 * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
        m = np.asarray(ink, np.float32)[..., None] / 255
        rgb = rng.uniform(0, 255, 3) * (1 - m) + rng.uniform(0, 255, 3) * m
        images.append((rgb + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8))
    write(dest, images, d.target, [str(k) for k in range(10)], "jpg")


def build_documents(dest: Path, per_class: int = 60, seed: int = 0) -> None:
    """documents: page scans (grey PNG, about 600x800 px, off-white paper, dark print): letters
    (lines of text), invoices (ruled rows of figures), forms (labelled boxes). Mostly white by
    nature: for the audit's `light` check, not a problem of these images."""
    from PIL import ImageDraw, ImageFont

    rng, font = np.random.default_rng(seed), ImageFont.load_default()
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with"]
    for kind in ("letter", "invoice", "form"):
        (dest / kind).mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(560, 640)), int(rng.integers(760, 840))
            page = Image.new("L", (w, h), int(rng.integers(235, 256)))
            draw, y = ImageDraw.Draw(page), 80
            if kind == "letter":
                while y < h - 80:
                    text = " ".join(rng.choice(words, int(rng.integers(6, 12))))
                    draw.text((60, y), text, fill=int(rng.integers(0, 60)), font=font)
                    y += 16 + 16 * (rng.random() < 0.15)
            for r in range(int(rng.integers(8, 20)) if kind == "invoice" else 0):
                draw.line((50, 120 + r * 22, w - 50, 120 + r * 22), fill=80)
                for c in range(4):
                    draw.text(
                        (60 + c * (w - 100) // 4, 125 + r * 22), str(rng.integers(999)), 0, font
                    )
            for r in range(int(rng.integers(6, 12)) if kind == "form" else 0):
                draw.text((60, 100 + r * 50), " ".join(rng.choice(words, 2)) + ":", 0, font)
                draw.rectangle((200, 96 + r * 50, w - 60, 120 + r * 50), outline=60)
            page.save(dest / kind / f"page_{i:03d}.png")


def build_cells(dest: Path, per_class: int = 80, seed: int = 0) -> None:
    """cells: fluorescence-like micrographs (grey PNG, 256 px): a few small bright cells on a
    black ground, round, long or dividing. Dark and of few grey levels by nature: for the audit's
    `dark` and `low_information` checks, not a problem of these images."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    for kind in ("round", "long", "dividing"):
        (dest / kind).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("L", (256, 256), 0)
            draw = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(2, 6))):
                (x, y), r, v = (
                    rng.integers(20, 236, 2),
                    int(rng.integers(3, 7)),
                    rng.integers(90, 255),
                )
                wide = 3 * r if kind == "long" else r
                draw.ellipse((x - wide, y - r, x + wide, y + r), fill=int(v))
                if kind == "dividing":
                    draw.ellipse((x + r, y - r, x + 3 * r, y + r), fill=int(v))
            glow = np.asarray(im.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
            noisy = glow + rng.normal(6, 3, glow.shape)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(dest / kind / f"{i:03d}.png")


BUILDERS = {
    "digits": build_digits,
    "colour-96": build_colour,
    "photos-7": build_photos,
    "shapes-10": build_shapes,
    "spectrograms-4": build_spectrograms,
    "digits-colour": build_colour_digits,
    "documents": build_documents,
    "cells": build_cells,
}


def build(name: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if name in BUILDERS:
        BUILDERS[name](tmp)
    else:
        build_fmnist(tmp, int(name.split("-")[1]))
    tmp.rename(dest)
    return dest


# -- reading a folder back -------------------------------------------------------------------
def files(root: Path) -> list[tuple[Path, str, str]]:
    """(path, split or '', class) of every image under root."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix in (".png", ".jpg"):
            parts = p.relative_to(root).parts
            out.append((p, parts[0] if len(parts) == 3 else "", parts[-2]))
    return out


def pixels(paths: list[Path]) -> np.ndarray:
    with Image.open(paths[0]) as im:
        w, h = im.size
    side = (min(32, w), min(32, h))
    return np.stack(
        [np.asarray(Image.open(p).resize(side, Image.BILINEAR), np.float32).ravel() for p in paths]
    )


def floor(root: Path, seed: int = 0) -> float:
    """LogisticRegression on the pixels: C chosen on validation, test accuracy once."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rows = files(root)
    x, y = pixels([p for p, _, _ in rows]), np.array([c for _, _, c in rows])
    split = np.array([s for _, s, _ in rows])
    if not split[0]:  # class folders: the same 80/10/10 proportions, stratified
        idx = np.arange(len(y))
        tr, rest = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
        va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
        split = np.empty(len(y), object)
        split[tr], split[va], split[te] = "train", "val", "test"
    scaler = StandardScaler().fit(x[split == "train"])
    z = scaler.transform(x)
    best = None
    m = LogisticRegression(max_iter=2000, warm_start=True)  # each C starts from the last's fit
    # one BLAS/OpenMP thread: on 2 cores lbfgs ran 2.5-4x faster so (photos-7 35 s -> 9 s)
    with threadpool_limits(1):
        for c in (0.01, 0.1, 1.0):
            m.set_params(C=c).fit(z[split == "train"], y[split == "train"])
            val = m.score(z[split == "val"], y[split == "val"])
            if best is None or val > best[0]:
                best = (val, m.score(z[split == "test"], y[split == "test"]))
    return float(best[1])


# -- the commands, as a user runs them ---------------------------------------------------------
def uv() -> str:
    return os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".uv" / "bin" / "uv")


def command(work: Path, *args: str) -> str:
    """`uv run python commands.py ARGS` from the project root, outputs under `work`."""
    quiet = [] if work == ROOT else [f"paths.root={work}", "trainer.enable_progress_bar=false"]
    # as on a user's machine, Python caches each module's bytecode (this machine's environment
    # turns that off, which makes every command compile its imports from source: measured, the
    # audit of 3,260 images spent more time importing than auditing)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    p = subprocess.run(
        [uv(), "run", "python", "commands.py", *args, *quiet],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def default_job(root: Path, work: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    out = command(work, "command=train", "data=folder", f"data.root={root}", *extra)
    wall = time.perf_counter() - t0
    ckpt = re.search(r"checkpoint: (\S+)", out).group(1)
    chose = re.search(r"chosen:\s+(.*)", out)
    trained = re.search(r"Trained (\d+) epoch\(s\) in (\d+)s", out)
    best_val = re.search(r"best val/acc = ([0-9.]+)", out)
    test = command(work, "command=test", f"test.checkpoint={ckpt}")
    report = json.loads(Path(re.search(r"report: (\S+\.json)", test).group(1)).read_text())
    return {
        "accuracy": report["accuracy"],
        "interval": report["accuracy_interval"],
        "train_s": float(trained.group(2)),
        "wall_s": wall,
        "epochs": int(trained.group(1)),
        "best_val": float(best_val.group(1)),
        "chosen": chose.group(1) if chose else "",
    }


def plant_noise(
    root: Path, dest: Path, frac: float, seed: int = 0, blur: bool = False
) -> dict[str, set]:
    """A copy of root with `frac` of its labels moved to another class, plus PLANTED_EXTRA
    near-duplicates (an image brightened by 10 grey levels and saved as JPEG beside the original)
    and PLANTED_EXTRA outliers (images of another source: photo crops in digits, digits
    elsewhere); with `blur`, PLANTED_EXTRA more images blurred in place (after every other
    draw: the rest are planted as without it). The planted files' relative paths, by kind."""
    rows = files(root)
    classes = sorted({c for _, _, c in rows})
    rng = np.random.default_rng(seed)
    moved = set(rng.choice(len(rows), int(round(frac * len(rows))), replace=False).tolist())
    # near: (planted copy, its original) pairs; the others: planted files
    planted = {"labels": set(), "near": set(), "outliers": set(), "blurry": set()}
    for i, (p, split, c) in enumerate(rows):
        if i in moved:
            c = classes[(classes.index(c) + int(rng.integers(1, len(classes)))) % len(classes)]
        rel = Path(split or "", c, p.name)
        if (dest / rel).exists():  # a moved image must not overwrite, or be overwritten by, another
            raise SystemExit(f"{root}: two images would share {rel}; name files uniquely")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / rel)
        if i in moved:
            planted["labels"].add(str(rel))
    others = [i for i in range(len(rows)) if i not in moved]
    near = rng.choice(others, PLANTED_EXTRA, replace=False)
    for k, i in enumerate(near):
        p, split, c = rows[i]
        im = Image.open(p)
        rel = Path(split or "", c, f"near_{k}.jpg")
        bright = np.clip(np.asarray(im, np.float32) + 10, 0, 255).astype(np.uint8)
        Image.fromarray(bright).save(dest / rel, quality=90)
        planted["near"].add((str(rel), str(Path(split or "", c, p.name))))
    like = Image.open(rows[0][0])
    for k, img in enumerate(foreign_images(root, PLANTED_EXTRA, rng)):
        p, split, c = rows[int(rng.integers(len(rows)))]
        rel = Path(split or "", c, f"outlier_{k}.png")
        Image.fromarray(img).convert(like.mode).resize(like.size).save(dest / rel)
        planted["outliers"].add(str(rel))
    pool = [i for i in others if i not in set(near.tolist())] if blur else []
    for i in rng.choice(pool, PLANTED_EXTRA, replace=False) if pool else []:
        p, split, c = rows[i]  # its label and file kept: only its sharpness changes
        rel = Path(split or "", c, p.name)
        im = Image.open(dest / rel)
        blurred(im).save(dest / rel)
        planted["blurry"].add(str(rel))
    return planted


def blurred(im: Image.Image, divisor: float = 24) -> Image.Image:
    """The planted blur: Gaussian, radius max(1, the shorter side / divisor)."""
    return im.filter(ImageFilter.GaussianBlur(max(1.0, min(im.size) / divisor)))


def foreign_images(root: Path, n: int, rng) -> list[np.ndarray]:
    """n images from another source than root's: photo crops for digits, digits elsewhere."""
    if root.name == "digits":
        photos = photo_backgrounds()
        out = []
        for _ in range(n):
            ph = photos[int(rng.integers(len(photos)))]
            top, left = (
                int(rng.integers(0, ph.shape[0] - 64)),
                int(rng.integers(0, ph.shape[1] - 64)),
            )
            out.append(ph[top : top + 64, left : left + 64])
        return out
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = rng.choice(len(d.images), n, replace=False)
    return [(d.images[i] * (255 / 16)).round().astype(np.uint8) for i in pick]


def precision_at_recall(ranked: list[str], planted: set[str], recall: float) -> float:
    """The precision of the shortest head of the ranking that holds `recall` of the planted
    errors (0 when the whole list holds fewer): how good the ranking is, whatever the cut."""
    need, hits = recall * len(planted), 0
    for k, name in enumerate(ranked, 1):
        hits += name in planted
        if hits >= need:
            return hits / k
    return 0.0


def audit(
    root: Path, work: Path, frac: float, seed: int = 0, extra: tuple = (), blur: bool = False
) -> dict:
    noisy = work / f"noisy-{frac}"
    shutil.rmtree(noisy, ignore_errors=True)
    planted = plant_noise(root, noisy, frac, seed, blur)
    t0 = time.perf_counter()
    out = command(work, "command=audit", "data=folder", f"data.root={noisy}", *extra)
    seconds = time.perf_counter() - t0
    folder = Path(re.search(r"report: (\S+)/report\.json", out).group(1))
    report = json.loads((folder / "report.json").read_text())
    rel = lambda name: str(Path(name).relative_to(noisy)) if Path(name).is_absolute() else name  # noqa: E731
    with open(folder / "label_issues.csv") as f:
        rows = [(rel(r["image"]), float(r["self_confidence"])) for r in csv.DictReader(f)]
    listed = [name for name, _ in rows]
    per_split = report["class_counts"]["per_split"].values()
    chance = 1 / len({c for counts in per_split for c, n in counts.items() if n})
    cut = int(report["label_errors"]["recommended_cut"])
    # planted outliers have no true label to judge: left out of the counts, after the cut (the
    # cut is the report's, in rows of the CSV)
    ranked = [r for r in listed if r not in planted["outliers"]]
    head = [r for r in listed[:cut] if r not in planted["outliers"]]
    labels = planted["labels"]

    def rp(rows):
        hit = len(labels & set(rows))
        return hit / len(labels), hit / max(1, len(rows))

    pairs = [{rel(e["a"]["name"]), rel(e["b"]["name"])} for e in report["near_duplicates"]["items"]]
    # a planted copy paired with its original (photos-7's near-uniform crops pair a copy with
    # other crops too: counted as pairs holding a planted copy, they read "16/5 found")
    near_found = sum(1 for a, b in planted["near"] if {a, b} in pairs)
    outliers = {rel(e["name"]) for e in report["outliers"]["items"]}
    blurry = report["image_quality"]["blurry"]  # its items: the worst 100 names
    blurry_names = {rel(n) for n in blurry["items"]}
    blurry_found = len(planted["blurry"] & blurry_names)
    with open(folder / "outliers.csv") as f:
        order = [rel(r["image"]) for r in csv.DictReader(f)]
    last = max((order.index(o) + 1 for o in planted["outliers"] if o in order), default=0)
    shutil.rmtree(noisy, ignore_errors=True)
    return {
        "planted": len(labels),
        "flagged": len(ranked),
        "cut": cut,
        "cleanlab_estimate": int(report["label_errors"]["cleanlab_estimate"]),
        "flagged_rp": rp(ranked),
        "cut_rp": rp(head),
        "top2x": len(labels & set(ranked[: 2 * len(labels)])),
        # audit.label_cut's candidates: the rows the report would cut at each multiple of chance
        "cuts": {
            t: rp([n for n, q in rows if q < t * chance and n not in planted["outliers"]])
            for t in CUTS
        },
        "at_80": precision_at_recall(ranked, labels, 0.8),
        "seconds": seconds,
        "near_found": near_found,
        "near_other": len(pairs) - near_found,
        "outliers_found": len(outliers & planted["outliers"]),
        "outliers_other": len(outliers - planted["outliers"]),
        "outliers_last_row": last,  # the planted outliers' lowest row in outliers.csv
        "blurry_found": blurry_found,
        "blurry_other": blurry["count"] - blurry_found,
        # planted outliers are of another source (digits' 8 px scans, enlarged, are blurry)
        "blurry_outliers": len(planted["outliers"] & blurry_names),
    }


def main():
    from image_classifier.lineage import describe_machine, machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", nargs="+", choices=SUITE + EXTRA)
    ap.add_argument("--keep", type=Path, help="build (and reuse) the data sets here")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--audit-only", action="store_true", help="skip the default job and floor")
    ap.add_argument("--train", nargs="*", default=[], help="extra overrides for every training")
    ap.add_argument("--audit", nargs="*", default=[], help="extra overrides for every audit")
    ap.add_argument(
        "--plant-seed",
        type=int,
        default=0,
        help="which images get the audit's planted problems (the audit's defaults were chosen on "
        "seed 0's copies: report another)",
    )
    ap.add_argument(
        "--plant-blur",
        action="store_true",
        help=f"also blur {PLANTED_EXTRA} images in place (Gaussian, radius 1/24 of the shorter "
        "side), for the audit's blurry check; off for the label figures, which are without them",
    )
    args = ap.parse_args()
    names = args.only or (QUICK if args.quick else SUITE)
    print(f"machine: {describe_machine(machine_info())}", flush=True)
    base = args.keep or Path(tempfile.mkdtemp(prefix="suite-"))
    started = time.perf_counter()
    rows = []
    for k, name in enumerate(names, 1):
        root = build(name, base / name)
        work = Path(tempfile.mkdtemp(prefix=f"suite-{name}-"))
        row = {"name": name, "images": len(files(root))}
        if not args.audit_only:
            job = default_job(root, work, args.train)
            row |= {**job, "floor": floor(root)}
            print(
                f"[{k}/{len(names)}] {name}: default job best val {job['best_val']:.2%}, "
                f"{job['accuracy']:.2%} test accuracy (95 % interval {job['interval'][0]:.1%}-"
                f"{job['interval'][1]:.1%}) in "
                f"{job['train_s']:.0f} s of training ({job['epochs']} epochs; {job['chosen']}); "
                f"pixel logistic regression {row['floor']:.2%}; "
                f"{time.perf_counter() - started:.0f} s so far",
                flush=True,
            )
        if not args.no_audit:
            for frac in (0.01, 0.05):
                a = audit(root, work, frac, args.plant_seed, args.audit, args.plant_blur)
                row[f"audit_{frac}"] = a
                print(
                    f"    audit at {frac:.0%} noise: {a['planted']} planted, {a['flagged']} "
                    f"flagged (recall {a['flagged_rp'][0]:.0%}, precision "
                    f"{a['flagged_rp'][1]:.0%}); recommended cut {a['cut']} (recall "
                    f"{a['cut_rp'][0]:.0%}, precision {a['cut_rp'][1]:.0%}); "
                    f"{a['top2x']}/{a['planted']} in the first {2 * a['planted']} rows; "
                    f"precision {a['at_80']:.0%} at 80 % recall; "
                    f"near-duplicates {a['near_found']}/{PLANTED_EXTRA} found, {a['near_other']} "
                    f"other pairs; outliers {a['outliers_found']}/{PLANTED_EXTRA} found, "
                    f"{a['outliers_other']} others, all planted in the first "
                    f"{a['outliers_last_row']} rows of outliers.csv; "
                    + (
                        f"blurry {a['blurry_found']}/{PLANTED_EXTRA} found, "
                        f"{a['blurry_other']} others ({a['blurry_outliers']} planted outliers); "
                        if args.plant_blur
                        else ""
                    )
                    + f"{a['seconds']:.0f} s",
                    flush=True,
                )
        shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
    print(
        "\n| data set | images | default job: test acc | training s | epochs | chosen | "
        "pixel LR test acc | beats floor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows if not args.audit_only else []:
        print(
            f"| {r['name']} | {r['images']} | {r['accuracy']:.2%} | {r['train_s']:.0f} | "
            f"{r['epochs']} | {r['chosen']} | {r['floor']:.2%} | "
            f"{'yes' if r['accuracy'] > r['floor'] else 'NO'} |"
        )
    if not args.no_audit:
        print(
            "\n| data set | noise | planted | flagged (recall / precision) | recommended cut "
            "(recall / precision) | cleanlab's estimate | planted in first 2x rows | "
            "precision at 80 % recall | "
            f"near-duplicates found of {PLANTED_EXTRA} (other pairs) | "
            f"outliers found of {PLANTED_EXTRA} (others) | planted outliers: last row in "
            "outliers.csv |"
        )
        print("| --- " * 11 + "|")
        for r in rows:
            for frac in (0.01, 0.05):
                a = r[f"audit_{frac}"]
                print(
                    f"| {r['name']} | {frac:.0%} | {a['planted']} | {a['flagged']} "
                    f"({a['flagged_rp'][0]:.0%} / {a['flagged_rp'][1]:.0%}) | {a['cut']} "
                    f"({a['cut_rp'][0]:.0%} / {a['cut_rp'][1]:.0%}) | {a['cleanlab_estimate']} | "
                    f"{a['top2x']}/{a['planted']} | {a['at_80']:.0%} | "
                    f"{a['near_found']} ({a['near_other']}) | "
                    f"{a['outliers_found']} ({a['outliers_other']}) | {a['outliers_last_row']} |"
                )
    if not args.no_audit:
        print_cuts(rows)
    print(f"\nsuite: {time.perf_counter() - started:.0f} s; data sets in {base}")


def print_cuts(rows) -> None:
    """Recall / precision of the rows below t x chance for each candidate audit.label_cut."""
    print("\n| copy | " + " | ".join(f"t = {t:g}" for t in CUTS) + " |")
    print("| --- |" + " --- |" * len(CUTS))
    for r in rows:
        for frac in (0.01, 0.05):
            cuts = r[f"audit_{frac}"]["cuts"]
            cells = " | ".join(f"{cuts[t][0]:.0%} / {cuts[t][1]:.0%}" for t in CUTS)
            print(f"| {r['name']}, {frac:.0%} | {cells} |")


if __name__ == "__main__":
    main()
