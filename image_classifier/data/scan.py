"""The image files of a data set (`files_under`, `image_files`), each decoded once before training
(threads: PIL releases the GIL), so unreadable, truncated and oversized files are found up front
and skipped with their reason. A JSON file remembers each file's result by (size, mtime): files
unchanged since are not decoded again."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from image_classifier.data.images import (
    ImageError,
    display_name,
    is_image_name,
    is_system,
    open_image,
    path_problem,
)
from image_classifier.data.not_images import stray_reason


def _check_one(path: str) -> str | None:
    try:
        open_image(path, fit=1)  # a JPEG at 1/8 scale: every byte is still decoded
        return None
    except ImageError as e:
        return e.reason


def check_images(paths: list[str], skipped: dict[str, str], checked: Path | None = None):
    """Decode every image once (threads: PIL releases the GIL) so bad files are found up front;
    with `checked`, only the files new or changed (size, mtime) since the last check."""
    from tqdm.auto import tqdm

    known, stamps = _read_checked(checked), {}
    if checked is not None:
        stamps = {p: _stamp(p) for p in paths}
    todo = [p for p in paths if p not in known or known[p][:2] != stamps.get(p)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(
            tqdm(
                pool.map(_check_one, todo, chunksize=64),
                total=len(todo),
                desc="checking images",
                disable=True if len(todo) < 2000 else None,
                leave=False,
            )
        )
    fresh = {p: [*(stamps.get(p) or [None, None]), why] for p, why in zip(todo, found, strict=True)}
    known.update(fresh)
    if checked is not None and fresh:
        _write_checked(checked, {p: known[p] for p in paths})
    results = [known[p][2] for p in paths]
    for p, why in zip(paths, results, strict=True):
        if why is not None:
            skipped[p] = why
    return [why is None for why in results]


def _stamp(path: str) -> list | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_checked(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def _write_checked(path: Path, known: dict) -> None:
    """The scan's memo: not written when its folder cannot be (the next scan checks again)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted, through symlinked folders too (Path.rglob does not
    follow them before Python 3.13: `cat/batch1 -> /data/cats` read as no images), each real
    folder once (a link loop ends); hidden and system names passed over (is_system)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen or is_system(Path(top), folder):
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(top) / f for f in files if not is_system(Path(top) / f, folder)]
    return sorted(found)


def image_files(files: list[Path], skipped: dict[str, str]) -> list[Path]:
    """The files among `files` that are named as images; each other goes into `skipped` with
    its reason (a path problem, or not an image file name)."""
    images = []
    for p in files:
        if problem := path_problem(p):
            skipped[display_name(p)] = problem
        elif not is_image_name(p):
            skipped[str(p)] = stray_reason(p)
        else:
            images.append(p)
    return images
