"""CSV manifests: a file column, a label column (or one 0/1 column per class), maybe a split column.

    file,label              file,label,split          file,shirt,bag,coat
    a.png,shirt             a.png,shirt;bag,train     a.png,1,1,0
    b.png,coat              b.png,coat,test           b.png,0,0,1

Single-label (the left one) gives (path, label name); multi-label gives (path, tuple of label
names), detected from the separator in the label column (`data.label_separator`, `;`) or from 0/1
columns, or forced with `data.multi_label=true|false`. A bad row (empty label, unknown label, a
0/1 column holding something else) stops the command with its row number and the fix.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from image_classifier.data.listed import listed_path, read_text
from image_classifier.data.not_images import URL_FIX, is_url
from image_classifier.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

# column names as `column_key` writes them: "file_name" (Hugging Face's imagefolder), "File Name"
# and "filename" are one name
FILE_COLUMNS = (
    "file",
    "filename",
    "filepath",
    "path",
    "image",
    "imagepath",
    "img",
    "imageid",
    "id",
)
LABEL_COLUMNS = ("label", "labels", "class", "classname", "category", "target", "y", "tags")
SPLIT_COLUMN = "split"
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",  # the dev set of NLP and speech corpora
    "development": "val",
    "test": "test",
    "testing": "test",
}
DELIMITERS = ",;\t|"
BINARY = {"0", "1", "0.0", "1.0"}
MULTI_LABEL = ("auto", True, False)  # data.multi_label


def read_manifest(
    path: Path, options, skipped: dict[str, str]
) -> tuple[list[tuple[str, object]], list | None, bool]:
    """([(image path, label name or tuple of names)], [split per row] or None, multi-label?).
    A row naming a URL goes into `skipped` with the fix; a manifest of URLs only stops."""
    rows, columns, lower = _read_rows(path)
    fcol = _pick(path, columns, lower, options.file_column, FILE_COLUMNS, "image file", "file")
    scol = lower.get(SPLIT_COLUMN)
    label_col = options.label_column or next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    class_cols = [c for c in columns if c not in (fcol, scol, label_col)]
    columns_per_class = len(class_cols) >= 2 and (
        options.multi_label is True
        or (options.multi_label == "auto" and _non_binary(rows, class_cols) is None)
    )
    if label_col is None and columns_per_class:
        _check_binary(rows, class_cols, path)
        labels = [_from_columns(row, class_cols) for row in rows]
        multi = True
    else:
        lcol = _pick(path, columns, lower, options.label_column, LABEL_COLUMNS, "label", "label")
        multi = options.multi_label is True or (
            options.multi_label == "auto"
            and any(options.separator in (r[lcol] or "") for r in rows)
        )
        labels = [_labels(row[lcol], i, path, options, multi) for i, row in enumerate(rows, 2)]
    if options.classes and multi:  # one label: discover leaves out the classes not listed
        _check_known(labels, options.classes, path)
    labelled, splits = _items(rows, labels, (fcol, scol), path, skipped)
    if not labelled:  # every row was a URL
        raise UserError(
            f"CSV manifest {str(path)!r} lists URLs, not files (row 2: {rows[0][fcol].strip()!r})"
            f": {URL_FIX}, relative to the CSV or absolute."
        )
    return labelled, (splits if scol else None), multi


def _read_rows(path: Path) -> tuple[list[dict], list[str], dict[str, str]]:
    """(rows, columns, {column_key(column): column}); columns apart by the first of DELIMITERS the
    header holds (Excel in many locales: ";")."""
    text = read_text(path)
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in DELIMITERS if d in header), ",")
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not rows:
        raise UserError(f"CSV manifest {str(path)!r} has no rows.")
    columns = list(rows[0].keys())
    return rows, columns, {column_key(c): c for c in columns}


def column_key(name: str) -> str:
    """A column's name without case, spaces, underscores or hyphens."""
    return "".join(ch for ch in name.lower() if ch not in " _-\t")


def is_manifest(path: Path, options) -> bool:
    """Whether a CSV beside class folders is their manifest: it names its files (a file column,
    or data.csv_file_column). Hugging Face's imagefolder `metadata.csv` names files and their
    captions: without a label column it is not one, and the folders label the images."""
    if options.file_column:
        return True
    try:
        _, _, lower = _read_rows(path)
    except (UserError, OSError, UnicodeDecodeError, csv.Error):  # no rows, unreadable
        return False
    if not any(c in lower for c in FILE_COLUMNS):
        return False
    labelled = options.label_column or any(c in lower for c in LABEL_COLUMNS)
    return path.name.lower() != "metadata.csv" or bool(labelled)


def listed_files(path: Path, column: str | None = None, key: str = "infer.file_column"):
    """infer.input=LIST.csv (a manifest, Kaggle's test.csv): the files of `column` (the setting
    `key` names it), else of its file column or its only column, relative to the CSV or absolute;
    empty cells passed over."""
    rows, columns, lower = _read_rows(path)
    if column and column not in columns:
        raise UserError(
            f"{key}={column!r} is not a column of {path.name}; columns: "
            f"{columns}.{did_you_mean(column, columns)}"
        )
    fcol = column or next((lower[c] for c in FILE_COLUMNS if c in lower), columns[0])
    if len(columns) > 1 and fcol not in (column, *(lower.get(c) for c in FILE_COLUMNS)):
        raise UserError(
            f"Cannot tell which column of {path.name} holds the image files: columns are "
            f"{columns}. Set {key}=<column>, name it {' or '.join(FILE_COLUMNS[:4])}, or give a "
            ".txt list of paths."
        )
    files = [(row[fcol] or "").strip() for row in rows]
    if urls := [f for f in files if is_url(f)]:
        raise UserError(f"{path.name} lists {len(urls)} URL(s) ({urls[0]!r}): {URL_FIX}.")
    return [listed_path(path.parent, f) for f in files if f]


def _items(rows: list[dict], labels: list, cols: tuple, path: Path, skipped: dict):
    """([(image path, label)], [split per item]): each image once, URLs into `skipped`."""
    fcol, scol = cols
    labelled, splits, first, repeats = [], [], {}, []
    for i, (row, label) in enumerate(zip(rows, labels, strict=True), start=2):
        file = (row[fcol] or "").strip()
        if not file:
            raise UserError(
                f"Row {i} of {path.name} has no image file in column {fcol!r}; fill it in or "
                "remove the row."
            )
        if is_url(file):
            skipped[file] = f"a URL, not a file: {URL_FIX}"
            continue
        split = _split_name(row[scol], i, path) if scol else None
        image = os.path.normpath(listed_path(path.parent, file))
        if image in first:
            _check_repeat(path, file, first[image], (i, label, split))
            repeats.append((i, first[image][0]))
            continue
        first[image] = (i, label, split)
        labelled.append((image, label))
        splits.append(split)
    if repeats:
        log.warning(
            "%s lists %d file(s) again with the same label (row %d repeats row %d): each image "
            "is used once.",
            path.name,
            len(repeats),
            *repeats[0],
        )
    return labelled, splits


def _check_repeat(path: Path, file: str, was: tuple, now: tuple) -> None:
    """A file listed twice: the same label and split is a repeat (used once); a different label or
    split would train on an image with two answers, or test on one seen in training."""
    (row0, label0, split0), (row, label, split) = was, now
    what = ("label", label0, label) if label0 != label else ("split", split0, split)
    if what[1] == what[2]:
        return
    several = " (an image with several labels: one row naming them all, separated by ';')"
    raise UserError(
        f"Rows {row0} and {row} of {path.name} both list {file!r}, with {what[0]} {what[1]!r} "
        f"and {what[2]!r}. Keep the right row and remove the other"
        f"{several if what[0] == 'label' else ''}."
    )


def _split_name(value: str | None, line: int, path: Path) -> str:
    """The split a row names: train, val or test by any of SPLIT_ALIASES; empty is train."""
    value = (value or "").strip().lower()
    if not value:
        return "train"
    if value not in SPLIT_ALIASES:
        raise UserError(
            f"Row {line} of {path.name} names split {value!r}.{did_you_mean(value, SPLIT_ALIASES)}"
            f" Use one of {', '.join(SPLIT_ALIASES)} (empty means train)."
        )
    return SPLIT_ALIASES[value]


def _pick(path: Path, columns, lower, given, candidates, what: str, key: str) -> str:
    if given:
        if given not in columns:
            raise UserError(
                f"data.csv_{key}_column={given!r} is not a column of {path.name}; columns: "
                f"{columns}."
            )
        return given
    for c in candidates:
        if c in lower:
            return lower[c]
    raise UserError(
        f"Cannot tell which column of {path.name} holds the {what}: columns are {columns}. "
        f"Set data.csv_{key}_column=<column> (or, for multi-label data, give one 0/1 column per "
        "class)."
    )


def _non_binary(rows: list[dict], columns: list[str]) -> tuple[int, str, str] | None:
    """(row number, column, value) of the first cell that is not 0 or 1, else None."""
    for line, row in enumerate(rows, start=2):
        for c in columns:
            if (row[c] or "").strip() not in BINARY:
                return line, c, row[c]
    return None


def _check_binary(rows: list[dict], columns: list[str], path: Path) -> None:
    if bad := _non_binary(rows, columns):
        line, c, value = bad
        raise UserError(
            f"Row {line} of {path.name}: column {c!r} holds {value!r}; with one column "
            "per class (multi-label) every value is 0 or 1."
        )


def _from_columns(row: dict, columns: list[str]) -> tuple[str, ...]:
    return tuple(c for c in columns if (row[c] or "").strip() in ("1", "1.0"))


def _labels(value: str | None, line: int, path: Path, options, multi: bool):
    text = (value or "").strip()
    if not text:
        raise UserError(
            f"Row {line} of {path.name} has an empty label; fill it in or remove the row"
            + (
                f" (multi-label: name every label, separated by {options.separator!r}; for "
                "images that carry none of the labels, write one 0/1 column per class, where "
                "a row of zeros is allowed: docs/data.md)"
                if multi
                else ""
            )
            + "."
        )
    if not multi:
        return text
    parts = [x.strip() for x in text.split(options.separator)]
    if any(not x for x in parts):
        raise UserError(
            f"Row {line} of {path.name}: {text!r} has an empty label between the "
            f"{options.separator!r} separators; remove the extra separator."
        )
    return tuple(sorted(set(parts)))


def _check_known(labels: list, classes: list[str], path: Path) -> None:
    known = set(classes)
    for line, label in enumerate(labels, start=2):
        for x in label:
            if x not in known:
                raise UserError(
                    f"Row {line} of {path.name}: unknown label {x!r}; data.classes lists "
                    f"{', '.join(classes)}.{did_you_mean(x, classes)} Fix the row or add the "
                    "label to data.classes."
                )
