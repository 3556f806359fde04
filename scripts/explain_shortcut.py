"""Does `command=explain` find a shortcut the model learned? A folder of drawn shapes in which
every training `circle` carries a white patch in its top-left corner (a watermark, a backdrop:
what a real folder can have by accident) is trained with the default job; then, on new images of
every class, each with the patch, the maps of the class `circle` are read.

    uv run python scripts/explain_shortcut.py            # about 4 minutes on 2 cores

Train and explain run exactly as README writes them (`uv run python commands.py ...`); the
share of each map's evidence inside the patch is then computed from the same maps with the
package's Explainer. The patch covers 1/36 of the image: a map blind to it puts about 3 % there.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "star", "triangle")


def shape(name: str, rng: random.Random) -> Image.Image:
    """One shape of a random colour and size on a random background crossed by lines."""
    w, h = rng.randint(70, 220), rng.randint(70, 220)
    colour = lambda: tuple(rng.randint(0, 255) for _ in range(3))  # noqa: E731
    im = Image.new("RGB", (w, h), colour())
    d = ImageDraw.Draw(im)
    for _ in range(8):
        xy = [rng.randint(0, w), rng.randint(0, h), rng.randint(0, w), rng.randint(0, h)]
        d.line(xy, fill=colour(), width=2)
    s = rng.randint(min(w, h) // 4, min(w, h) // 2)
    cx, cy = rng.randint(s, w - s), rng.randint(s, h - s)
    if name == "circle":
        d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=colour())
    elif name == "square":
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour())
    elif name == "triangle":
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=colour())
    else:
        r = [s if k % 2 == 0 else s / 2.5 for k in range(10)]
        d.polygon(
            [
                (cx + r[k] * math.cos(k * math.pi / 5), cy + r[k] * math.sin(k * math.pi / 5))
                for k in range(10)
            ],
            fill=colour(),
        )
    return im.filter(ImageFilter.GaussianBlur(rng.random()))


def write(root: Path, per_class: int, patched: tuple[str, ...], seed: int) -> Path:
    rng = random.Random(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = shape(name, rng)
            if name in patched:
                ImageDraw.Draw(im).rectangle([0, 0, im.width // 6, im.height // 6], fill="white")
            im.save(root / name / f"{i}.jpg", quality=90)
    return root


def cli(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    r = subprocess.run(
        [os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".uv" / "bin" / "uv"), "run"]
        + ["python", "commands.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        raise SystemExit(f"`{' '.join(args)}` failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - started, r.stderr


def corner_shares(checkpoint: Path, folder: Path) -> dict[str, tuple[float, float]]:
    """Per class of `folder`: (mean share of the `circle` map inside the patch, mean p(circle))."""
    from image_classifier.data.images import Preprocessing, load_array
    from image_classifier.inference.explain import Explainer
    from image_classifier.models.checkpoint import load_module

    module = load_module(checkpoint)
    explainer, circle = Explainer(module), module.classes.index("circle")
    pre = Preprocessing.from_dict(module.hparams.preprocessing)
    out = {}
    for name in CLASSES:
        batch = np.stack([load_array(p, pre) for p in sorted((folder / name).glob("*.jpg"))])
        heat, probs, _ = explainer(batch, [circle] * len(batch))
        h, w = heat.shape[1:]
        inside = heat[:, : h // 6 + 1, : w // 6 + 1].sum((1, 2))
        out[name] = (
            float((inside / heat.sum((1, 2)).clip(1e-9)).mean()),
            float(probs[:, circle].mean()),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="write the folders and runs here")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="shortcut-"))
    train = write(base / "train", 80, ("circle",), seed=0)
    new = {
        p: write(base / f"new-{p}", 20, CLASSES if p == "patched" else (), seed=7)
        for p in ("patched", "plain")
    }
    seconds, said = cli(
        "command=train", "data=folder", f"data.root={train}", f"paths.output_dir={base / 'run'}"
    )
    ckpt = base / "run" / "checkpoints" / "best.ckpt"
    explain_s, said = cli(
        "command=explain",
        f"explain.model={ckpt}",
        f"explain.input={new['patched']}",
        "explain.target=circle",
        f"explain.output={base / 'maps'}",
    )
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}")
    print(
        f"train: {seconds:.0f} s; explain on 80 images: {explain_s:.1f} s (the whole command); "
        f"maps in {base / 'maps'}"
    )
    print(
        "| new images of | evidence for `circle` inside the patch (1/36 of the image), "
        "patched / plain | p(circle), patched / plain |"
    )
    print("| --- | --- | --- |")
    shares = {p: corner_shares(ckpt, folder) for p, folder in new.items()}
    for name in CLASSES:
        (a, pa), (b, pb) = shares["patched"][name], shares["plain"][name]
        print(f"| {name} | {100 * a:.1f} % / {100 * b:.1f} % | {pa:.3f} / {pb:.3f} |")


if __name__ == "__main__":
    main()
