"""What a path or file that is not an image is, each with its fix: a URL, an archive (by its
name), or a file that PIL cannot read, named from its first bytes (a web page saved as `x.jpg`
is the usual one in a scraped folder). Torch-free, as images.py is."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # https://, s3://, gs://, file://...
URL_FIX = "download the images first and list their local paths (this tool reads local files)"
TAR = "mkdir FOLDER && tar xf {} -C FOLDER"  # each archive's unpacking command, for its hint
ARCHIVES = {".zip": "unzip {} -d FOLDER", ".7z": "7z x {} -oFOLDER", ".rar": "7z x {} -oFOLDER"}
ARCHIVES |= dict.fromkeys((".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"), TAR)

# a file's first bytes -> what it is, for the reason beside its name
SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x1aE\xdf\xa3", "a video (WebM or Matroska)"),
    (b"OggS", "an Ogg audio or video file"),
    (b"ID3", "an MP3 audio file"),
)
# ISO media (`....ftyp<brand>`): HEIC and AVIF are images, the other brands video
IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis")
TEXT_MARKUP = (
    (b"<!doctype html", "an HTML page (a download that saved a web page instead of the image?)"),
    (b"<html", "an HTML page (a download that saved a web page instead of the image?)"),
    (b"<svg", "an SVG drawing (vector graphics: export it as PNG)"),
    (b"{", "JSON or other text"),
)


def is_url(name: str) -> bool:
    return bool(URL_PATTERN.match(name.strip()))


def archive_hint(path: str | Path) -> str:
    """ " It is an archive: unpack it (e.g. `its command`) ..." for a path ending like one."""
    how = next((v for k, v in ARCHIVES.items() if str(path).lower().endswith(k)), "")
    how = how.format(shlex.quote(str(path)))
    return f" It is an archive: unpack it (e.g. `{how}`) and give the folder." if how else ""


# files that hold pictures the tool does not read, by extension, with the fix for their reason
RAW = "a camera raw file: export it as JPEG or PNG"
DICOM = "a DICOM file: convert it to PNG; 16-bit greys keep their bit depth, docs/data.md"
FOREIGN = {".dcm": DICOM, ".dicom": DICOM, ".psd": "a Photoshop file: export it as PNG"}
FOREIGN |= dict.fromkeys((".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf"), RAW)
SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")


def stray_reason(path: str | Path) -> str:
    """Why a file under the data is not read: not an image file name, and what it is when its
    extension says (a DICOM file, a camera raw file...)."""
    kind = FOREIGN.get(Path(path).suffix.lower())
    return f"not an image file name ({kind})" if kind else "not an image file name"


def table_hint(path: str | Path) -> str:
    """For data.root naming a table a manifest is not read from: a spreadsheet, or a .tsv/.txt."""
    suffix = Path(path).suffix.lower()
    if suffix in SPREADSHEETS:
        return (
            " It is a spreadsheet: save it as CSV beside the images (Excel: File > Save As > CSV "
            "UTF-8) and give that .csv, or its folder."
        )
    if suffix in (".tsv", ".txt"):
        return " A manifest is read from a .csv (columns apart by , ; or a tab): rename it so."
    return ""


def kind_of(head: bytes) -> str:
    """What a file PIL cannot read is, from its first bytes ('a PDF document'), or ''."""
    for magic, kind in SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "" if head[8:12] in IMAGE_BRANDS else "a video (MP4 or QuickTime)"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"):
        return "a video (AVI)" if head[8:12] == b"AVI " else "a WAV audio file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml"):
        text = b"<svg" if b"<svg" in text else text
    for start, kind in TEXT_MARKUP:
        if text.startswith(start):
            return kind
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head[:256]):
        return "a text file"
    return ""
