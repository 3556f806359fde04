"""Image decoding and the one preprocessing that training, test, infer and serve share.

Torch-free on purpose: `infer` on an ONNX model imports this module and numpy, nothing heavier.
The model takes float32 NCHW pixel values in 0..255; normalisation (mean/std) lives inside the
model, so the only client-side steps are: decode, orient, convert to the model's channels, resize.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from image_classifier.data.not_images import kind_of
from image_classifier.data.png import may_hold_exif

# PIL modes of grey images (the others are colour, or palettes that may be colour)
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer greys past 8 bits
GREY_MODES = ("1", "L", "LA", *WIDE_GREY_MODES, "F")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGE_EXTENSIONS += (".pgm", ".pbm", ".heic", ".heif")  # HEIC/HEIF (iPhone): pillow-heif (_open)
IMAGE_EXTENSIONS += (".jfif", ".jpe", ".avif", ".jp2")  # a browser's saved JPEG; AVIF, JPEG 2000
RESIZE_MODES = ("stretch", "crop", "pad")
# Refuse, without decoding, anything larger than this many pixels (a 16k x 16k image). The
# check is ours, made on the header's size right after Image.open, and names the size it refused.
MAX_PIXELS = 16384 * 16384
# PIL's own guard stays on, above our limit, so that it does not warn first about the images we
# refuse (a process-wide warning, an exception where a filter says "error"); it catches the absurd
Image.MAX_IMAGE_PIXELS = 4 * MAX_PIXELS


class ImageError(ValueError):
    """A file that is not a readable image: `str(e)` is "<name>: <reason>", and `e.reason` is
    the reason alone (what a report lists beside the file's name)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


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
    # the 16- or 32-bit grey level shown as white (data.grey_white); None: 65535 (full 16 bits)
    grey_white: int | None = None

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is not one of {RESIZE_MODES}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels} must be 1 (grey) or 3 (RGB)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")

    def to_dict(self) -> dict:
        d = asdict(self) | {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}
        if self.grey_white is None:  # as before it existed: the same cache keys and model files
            del d["grey_white"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        floats = {k: tuple(float(x) for x in d[k]) for k in ("mean", "std")}
        return cls(**{**d, **floats, "size": tuple(int(x) for x in d["size"])})


def normalisation(mean, std, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for `channels` from data.mean / data.std (None: 0.5 per channel): one value
    serves three channels, and RGB statistics (ImageNet's) serve grey images as their average."""
    mean = [float(m) for m in mean] if mean is not None else [0.5] * channels
    std = [float(v) for v in std] if std is not None else [0.5] * channels
    if len(mean) == 1 and channels == 3:
        mean, std = mean * 3, std * 3
    elif len(mean) == 3 and channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return tuple(mean), tuple(std)


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS, fit: int = 0) -> Image.Image:
    """Open, decode and orient an image; raise ImageError naming the file and the cause. `fit`:
    the side the caller will resize to (a JPEG is decoded at 1/2 to 1/8 scale when both of its
    sides stay at least `fit`)."""
    path = Path(path)
    name = display_name(path)
    if not path.exists():
        raise ImageError(
            name,
            "broken symlink or symlink loop" if path.is_symlink() else "no such file",
        )
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(name, "empty (0 bytes)")
    return _decode(_open(path, name, max_pixels, fit), name)


def display_name(path: str | Path) -> str:
    """A path that can always be printed: bytes that are not UTF-8 are shown as \\xNN escapes."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _refused(name: str, size: tuple[int, int], limit: int, shown: tuple[int, int]) -> ImageTooLarge:
    """`size` as stored; `shown`, as it would be decoded (a JPEG at 1/2..1/8: `_open`)."""
    (w, h), pixels = size, shown[0] * shown[1]
    scaled = f" even decoded at 1/{round(w / shown[0])}" if shown != size else ""
    return ImageTooLarge(
        name,
        f"refused: {w}x{h} exceeds the pixel limit{scaled} ({pixels:,} > {limit:,} pixels; "
        "a possible decompression bomb, not decoded)",
    )


def _bomb(name: str, e: Exception) -> ImageTooLarge:
    """PIL's own guard fired (its error above twice its limit, or its warning made an error by a
    warnings filter somewhere in the process): the same refusal, with PIL's pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    pixels = f"{int(found.group(1)):,} pixels " if found else ""
    return ImageTooLarge(
        name,
        f"refused: {pixels}exceeds the pixel limit (a possible decompression bomb, not decoded)",
    )


# PIL's bomb guard raises DecompressionBombError, or *warns* with DecompressionBombWarning, which
# any warnings filter can make an exception. Every PIL call below catches both; none of this module
# touches the warnings filters (process-wide state, and the callers decode in threads).
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


@functools.cache
def _with_heif() -> None:
    """PIL reads HEIC/HEIF (the iPhone's photos) once pillow-heif's opener is registered: done on
    the first image opened, not at import, so a command that opens none does not pay for it."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def _open(source, name: str, max_pixels: int, fit: int = 0) -> Image.Image:
    """Image.open (header only) with every failure turned into an ImageError. `fit`: the side the
    caller will resize to; a JPEG is then set to decode at the smallest DCT scale (1/1..1/8)
    keeping both sides >= `fit` (docs/data.md). The pixels it will decode are checked from the
    header, so nothing larger than `max_pixels` is ever decoded (a 48 MP phone photo decoded at
    1/8 is 0.75 MP), nor anything stored larger than MAX_PIXELS."""
    _with_heif()
    try:
        im = Image.open(source)
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except PermissionError:
        raise ImageError(name, "permission denied (cannot read the file)") from None
    except UnidentifiedImageError:
        kind = kind_of(_head(source))
        raise ImageError(name, f"not an image PIL can read: {kind}" if kind else NOT_READ) from None
    except _BOMB as e:
        raise _bomb(name, e) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(name, f"cannot open ({e})") from None
    size = im.size
    if size[0] * size[1] > MAX_PIXELS:  # whatever the scale: no camera makes one
        im.close()
        raise _refused(name, size, MAX_PIXELS, size)
    if fit:
        im.draft(None, (fit, fit))  # JPEG only; other formats decode whole
    if im.size[0] * im.size[1] > max_pixels:
        im.close()
        raise _refused(name, size, max_pixels, im.size)
    return im


NOT_READ = "not an image PIL can read"


def _head(source, n: int = 512) -> bytes:
    """A file's (or an open stream's) first `n` bytes, b'' when they cannot be read."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
            return source.read(n)
        with open(source, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _decode(im: Image.Image, name: str) -> Image.Image:
    """Decode the pixels (an animation's first frame, a JPEG at the scale _open set), apply the
    EXIF orientation."""
    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except _BOMB as e:
        raise _bomb(name, e) from None
    except Exception as e:  # any decoder failure is this file's problem, whatever PIL raised
        raise ImageError(name, f"corrupt or truncated ({type(e).__name__}: {e})") from None


def header(
    path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None
) -> tuple[str, tuple[int, int]]:
    """(PIL mode, "RGB;16" for a 16-bit colour file PIL reads from its top 8 bits; (width,
    height) as shown: EXIF orientation applied, phones store portraits landscape) from the header
    alone (of `data`, the file read already); ImageError as open_image would raise."""
    name = display_name(path)
    with _open(Path(path) if data is None else io.BytesIO(data), name, max_pixels) as im:
        deep = im.mode in ("RGB", "RGBA") and im.tile and ";16" in str(im.tile[0][3])  # pre-load
        try:  # a quarter turn to show; a PNG without EXIF is not decoded to find none (png.py)
            turned = may_hold_exif(im, path, data) and im.getexif().get(0x0112) in (5, 6, 7, 8)
        except Exception:  # unreadable EXIF: open_image's exif_transpose leaves it as stored
            turned = False
        return im.mode + (";16" if deep else ""), im.size[::-1] if turned else im.size


def _to_8bit(im: Image.Image, white: int | None = None) -> Image.Image:
    """16-bit and 32-bit integer greys scaled to 8 bits, `white` (Preprocessing.grey_white: the
    data's bit depth) shown as 255, by default 65535 (32-bit: when a value passes 255); float
    greys by 0..1. 12-bit scans by 65535 kept 16 grey levels: 67.5 % against 97.5 % (docs)."""
    if im.mode in WIDE_GREY_MODES:
        arr = np.asarray(im, dtype=np.int64).astype(np.float32)
        if white or im.mode != "I" or arr.max(initial=0) > 255:
            arr = arr * (255.0 / (white or 65535))
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


def to_model_mode(im: Image.Image, channels: int, grey_white: int | None = None) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, CMYK, 1, I;16, I, F, YCbCr...) to L or RGB (`grey_white`:
    _to_8bit's white)."""
    im = _to_8bit(im, grey_white)
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
    im = resize(to_model_mode(im, pre.channels, pre.grey_white), pre.size, pre.resize)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def load_array(path: str | Path, pre: Preprocessing) -> np.ndarray:
    return _converted(open_image(path, fit=max(pre.size)), pre, display_name(path))


def _converted(im: Image.Image, pre: Preprocessing, name: str) -> np.ndarray:
    """to_array, with a failure of PIL's conversions (an exotic mode) as an ImageError."""
    try:
        return to_array(im, pre)
    except _BOMB as e:
        raise _bomb(name, e) from None
    except Exception as e:  # PIL's conversions of an exotic mode: this file's problem
        raise ImageError(
            name, f"cannot convert {im.mode} pixels ({type(e).__name__}: {e})"
        ) from None


def open_bytes(
    data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS, fit: int = 0
) -> Image.Image:
    """open_image for encoded bytes already in memory (an upload, a file read once)."""
    name = display_name(name)
    if not data:
        raise ImageError(name, "empty (0 bytes)")
    return _decode(_open(io.BytesIO(data), name, max_pixels, fit), name)


def decode_bytes(
    data: bytes, pre: Preprocessing, name: str = "image", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes (an upload, a base64 payload) to the model's uint8 CHW array."""
    return _converted(open_bytes(data, name, max_pixels, max(pre.size)), pre, display_name(name))


def path_problem(path: str | Path) -> str | None:
    """Why a listed path cannot be used as an image file before it is even opened, or None:
    a name that is not UTF-8 (it could not be written to a JSON, CSV or MLflow record), a broken
    symlink or symlink loop, or something that is not a regular file."""
    path = Path(path)
    if display_name(path.name) != path.name:
        return "file name is not valid UTF-8 (rename the file)"
    if display_name(path) != str(path):
        return "a folder's name in its path is not valid UTF-8 (rename the folder)"
    if path.is_symlink() and not path.exists():
        return "broken symlink or symlink loop"
    if path.exists() and not path.is_file():
        return "not a regular file"
    return None


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# the folders that unzipping a macOS archive or a Windows drive add
SYSTEM_FOLDERS = ("__MACOSX", "$RECYCLE.BIN", "System Volume Information")


def is_system(path: Path, under: Path) -> bool:
    """A file or folder no one put there as data, passed over without a word wherever a folder
    is read (train, test, infer): a hidden name (.DS_Store, a Mac's ._x.jpg, .git) or anything
    in SYSTEM_FOLDERS, at any depth below `under`."""
    return any(s.startswith(".") or s in SYSTEM_FOLDERS for s in path.relative_to(under).parts)
