import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from image_classifier.data.images import (
    ImageError,
    ImageTooLarge,
    Preprocessing,
    decode_bytes,
    load_array,
    open_image,
)

GREY = Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))
RGB = Preprocessing(size=(8, 8), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def _save(tmp_path, im, name):
    p = tmp_path / name
    im.save(p)
    return p


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
@pytest.mark.parametrize("pre", [GREY, RGB], ids=["grey", "rgb"])
def test_every_mode_becomes_model_input(tmp_path, mode, pre):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    im = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    )
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    arr = load_array(_save(tmp_path, im, f"x.{ext}"), pre)
    assert arr.dtype == np.uint8
    assert arr.shape == (pre.channels, 8, 8)


def test_sixteen_bit_scales_to_eight_bit(tmp_path):
    values = np.full((4, 4), 65535, dtype=np.uint16)
    values[0, 0] = 0
    p = _save(tmp_path, Image.fromarray(values), "deep.png")
    arr = load_array(p, Preprocessing(size=(4, 4), channels=1, mean=(0.5,), std=(0.5,)))
    assert arr[0, 0, 0] == 0 and arr[0, 3, 3] == 255


def test_transparent_pixels_become_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    arr = load_array(
        _save(tmp_path, im, "a.png"),
        Preprocessing(size=(4, 4), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
    )
    assert (arr == 255).all()


def test_exif_orientation_is_honoured(tmp_path):
    # a 2x1 landscape image whose EXIF says "rotate 90": it must come out 1 wide and 2 tall
    im = Image.new("L", (20, 10), 0)
    im.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=100)
    opened = open_image(p)
    assert opened.size == (10, 20)
    arr = np.asarray(opened)
    assert arr[:10].mean() > 200 and arr[10:].mean() < 50  # white half now on top


def _chunks(data: bytes) -> list[bytes]:
    """A PNG's chunks, each whole (length, type, data, CRC)."""
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        out.append(data[at : at + 12 + length])
        at += 12 + length
    return out


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels", "none"])
def test_a_pngs_orientation_is_read_without_decoding_one_that_has_none(
    tmp_path, monkeypatch, where
):
    """PIL's getexif() decoded every PNG in search of an eXIf chunk after its pixels: as long as
    reading the image, twice per file in an audit. A PNG without one is no longer decoded, one with
    it, before or after the pixels, is turned as open_image turns it."""
    from PIL import PngImagePlugin

    from image_classifier.data.images import header

    exif = Image.Exif()
    exif[0x0112] = 6  # shown a quarter turn round: 10 wide, 20 tall
    p = tmp_path / "x.png"
    Image.new("RGB", (20, 10), (200, 30, 30)).save(p, exif=exif if where != "none" else None)
    parts = _chunks(p.read_bytes())
    kinds = [c[4:8] for c in parts]
    assert (b"eXIf" in kinds) == (where != "none")
    if where == "after the pixels":  # moved just before IEND, as PNG allows
        ex = parts.pop(kinds.index(b"eXIf"))
        parts.insert(len(parts) - 1, ex)
        p.write_bytes(p.read_bytes()[:8] + b"".join(parts))
    shown = open_image(p).size
    assert shown == ((20, 10) if where == "none" else (10, 20))
    loads, load = [], PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda im: loads.append(1) or load(im))
    for data in (None, p.read_bytes()):
        assert header(p, data=data) == ("RGB", shown)
    assert len(loads) == {"none": 0, "before the pixels": 0, "after the pixels": 2}[where]


def test_a_large_jpeg_is_decoded_at_the_scale_the_model_needs(tmp_path):
    """A 12 MP photo was decoded whole twice (scan, cache) to become 160 px: libjpeg's DCT scaling
    now decodes it at 1/2..1/8, never below the model's side, the same for a file and an upload."""
    from image_classifier.data.images import decode_bytes

    y, x = np.mgrid[0:200, 0:400]
    im = Image.fromarray(np.stack([x * 255 // 400, y * 255 // 200, 0 * x], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 200 wide, 400 tall
    p = tmp_path / "photo.jpg"
    im.save(p, exif=exif, quality=95)
    assert open_image(p).size == (200, 400)
    assert open_image(p, fit=8).size == (25, 50)  # 1/8, oriented after decoding
    assert open_image(p, fit=50).size == (50, 100)  # 1/4: both sides stay >= 50
    assert open_image(p, fit=60).size == (100, 200)  # 1/2: 1/4 would leave a side of 50
    assert open_image(_save(tmp_path, im, "photo.png"), fit=8).size == (400, 200)  # PNG: whole
    arr = load_array(p, RGB)
    assert np.array_equal(arr, decode_bytes(p.read_bytes(), RGB, name="upload.jpg"))
    whole = np.asarray(open_image(p).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.abs(arr.transpose(1, 2, 0).astype(int) - whole).mean() < 3  # the same picture


def test_resize_modes(tmp_path):
    p = _save(tmp_path, Image.new("L", (40, 10), 200), "wide.png")
    for mode in ("stretch", "crop", "pad"):
        pre = Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,), resize=mode)
        arr = load_array(p, pre)
        assert arr.shape == (1, 8, 8)
    padded = load_array(
        p, Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,), resize="pad")
    )
    assert padded[0, 0, 0] == 0 and padded[0, 4, 4] == 200


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    with pytest.raises(ImageError, match="not an image"):
        open_image(p)


def test_a_file_that_is_not_an_image_is_named_for_what_it_is(tmp_path):
    """ "not an image PIL can read" said nothing of what the file was: a scraped folder's web
    pages saved as .jpg, a PDF scan, a phone's video. The first bytes name it, on disk and in an
    upload; an HEIC or AVIF (ISO media, as MP4 is) is not called a video."""
    from image_classifier.data.images import Preprocessing, decode_bytes
    from image_classifier.data.not_images import kind_of

    page = b"\xef\xbb\xbf\n<!DOCTYPE HTML>\n<html><head><title>404</title>"
    (tmp_path / "x.jpg").write_bytes(page)
    with pytest.raises(ImageError, match=r"x.jpg: not an image PIL can read: an HTML page"):
        open_image(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match="upload: not an image PIL can read: a PDF document"):
        decode_bytes(b"%PDF-1.4\n%\xc7\xec", Preprocessing(), name="upload")
    mp4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2mp41"
    assert kind_of(mp4) == "a video (MP4 or QuickTime)"
    assert kind_of(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00") == ""  # an image
    assert kind_of(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">').startswith(
        "an SVG drawing"
    )
    assert kind_of(b"RIFF\x00\x00\x00\x00AVI LIST") == "a video (AVI)"
    assert kind_of(b"\x89\x00\xff\x10binary") == ""  # unknown: the plain reason
    (tmp_path / "y.png").write_bytes(b"\x89\x00\xff\x10binary")
    with pytest.raises(ImageError, match=r"y.png: not an image PIL can read$"):
        open_image(tmp_path / "y.png")


def test_truncated_image(tmp_path):
    p = _save(
        tmp_path,
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        "t.jpg",
    )
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        open_image(p)
    with pytest.raises(ImageError, match="truncated"):  # the scan's check, at 1/8 scale
        open_image(p, fit=1)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels in a few bytes
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        open_image(p)


def test_bomb_limit_is_configurable(tmp_path):
    p = _save(tmp_path, Image.new("L", (100, 100)), "big.png")
    with pytest.raises(ImageTooLarge, match="exceeds the pixel limit"):
        open_image(p, max_pixels=5000)


def test_the_limit_counts_the_pixels_a_jpeg_decodes_at_the_models_size(tmp_path):
    """A 48 MP phone photo for a 192 px model decodes at 1/8 (0.75 MP): the service's 40 MP limit
    must not refuse it. Here 400x400 for 16 px decodes at 50x50, under 5,000 pixels."""
    big = Image.new("RGB", (400, 400), (20, 120, 200))
    data = {ext: _save(tmp_path, big, f"big.{ext}").read_bytes() for ext in ("jpg", "png")}
    assert decode_bytes(data["jpg"], RGB, max_pixels=5000).shape == (3, 8, 8)
    assert open_image(tmp_path / "big.jpg", max_pixels=5000, fit=16).size == (50, 50)
    with pytest.raises(ImageTooLarge, match=r"400x400 exceeds the pixel limit \(160,000 > 5,000"):
        decode_bytes(data["png"], RGB, max_pixels=5000)  # a PNG decodes whole
    with pytest.raises(ImageTooLarge, match=r"400x400 exceeds the pixel limit \(160,000"):
        open_image(tmp_path / "big.jpg", max_pixels=5000)  # no size asked: decoded whole
    with pytest.raises(ImageTooLarge, match=r"even decoded at 1/8 \(2,500 > 1,000 pixels"):
        decode_bytes(data["jpg"], RGB, max_pixels=1000)


def test_unreadable_file_is_refused_with_its_reason(tmp_path, monkeypatch):
    """A file without read permission (root reads mode-000 files, so PIL's answer is faked)."""
    from PIL import Image as PILImage

    p = _save(tmp_path, Image.new("L", (4, 4)), "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(PILImage, "open", denied)
    with pytest.raises(ImageError, match="permission denied") as e:
        open_image(p)
    assert e.value.reason == "permission denied (cannot read the file)"
    assert str(e.value) == f"{p}: {e.value.reason}"


def test_what_is_not_a_regular_file_is_named(tmp_path):
    import os

    from conftest import make_class_folders

    from image_classifier.data.images import path_problem
    from image_classifier.data.layouts import discover

    root = make_class_folders(tmp_path / "data", classes=("a", "b"), per_class=6)
    os.mkfifo(root / "a" / "pipe.png")
    assert path_problem(root / "a" / "pipe.png") == "not a regular file"
    skipped = {p.rsplit("/", 1)[-1]: why for p, why in discover(root).skipped.items()}
    assert skipped == {"pipe.png": "not a regular file"}


def test_iphone_heic_photos_are_read_from_files_and_uploads(tmp_path):
    """HEIC, the iPhone's default, was "not an image file name": a folder of iPhone photos had
    no images. pillow-heif's opener is registered on the first image opened."""
    from image_classifier.data.images import decode_bytes, is_image_name, open_image

    open_image(_save(tmp_path, Image.new("L", (4, 4)), "first.png"))  # registers the opener
    colours = np.zeros((32, 48, 3), np.uint8)
    colours[:, :24] = (200, 30, 30)
    colours[:, 24:] = (30, 30, 200)
    path = _save(tmp_path, Image.fromarray(colours), "IMG_0001.HEIC")
    assert is_image_name(path) and open_image(path).size == (48, 32)
    left_right = load_array(path, RGB)[:, 4, [1, 6]].astype(int)  # (channel, column)
    assert left_right[0, 0] > 150 > left_right[0, 1] and left_right[2, 1] > 150 > left_right[2, 0]
    upload = decode_bytes(path.read_bytes(), RGB, "IMG_0001.HEIC")
    assert np.abs(upload.astype(int) - load_array(path, RGB).astype(int)).max() == 0


@pytest.mark.parametrize("suffix", [".jfif", ".jpe", ".avif", ".jp2"])
def test_web_and_browser_formats_are_image_files(tmp_path, suffix):
    """A browser saves JPEGs as .jfif, the web serves AVIF: such a folder was "not image file
    names" throughout, so its classes were empty."""
    from image_classifier.data.images import is_image_name

    colours = np.zeros((16, 16, 3), np.uint8)
    colours[:, :8] = (220, 20, 20)
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(colours).save(path, format={".jfif": "JPEG", ".jpe": "JPEG"}.get(suffix))
    assert is_image_name(path)
    left_right = load_array(path, RGB)[0, 4, [1, 6]].astype(int)  # red channel
    assert left_right[0] > 150 > left_right[1]
