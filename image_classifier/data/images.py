"""Image decoding and the one preprocessing that training, test, infer and serve share.

Torch-free on purpose: `infer` on an ONNX model imports this module and numpy, nothing heavier.
The model takes float32 NCHW pixel values in 0..255; normalisation (mean/std) lives inside the
model, so the only client-side steps are: decode, orient, convert to the model's channels, resize.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
RESIZE_MODES = ("stretch", "crop", "pad")
# Refuse, without decoding, anything larger than this many pixels (a 16k x 16k image).
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own check then agrees with ours


class ImageError(ValueError):
    """A file that is not a readable image; the message names the file and the reason."""


class ImageTooLarge(ImageError):
    """More pixels than allowed: refused as a possible decompression bomb, before decoding."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything a model file needs to turn an image into its input tensor."""

    size: tuple[int, int] = (28, 28)  # (height, width)
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: str = "stretch"
    input_range: str = "0-255 float32 NCHW; mean/std are applied inside the model"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is not one of {RESIZE_MODES}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels} must be 1 (grey) or 3 (RGB)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["size"] = tuple(int(s) for s in d["size"])
        d["mean"] = tuple(float(m) for m in d["mean"])
        d["std"] = tuple(float(s) for s in d["std"])
        return cls(**d)


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and orient an image; raise ImageError naming the file and the cause."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    return _decode(_open(path, str(path)), str(path), max_pixels)


def _open(source, name: str) -> Image.Image:
    """Image.open (header only) with every failure turned into an ImageError."""
    try:
        return Image.open(source)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot open ({e})") from None


def _decode(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb); refused without decoding"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
        im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombWarning as e:
        raise ImageTooLarge(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated ({e})") from None
    return im


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greys scaled to 8 bits by their full range, float greys by 0..1."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 257.0
    elif im.mode == "I":
        arr = np.asarray(im, dtype=np.int64).astype(np.float32)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
    else:
        return im
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Transparent pixels become white, as in a viewer; the result has no alpha."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    return im


def to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, CMYK, 1, I;16, I, F, YCbCr...) to L or RGB."""
    im = _to_8bit(im)
    im = _flatten_alpha(im)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def resize(im: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    h, w = size
    if im.size == (w, h):
        return im
    if mode == "stretch":
        return im.resize((w, h), Image.Resampling.BILINEAR)
    scale = (max if mode == "crop" else min)(w / im.width, h / im.height)
    nw, nh = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    if mode == "crop":
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))
    canvas = Image.new(im.mode, (w, h), 0)
    canvas.paste(im, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def to_array(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """A decoded image to the model's uint8 CHW array (before the model's own normalisation)."""
    im = resize(to_model_mode(im, pre.channels), pre.size, pre.resize)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def load_array(path: str | Path, pre: Preprocessing) -> np.ndarray:
    return to_array(open_image(path), pre)


def open_bytes(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """open_image for encoded bytes already in memory (an upload, a file read once)."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    return _decode(_open(io.BytesIO(data), name), name, max_pixels)


def decode_bytes(
    data: bytes, pre: Preprocessing, name: str = "image", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes (an upload, a base64 payload) to the model's uint8 CHW array."""
    return to_array(open_bytes(data, name, max_pixels), pre)


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
