"""`infer.sort_into=DIR`: each predicted image copied (or linked) into DIR/<predicted class>/,
the ones under infer.min_confidence into DIR/_uncertain/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SORT_MODES = ("copy", "symlink", "hardlink")  # infer.sort_mode (its rule: settings.py)


def class_dirs(classes: list[str]) -> dict[str, str]:
    """Each class's folder name under infer.sort_into: characters no file system takes become
    `_`, and a name that would meet another's (`a/b` and `a_b`; `Cat` and `cat` on macOS's and
    Windows' case-blind disks; `_uncertain`) gets ` (2)`, ` (3)`..."""
    dirs, taken = {}, {"_uncertain"}
    for c in classes:
        d = base = "".join(x if x not in '/\\:*?"<>|' else "_" for x in c).strip(". ") or "_"
        k = 2
        while d.casefold() in taken:
            d, k = f"{base} ({k})", k + 1
        taken.add(d.casefold())
        dirs[c] = d
    return dirs


def sort_into(rows: list[dict], folder: Path, mode: str, classes: list[str]) -> int:
    """Copy (or link) each predicted image into folder/<predicted class>/; returns how many."""
    n, dirs = 0, class_dirs(classes)
    for row in rows:
        if row.get("error"):
            continue
        src = Path(row["path"]).resolve()
        dest_dir = folder / ("_uncertain" if row.get("uncertain") else dirs[row["predicted_class"]])
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        i = 1
        while dest.exists() or dest.is_symlink():
            dest = dest_dir / f"{src.stem}_{i}{src.suffix}"
            i += 1
        if mode == "copy":
            shutil.copy2(src, dest)
        elif mode == "symlink":
            dest.symlink_to(src)
        else:
            os.link(src, dest)
        n += 1
    return n
