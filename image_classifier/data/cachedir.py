"""One folder per cache key, with a `manifest.json` written last: what the feature cache and the
decoded-image cache share. `building(folder)` hands out a temporary folder and renames it into
place only when the block finishes, so an interrupted build never leaves a folder that reads as
complete; `read_manifest` returns None for anything incomplete or unreadable. `one_builder`
lets one process build a folder while the others (DDP's ranks, a parallel sweep's jobs) wait for
it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def building(folder: Path) -> Iterator[Path]:
    """A temporary sibling of `folder` to fill; on success it replaces `folder` (an older,
    incomplete or foreign folder under the same key), on any error it is removed."""
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def one_builder(folder: Path, waiting: str) -> Iterator[None]:
    """Held around "read the cache, else build it": a second process asking for the same folder
    waits here (printing `waiting` once) and then reads what the first built, instead of
    decoding everything again beside it (each rank of a two-process torchrun run did)."""
    lock = folder.with_name(f".{folder.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS mounts): build as before
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
