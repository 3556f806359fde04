"""What a folder of images is like, from a sample of their headers: how many, grey or colour,
and their typical size; and the training size that follows from it (`data.size=auto`). Grey
pictures saved in a colour mode (an X-ray or a scan as an RGB JPEG) are told apart by decoding a
few, small (GREY_CONTENT_SAMPLE)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from image_classifier.data.images import (
    GREY_MODES,
    WIDE_GREY_MODES,
    ImageError,
    header,
    is_image_name,
    is_system,
    open_image,
)
from image_classifier.data.layouts import ManifestOptions, data_folder, manifest_csvs
from image_classifier.data.scan import files_under

log = logging.getLogger(__name__)

GREY_CONTENT_SAMPLE = 24  # colour-mode images decoded (JPEG at 1/8 scale) to look for colour
GREY_TOLERANCE = 12  # a pixel is grey when its channels are this close (JPEG's chroma noise)

SAMPLE = 200  # headers read to judge colour and size
# data.size=auto: the images' median size, scaled down to fit the largest side and up to the
# smallest, each side a multiple of `step` (a network trained from scratch; a pretrained backbone
# wants its stride of 32, and small images enlarged toward the 224 px its ImageNet features were
# learned at: fine-tuned at 160 px rather than 96, colour-96 reached 80.4 / 78.8 % on validation
# against 70.8 / 73.6 % (seeds 42 / 1), photos-7 the same 99.05 %; docs/benchmarks.md)
SCRATCH_SIZES = {"smallest": 16, "largest": 64, "step": 4}
PRETRAINED_SIZES = {"smallest": 160, "largest": 224, "step": 32}


@dataclass(frozen=True)
class ImageProfile:
    images: int
    colour: bool
    median_size: tuple[int, int]  # (height, width), as data.size
    wide: tuple[Path, ...] = ()  # the sampled 16- and 32-bit grey files (grey_white reads them)
    sampled: int = 0  # headers read
    deep_colour: tuple[Path, ...] = ()  # the sampled 16-bit colour files (header: RGB;16)

    def describe(self) -> str:
        return f"{self.images} {'colour' if self.colour else 'grey'} images, {median_text(self)}"


def median_text(profile: ImageProfile) -> str:
    """Width first, as image viewers say it, and named: data.size is [height, width]."""
    h, w = profile.median_size
    return f"median {w} px wide, {h} high"


def _folder_manifest(folder: Path, file_column: str | None) -> Path | None:
    """The CSV manifest a folder's layout is read from, if it is one (its images may lie outside
    the folder); None for folders of images and for none or several CSVs."""
    if not folder.is_dir():
        return None
    entries = [p for p in folder.iterdir() if not is_system(p, folder)]
    csvs = manifest_csvs(entries, ManifestOptions(file_column=file_column), {})
    return csvs[0] if len(csvs) == 1 else None


def image_files(root: str | Path, file_column: str | None = None) -> list[Path]:
    """The image files under root (any layout), or those the CSV manifest named as data.root
    lists in `file_column` (data.csv_file_column; None: guessed), not the unlabelled test images
    beside them."""
    from image_classifier.data.manifest import listed_files

    named, folder = Path(root).expanduser(), data_folder(root)
    if manifest := named if named != folder else _folder_manifest(folder, file_column):
        listed = listed_files(manifest, file_column, "data.csv_file_column")
        return [p for p in dict.fromkeys(listed) if p.is_file()]  # a repeated row is one image
    return [p for p in files_under(folder) if is_image_name(p) and p.is_file()]


def profile_folder(
    root: str | Path, sample: int = SAMPLE, file_column: str | None = None
) -> ImageProfile:
    """An evenly spaced sample of the image files (image_files); unreadable ones are left to the
    data scan, which reports them."""
    paths = image_files(root, file_column)
    seen = sampled_headers(paths, sample)
    if not seen:
        return ImageProfile(len(paths), False, (28, 28))
    heights, widths = sorted(h for _, _, (_, h) in seen), sorted(w for _, _, (w, _) in seen)
    median = (int(heights[len(heights) // 2]), int(widths[len(widths) // 2]))
    wide = tuple(p for p, mode, _ in seen if mode in WIDE_GREY_MODES)
    deep = tuple(p for p, mode, _ in seen if mode.endswith(("RGB;16", "RGBA;16")))
    return ImageProfile(len(paths), is_colour(seen), median, wide, len(seen), deep)


def warn_dim_colour(profile: ImageProfile) -> None:
    """16-bit colour images are read from their top 8 bits (PIL has no deeper colour mode): a
    12-bit camera's values (up to 4095) read as 0-15, nearly black, and trained so without a
    word. A warning with the conversion when the sampled ones are all that dim."""
    levels = []
    for p in profile.deep_colour[:GREY_CONTENT_SAMPLE]:
        try:
            levels.append(int(np.asarray(open_image(p)).max(initial=0)))
        except (ImageError, ValueError, OSError):
            continue
    if levels and max(levels) < 16:
        log.warning(
            "%d of %d sampled images are 16-bit colour (e.g. %s) holding at most 12-bit values: "
            "colour is read from the top 8 bits, so they read as nearly black (brightest %d of "
            "255). Convert them to 8 bits scaled to their depth first (ImageMagick, 12-bit: "
            "mogrify -evaluate multiply 16 -depth 8 *.png).",
            len(profile.deep_colour),
            profile.sampled,
            profile.deep_colour[0],
            max(levels),
        )


def detect_channels(paths: list, sample: int = SAMPLE) -> int:
    """data.channels=auto: 1 when the sampled images are grey (a grey mode, or colour-mode
    pictures of grey content), else 3."""
    return 3 if is_colour(sampled_headers(paths, sample)) else 1


def sampled_headers(paths: list, sample: int = SAMPLE) -> list[tuple]:
    """(path, PIL mode, (width, height)) of an evenly spaced sample of `paths`; a file whose header
    does not read is left out (the data scan reports it)."""
    out = []
    for p in paths[:: max(1, len(paths) // sample)]:
        try:
            out.append((p, *header(p)))
        except ImageError:
            continue
    return out


def is_colour(seen: list[tuple]) -> bool:
    """Whether the sampled images (`sampled_headers`) show colour: a colour mode, and pixels whose
    channels differ. RGB-encoded grey pictures at 28 px were fine-tuned at 160 px as colour
    (118 s, 90.3 % on validation) where the small grey rule trains its CNN (docs)."""
    coloured = [p for p, mode, _ in seen if mode not in GREY_MODES]
    if not coloured:
        return False
    step = max(1, len(coloured) // GREY_CONTENT_SAMPLE)
    return any(shows_colour(p) for p in coloured[::step])


def shows_colour(path, unreadable: bool = True) -> bool:
    """More than 1 % of the pixels with channels further apart than GREY_TOLERANCE; a file that
    cannot be read counts as `unreadable` says (the data scan reports it)."""
    try:  # a JPEG at 1/8 of its size
        rgb = np.asarray(open_image(path, fit=1).convert("RGB"), dtype=np.int16)
    except (ImageError, ValueError, OSError):
        return unreadable
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float((spread > GREY_TOLERANCE).mean()) > 0.01


def colour_sample(paths: list) -> tuple[int, int]:
    """(how many show colour, how many were looked at) of up to GREY_CONTENT_SAMPLE `paths`
    taken evenly; unreadable ones count as grey."""
    sample = paths[:: max(1, len(paths) // GREY_CONTENT_SAMPLE)][:GREY_CONTENT_SAMPLE]
    return sum(shows_colour(p, unreadable=False) for p in sample), len(sample)


def auto_size(median: tuple[int, int], pretrained: bool) -> list[int]:
    """[height, width] for data.size=auto: the median size, kept in proportion where the
    model's limits allow (a side past them is clamped), each side rounded up to the model's
    step."""
    limits = PRETRAINED_SIZES if pretrained else SCRATCH_SIZES
    h, w = median
    scale = min(1.0, limits["largest"] / max(h, w))
    scale = max(scale, limits["smallest"] / min(h, w))
    step = limits["step"]

    def side(x: int) -> int:
        return min(limits["largest"], max(step, math.ceil(x * scale / step) * step))

    return [side(h), side(w)]


# data.grey_white=auto rounds the brightest sampled value up to one of these bit depths (a 12-bit
# sensor's scan stored as 16-bit PNG: 4095 is white); above 16 bits, to the next bit
BIT_DEPTHS = (8, 10, 12, 14, 16)


def grey_white(c, profile: ImageProfile | None = None) -> tuple[int | None, str]:
    """(the grey level of 16- and 32-bit grey images shown as white, why) for the data settings
    `c`: data.grey_white as given, or for `auto` from the brightest pixel of up to
    GREY_CONTENT_SAMPLE such images among the profile's sample (`profile`: the folder's, when
    the caller has read it already), rounded up to a bit depth (BIT_DEPTHS); (None, "") where
    there are none (8-bit images, packaged data)."""
    given = c.get("grey_white")
    if given != "auto" or not c.get("root"):
        return (None if given == "auto" else given), ""
    profile = profile or profile_folder(c.root, file_column=c.get("csv_file_column"))
    wide, levels = profile.wide, []
    for p in wide[:: max(1, len(wide) // GREY_CONTENT_SAMPLE)][:GREY_CONTENT_SAMPLE]:
        try:
            levels.append(int(np.asarray(open_image(p)).max(initial=0)))
        except (ImageError, ValueError, OSError):
            continue  # the data scan reports it
    if not levels:
        return None, ""
    brightest = max(levels)
    bits = next((b for b in BIT_DEPTHS if brightest < 2**b), brightest.bit_length())
    return 2**bits - 1, (
        f"{len(wide)} of {profile.sampled} sampled images 16- or 32-bit grey, the brightest of "
        f"{len(levels)} read at {brightest:,}: {bits}-bit values, {2**bits - 1:,} shown as white"
    )


def choose_grey_white(cfg, profile: ImageProfile | None = None) -> tuple[object, list[str]]:
    """(config with data.grey_white resolved, its note for the run summary) for auto
    (`profile`: grey_white's); the warning for dim 16-bit colour images (warn_dim_colour)."""
    from omegaconf import open_dict  # not on infer's path, which imports this module

    if profile is not None:
        warn_dim_colour(profile)
    if cfg.data.get("grey_white") != "auto":
        return cfg, []
    white, why = grey_white(cfg.data, profile)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.grey_white = white
    return cfg, [f"data.grey_white={white} ({why})"] if why else []
