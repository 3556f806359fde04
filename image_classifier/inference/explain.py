"""`command=explain`: where in each image the network looked for its answer.

Grad-CAM (Selvaraju et al., 2017) by Captum's `LayerGradCam` on the network's last feature map
(the output of timm's `forward_features`, or of our CNN's): each position's activations weighted
by the gradient of the explained class's logit, summed over channels, negatives cut, upsampled to
the input. A map that lights the background or a corner rather than the object says the model may
have learned something about the pictures rather than the class (a watermark, the backdrop
every photo of one class was taken against).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from image_classifier.data.images import Preprocessing, display_name
from image_classifier.errors import Interrupted, UserError, did_you_mean
from image_classifier.inference.predictor import given_model
from image_classifier.inference.rows import load_image

OVERLAY_ALPHA = 0.5  # the heat map's share of each overlay pixel
MIN_SIDE = 224  # overlays are enlarged to at least this many pixels a side, to be seen


class Split(nn.Module):
    """The deployed network with the same forward, its last feature map (channels first) passing
    through an identity layer, `map`, that Grad-CAM attributes to."""

    def __init__(self, normalized, size: tuple[int, int], name: str):
        super().__init__()
        inner = normalized.net
        self.normalized = normalized
        self.features = getattr(inner, "backbone", inner)  # model=head: backbone, then head
        self.head = inner.head if self.features is not inner else None
        if not hasattr(self.features, "forward_features"):
            raise UserError(
                f"model {name!r} has no feature map to explain (model=baseline predicts the most "
                "frequent class whatever the image). Explain a network trained on the images."
            )
        channels = int(normalized.scale.shape[1])
        with torch.no_grad():
            blank = torch.zeros(1, channels, *size, device=normalized.scale.device)
            probe = self.features.forward_features(blank)
        self.nhwc = _channels_last(self.features, probe, name)
        self.map = nn.Identity()
        self.map_shape = tuple(self._forth(probe).shape[-2:])

    def forward(self, x):
        f = self.features.forward_features(self.normalized.normalize(x))
        f = self._back(self.map(self._forth(f)))
        out = self.features.forward_head(f)
        return out if self.head is None else self.head(out)

    def _forth(self, f):
        """The feature map as NCHW."""
        return f.permute(0, 3, 1, 2) if self.nhwc else f

    def _back(self, m):
        """The NCHW map in the network's own layout again."""
        return m.permute(0, 2, 3, 1) if self.nhwc else m


def _channels_last(features, probe, name: str) -> bool:
    """Whether the last feature map is NHWC (Swin) rather than NCHW (CNNs); anything else, a
    ViT's tokens, has no map Grad-CAM can use (its class token alone carries the answer)."""
    if probe.ndim == 4:
        return getattr(features, "output_fmt", "") == "NHWC"
    raise UserError(
        f"model {name!r} ends in a {probe.ndim}-D feature of shape {tuple(probe.shape)}, not a "
        "map of the image: command=explain takes convolutional networks (our CNNs, EfficientNet, "
        "ResNet, ConvNeXt, ...) and Swin."
    )


class Explainer:
    """Grad-CAM maps and the probabilities for batches of uint8 CHW images, from a module."""

    def __init__(self, module, device: str = "cpu"):
        from captum.attr import LayerGradCam

        self.module = module.eval().to(device)
        self.device = device
        self.size = tuple(module.hparams["preprocessing"]["size"])
        name = module.hparams["model"].get("name", "model")
        self.split = Split(self.module.net, self.size, name).eval()
        self.cam = LayerGradCam(self.split, self.split.map)

    def __call__(self, batch: np.ndarray, targets: list[int] | None = None):
        """(heat maps (N, H, W) in 0..1, each image's own maximum 1; probabilities (N, K);
        the explained class of each image: `targets`, else the predicted one)."""
        from captum.attr import LayerAttribution

        x = torch.from_numpy(np.ascontiguousarray(batch)).float().to(self.device)
        with torch.no_grad():
            logits = self.split(x)
        probs = self.module.probabilities(logits).cpu().numpy()
        chosen = list(targets) if targets is not None else probs.argmax(1).tolist()
        attr = self.cam.attribute(x, target=chosen, relu_attributions=True)
        heat = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), "bilinear")
        heat = heat[:, 0].cpu().numpy()
        peak = heat.reshape(len(heat), -1).max(1).reshape(-1, 1, 1)
        return np.clip(heat / np.where(peak > 0, peak, 1), 0, 1), probs, chosen


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 picture: the image (CHW uint8, grey or colour) under the heat map in
    matplotlib's `jet` colours (red: where the evidence for the explained class is)."""
    from matplotlib import colormaps

    rgb = _rgb(image).astype(np.float32)
    hot = colormaps["jet"](heat)[..., :3] * 255
    return (rgb * (1 - OVERLAY_ALPHA) + hot * OVERLAY_ALPHA).clip(0, 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A CHW uint8 image, grey or colour, as HxWx3."""
    return (np.repeat(image, 3, 0) if image.shape[0] == 1 else image).transpose(1, 2, 0)


def side_by_side(image: np.ndarray, heat: np.ndarray):
    """The image and its overlay next to each other (PIL), enlarged to MIN_SIDE when small."""
    from PIL import Image

    plain = _rgb(image)
    gap = np.full((plain.shape[0], max(2, plain.shape[1] // 32), 3), 255, np.uint8)
    picture = Image.fromarray(np.concatenate([plain, gap, overlay(image, heat)], axis=1))
    scale = MIN_SIDE / min(image.shape[1:])
    if scale > 1:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    return picture


def target_index(target: str, classes: list[str]) -> int | None:
    """explain.target: None for `predicted`, else the class's index (or the fix)."""
    if target == "predicted":
        return None
    if target not in classes:
        raise UserError(
            f"explain.target={target!r} is not a class of this model."
            f"{did_you_mean(target, classes)} Its classes: {', '.join(classes)}; or "
            "explain.target=predicted."
        )
    return classes.index(target)


def explain_paths(explainer, paths, out: Path, root: str, target, batch_size: int):
    """One row per path (the overlay written for each readable image); a bar with a count and an
    ETA. Ctrl-C raises `Interrupted` holding the rows finished before it."""
    from tqdm.auto import tqdm

    pre = Preprocessing.from_dict(explainer.module.hparams["preprocessing"])
    classes = explainer.module.classes
    rows: list[dict] = []
    with tqdm(total=len(paths), desc="explain", unit="img", disable=len(paths) <= 8) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            try:
                rows += _explain_batch(explainer, chunk, pre, classes, out, root, target)
            except KeyboardInterrupt:
                raise Interrupted(done=rows) from None
            bar.update(len(chunk))
    return rows


def _explain_batch(explainer, chunk, pre, classes, out, root, target) -> list[dict]:
    loaded = [load_image(p, pre) for p in chunk]
    good = [i for i, (arr, _) in enumerate(loaded) if arr is not None]
    rows = [{"path": display_name(p), "error": loaded[i][1]} for i, p in enumerate(chunk)]
    if not good:
        return rows
    batch = np.stack([loaded[i][0] for i in good])
    heat, probs, chosen = explainer(batch, None if target is None else [target] * len(good))
    for j, i in enumerate(good):
        picture = out / _overlay_name(chunk[i], root)
        picture.parent.mkdir(parents=True, exist_ok=True)
        side_by_side(batch[j], heat[j]).save(picture)
        p = int(probs[j].argmax())
        rows[i] = {
            "path": display_name(chunk[i]),
            "predicted_class": classes[p],
            "confidence": round(float(probs[j, p]), 6),
            "explained_class": classes[chosen[j]],
            "explained_probability": round(float(probs[j, chosen[j]]), 6),
            "overlay": str(picture),
        }
    return rows


def _overlay_name(path: Path, root: str) -> Path:
    """<the image's path below the inputs' common folder>.png."""
    return Path(os.path.relpath(os.path.abspath(path), root) + ".png")


FIELDS = ("path", "predicted_class", "confidence", "explained_class", "explained_probability")


def write_table(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*FIELDS, "overlay", "error"])
        for r in rows:
            w.writerow([*(r.get(k, "") for k in FIELDS), r.get("overlay", ""), r.get("error", "")])
    return path


def gallery_rows(rows: list[dict], n: int) -> list[dict]:
    """Up to n explained rows, taking each predicted class in turn (in the input's order), so
    that a folder's gallery shows every class it was predicted as."""
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("overlay"):
            by_class.setdefault(r["predicted_class"], []).append(r)
    queues, chosen = list(by_class.values()), []
    while len(chosen) < n and any(queues):
        chosen += [q.pop(0) for q in queues if q][: n - len(chosen)]
    return chosen


def plot_gallery(rows: list[dict], path: Path, n: int) -> Path | None:
    """Up to n of the written overlays (each image and its map), with the file's name, the
    prediction and, when another, the explained class with its probability (a map is scaled to
    its own maximum: for a class of probability 0.00 it shows where the little evidence is)."""
    from PIL import Image

    from image_classifier.plotting import gallery

    shown = gallery_rows(rows, n)
    pictures, captions = [], []
    for r in shown:
        with Image.open(r["overlay"]) as im:
            pictures.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
        name = "/".join(Path(r["path"]).parts[-2:])
        name = name if len(name) <= 36 else "..." + name[-33:]
        other = r["explained_class"] != r["predicted_class"]
        why = f", map: {r['explained_class']} ({r['explained_probability']:.2f})" if other else ""
        captions.append(f"{name}\n{r['predicted_class']} ({r['confidence']:.2f}){why}")
    title = "Where the network looked (Grad-CAM; red: most evidence)"
    return gallery(pictures, captions, path, title, cols=min(4, len(shown) or 1), cell=(3.2, 2.5))


def run_explain(cfg, checkpoint: Path | None = None) -> dict:
    """command=explain: overlays, explanations.csv and explanations.png in explain.output.
    `checkpoint`: what explain.model names, as commands.py resolves it (`runs.network_checkpoint`:
    a run folder, an export's checkpoint, the newest); a library caller may leave it to
    explain.model when that is a .ckpt's path."""
    from image_classifier.inference.infer import collect_inputs, none_read
    from image_classifier.models.checkpoint import open_network

    started = time.perf_counter()
    c = cfg.explain
    out = Path(c.output or Path(cfg.paths.output_dir) / "explanations").expanduser()
    own = ("explain.output", str(out))
    paths = collect_inputs(c.input, c.get("file_column"), own)  # bad input fails before loading
    ckpt = given_model(checkpoint, c.get("model"), "explain.model")
    device = "cuda" if c.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if c.device == "cuda" and device != "cuda":
        raise UserError("explain.device=cuda was asked for, but torch sees no GPU here: use cpu.")
    explainer = Explainer(open_network(ckpt, map_location=device), device)
    target = target_index(str(c.target), explainer.module.classes)
    out.mkdir(parents=True, exist_ok=True)
    root = os.path.commonpath([os.path.abspath(p.parent) for p in paths])  # mirrored in out
    try:
        rows = explain_paths(explainer, paths, out, root, target, int(c.batch_size))
    except Interrupted as e:
        write_table(e.done, out / "explanations.csv")
        raise Interrupted(
            f"explain interrupted after {len(e.done)} of {len(paths)} image(s); their overlays "
            f"and rows are in {out}/ (explanations.csv)."
        ) from None
    table = write_table(rows, out / "explanations.csv")
    gallery = plot_gallery(rows, out / "explanations.png", int(c.gallery)) if c.gallery else None
    seconds = time.perf_counter() - started
    _summary(rows, ckpt, explainer, out, table, gallery, seconds)
    none_read(rows, str(table))
    return {"rows": rows, "output": str(out)}


def _summary(rows, ckpt, explainer, out, table, gallery, seconds) -> None:
    errors = [r for r in rows if r.get("error")]
    (h, w), (ih, iw) = explainer.split.map_shape, explainer.size
    print(
        f"Explained {len(rows) - len(errors)} of {len(rows)} image(s) with Grad-CAM on the last "
        f"feature map ({h}x{w} positions of a {ih}x{iw} input) of {ckpt} in {seconds:.1f}s"
        + (f"; {len(errors)} unreadable (their reason is in the table)" if errors else ""),
        file=sys.stderr,
    )
    for r in errors[:20]:
        print(f"  {r['path']}: {r['error']}", file=sys.stderr)
    print(f"  overlays:  {out}{os.sep} (each image, then the map over it)", file=sys.stderr)
    print(f"  table:     {table}", file=sys.stderr)
    if gallery:
        print(f"  gallery:   {gallery}", file=sys.stderr)
