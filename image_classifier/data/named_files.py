"""Labels in the file names, `data.label_pattern=REGEX`: Kaggle's dogs-vs-cats (`cat.123.jpg`),
the Oxford-IIIT Pet data set (`great_pyrenees_17.jpg`), exports that flatten class folders. The
pattern is searched in each image's name without its extension; its first group (or, without a
group, what it matched) is the label. Every image below data.root is read, at any depth; a name
it does not match is skipped with that reason. Split by data.split like class folders."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from image_classifier.data.scan import files_under, image_files
from image_classifier.errors import UserError, listed

# what `name_hint` suggests: a label, then a number, optionally after . _ - or a space
LABEL_THEN_NUMBER = r"^(.+?)[._ -]*\d+$"
TYPED = f"'data.label_pattern=\"{LABEL_THEN_NUMBER}\"'"  # as a shell passes it to Hydra whole


def read_named(root: Path, pattern: str, skipped: dict[str, str]):
    """(layout name, [(path, label)], None): the images under `root` labelled by `pattern`."""
    rx = _compiled(pattern)
    labelled = []
    images = image_files(files_under(root), skipped)
    for p in images:
        if m := rx.search(p.stem):
            label = m.group(1) if rx.groups else m.group(0)
            if label:
                labelled.append((str(p), label))
                continue
        skipped[str(p)] = f"its name does not give a label by data.label_pattern={pattern!r}"
    if not labelled:
        example = f" (e.g. {images[0].stem!r})" if images else ""
        raise UserError(
            f"data.label_pattern={pattern!r} gives no label from the names of the "
            f"{len(images)} image(s) under {str(root)!r}{example}. It is searched in each name "
            f"without its extension, and its first group is the label: for cat.12.jpg and "
            f"great_pyrenees_7.jpg, {TYPED}."
        )
    return f"labels in file names ({pattern})", labelled, None


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(
            f"data.label_pattern={pattern!r} is not a regular expression ({e}). For names like "
            f"cat.12.jpg: {TYPED}."
        ) from None


def name_hint(images: list[Path]) -> str:
    """' Their names look like ...: data.label_pattern=...' when most image names are a label
    and a number, with at least two labels each on two images or more; else ''."""
    rx = re.compile(LABEL_THEN_NUMBER)
    labels = Counter(m.group(1) for p in images if (m := rx.match(p.stem)))
    found = sum(labels.values())
    if len(labels) < 2 or found < 0.9 * len(images) or min(labels.values()) < 2:
        return ""
    shown = listed([f"{k} {n}" for k, n in labels.most_common()], 5)
    return (
        f" Their names look like a label and a number ({shown}): {TYPED} labels them by name "
        "(docs/data.md)."
    )
