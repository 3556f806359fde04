"""How a manifest or a list names its files: the text as an editor or Excel saved it, paths
written on Windows or on another machine, an image's id without its extension, a name in
another case. Torch-free: `infer` reads `.txt` and `.csv` lists with it."""

from __future__ import annotations

import codecs
import functools
import logging
import os
import re
from pathlib import Path

from image_classifier.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def read_text(path: Path) -> str:
    """A list or manifest as an editor or Excel saved it: UTF-8 (with or without its BOM), UTF-16
    with its BOM, else Windows-1252, what Excel's "CSV (Comma delimited)" writes on a Western
    Windows (a label "café" in it stopped the command with a UnicodeDecodeError traceback),
    with a warning: in another encoding the names read wrong and their files are not found."""
    raw = Path(path).read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if str(path) in _WARNED:  # the scan and the size profile both read a manifest
            return raw.decode("cp1252", errors="replace")
        _WARNED.add(str(path))
        log.warning(
            "%s is not UTF-8 (byte 0x%02x at %d): read as Windows-1252, which Excel's \"CSV "
            '(Comma delimited)" writes. If names in it read wrong, save it as "CSV UTF-8".',
            path,
            raw[e.start],
            e.start,
        )
        return raw.decode("cp1252", errors="replace")


def listed_path(base: Path, name: str) -> Path:
    """A file as a manifest or a list names it: absolute, or relative to `base`, with `\\` as
    the separator when written on Windows (imgs\\a.jpg), and an image's id without its extension
    (Kaggle's `id` column: images/0a1b.jpg listed as images/0a1b), and its name in another case."""
    p = Path(name) if Path(name).is_absolute() else base / name
    if "\\" in name and not p.exists():
        p = base / name.replace("\\", "/")
    if p.suffix.lower() not in IMAGE_EXTENSIONS and not p.exists():
        cased = [e for x in IMAGE_EXTENSIONS for e in (x, x.upper())]
        p = next((q for e in cased if (q := Path(f"{p}{e}")).is_file()), p)
    if not p.exists() and (found := _names_by_case(str(p.parent)).get(p.name.casefold())):
        p = p.parent / found  # IMG_1.JPG listed as img_1.jpg by a case-blind Windows or macOS
    if not p.exists() and (Path(name).is_absolute() or re.match(r"[A-Za-z]:[\\/]", name)):
        p = _moved(base, name) or p
    return p


def _moved(base: Path, name: str) -> Path | None:
    """An absolute path from another machine (C:\\data\\imgs\\a.jpg, /home/ann/data/imgs/a.jpg)
    as the longest end of it that is a file under `base` (imgs/a.jpg beside the manifest)."""
    parts = [x for x in re.split(r"[\\/]", name) if x][1:]
    found = next((q for k in range(len(parts)) if (q := base.joinpath(*parts[k:])).is_file()), None)
    if found and str(base) not in _WARNED:
        _WARNED.add(str(base))
        log.warning(
            "A list or manifest in %s names its files by another machine's paths (%s): each is "
            "read as the longest end of its path found in that folder (%s).",
            base,
            name,
            found.relative_to(base),
        )
    return found


@functools.lru_cache(maxsize=1024)
def _names_by_case(folder: str) -> dict[str, str]:
    """{casefolded name: name} of a folder's files, read once per folder."""
    try:
        return {n.casefold(): n for n in os.listdir(folder)}
    except OSError:
        return {}
