"""Users' own data: class folders, pre-split folders or a CSV manifest, detected automatically
(or labels in file names, when data.label_pattern says how). Every layout ends as the same
`Samples`: sorted class names and, per split, (path, class index) pairs. Files that are not
readable images are skipped and counted (or refused with strict=True). A multi-label CSV
manifest (`shirt;bag`, or one 0/1 column per class) gives each item a tuple of class indices."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from image_classifier.data import scan
from image_classifier.data.identity import SPLITS, label_parts, only_listed, split_items
from image_classifier.data.images import display_name, is_image_name, is_system
from image_classifier.data.manifest import SPLIT_ALIASES
from image_classifier.data.named_files import name_hint, read_named
from image_classifier.data.not_images import archive_hint, table_hint
from image_classifier.errors import UserError, override

log = logging.getLogger(__name__)

Label = int | tuple[int, ...]  # a class index, or the indices of every label of a multi-label item


@dataclass
class Samples:
    classes: list[str]
    splits: dict[str, list[tuple[str, Label]]]
    layout: str
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    multi_label: bool = False
    left_out: dict[str, int] = field(default_factory=dict)  # class not in data.classes -> images
    drawn: tuple[str, ...] = SPLITS  # the splits cut by data.split, not given by the data

    def counts(self, split: str) -> list[int]:
        """Images per class (multi-label: images that carry the label)."""
        c = Counter(i for _, label in self.splits[split] for i in label_parts(label))
        return [c.get(i, 0) for i in range(len(self.classes))]


@dataclass
class ManifestOptions:
    """How a CSV manifest is read: its columns (None: guessed), multi-label (auto: detected),
    the separator between labels, and the class list labels must come from (None: any)."""

    file_column: str | None = None
    label_column: str | None = None
    multi_label: str | bool = "auto"
    separator: str = ";"
    classes: list[str] | None = None
    label_pattern: str | None = None  # data.label_pattern: labels from file names instead


def discover(
    root: str | Path,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    strict: bool = False,
    split_order: str = "balanced",
    manifest: ManifestOptions | None = None,
    check_images: bool = True,
    checked: Path | None = None,
) -> Samples:
    """Detect the layout under `root`, list its images, check that each decodes, split.
    `checked`: a JSON file remembering each file's check by (size, mtime); files unchanged
    since are not decoded again (the decoded cache passes one, so a cached run scans cheaply)."""
    named = Path(root).expanduser()
    root = data_folder(named)
    entries = _entries(root)
    skipped: dict[str, str] = {}
    manifest = manifest or ManifestOptions()
    csv_named = named if root != named else None
    layout, labelled, given_splits = _read_layout(root, entries, skipped, manifest, csv_named)
    left_out = {}
    if manifest.classes:
        where = f"{layout} under {str(root)!r}"
        labelled, given_splits, left_out = only_listed(
            labelled, given_splits, manifest.classes, where
        )
    if check_images:
        keep = scan.check_images([p for p, _ in labelled], skipped, checked)
        labelled = [x for x, ok in zip(labelled, keep, strict=True) if ok]
        if given_splits is not None:
            given_splits = [g for g, ok in zip(given_splits, keep, strict=True) if ok]
    _report_skipped(root, skipped, strict)
    multi = any(isinstance(label, tuple) for _, label in labelled)
    classes = _classes(root, layout, labelled, manifest.classes)
    index = {c: i for i, c in enumerate(classes)}
    pairs = [
        (p, tuple(sorted(index[x] for x in label)) if multi else index[label])
        for p, label in labelled
    ]
    splits = split_items(pairs, given_splits, split, seed, multi, str(root), (split_order, classes))
    for s, ratio in zip(("train", "val"), split[:2], strict=True):
        if not splits[s] and (ratio or given_splits is not None):  # ratio 0: asked for (test)
            raise UserError(
                f"The {s} split is empty ({layout} under {str(root)!r}); add images or change "
                "data.split."
            )
    drawn = tuple(s for s in SPLITS if given_splits is None or s not in given_splits)
    return Samples(classes, splits, layout, skipped, multi, left_out, drawn)


def data_folder(root: str | Path) -> Path:
    """data.root's folder: itself, or the folder of the CSV it names (data.root=F/train.csv)."""
    root = Path(root).expanduser()
    return root.parent if root.suffix.lower() == ".csv" and root.is_file() else root


def _entries(root: Path) -> list[Path]:
    if not root.exists():
        raise UserError(
            f"Data folder {str(root)!r} does not exist. Point data.root at a folder of class "
            "subfolders, of train/val/test folders, or with a CSV manifest."
        )
    if not root.is_dir():
        hint = archive_hint(root) or table_hint(root)  # a zip; a spreadsheet, .tsv or .txt
        raise UserError(f"data.root={str(root)!r} is a file, not a folder.{hint}")
    entries = [p for p in root.iterdir() if not is_system(p, root)]
    if not entries:
        raise UserError(
            f"Data folder {str(root)!r} is empty: put one subfolder of images per class in it."
        )
    return entries


def _read_layout(root: Path, entries: list, skipped: dict, manifest, csv_named: Path | None):
    """(layout name, [(path, label name)], [split per item] or None when not pre-split)."""
    if manifest.label_pattern:  # asked for: whatever else the folder holds
        return read_named(root, manifest.label_pattern, skipped)
    dirs = {p.name.lower(): p for p in entries if p.is_dir()}
    csvs = [csv_named] if csv_named else manifest_csvs(entries, manifest, skipped)
    presplit = {SPLIT_ALIASES[n]: p for n, p in dirs.items() if n in SPLIT_ALIASES}
    named = sorted((SPLIT_ALIASES.get(p.name.lower(), ""), p.name) for p in entries if p.is_dir())
    for (split, a), (again, b) in zip(named, named[1:], strict=False):
        if split and split == again:  # val/ and dev/, or Train/ and train/: one was passed over
            raise UserError(
                f"{str(root)!r} has two folders for the {split} split: {a!r} and {b!r}. Merge "
                f"them into one, or rename the other if it does not hold {split} images."
            )
    if csvs:
        if len(csvs) > 1:
            raise UserError(
                f"Found several CSV manifests in {str(root)!r}: {[p.name for p in csvs]}. Name "
                "the one to read: data.root="
                + str(next((p for p in csvs if "train" in p.name.lower()), csvs[0]))
            )
        from image_classifier.data.manifest import read_manifest

        labelled, splits, multi = read_manifest(csvs[0], manifest, skipped)
        kind = "multi-label csv manifest" if multi else "csv manifest"
        return f"{kind} {csvs[0].name}", labelled, splits
    if presplit and "train" not in presplit and len(presplit) == len(dirs):
        names = ", ".join(sorted(p.name for p in dirs.values()))
        raise UserError(
            f"{str(root)!r} holds split folders ({names}) but no train/. To test a model on "
            f"them: {override('data.root', sorted(presplit.values())[0])} data.split=[0,0,1] "
            "(every image tested); to train, add a train/ folder of class folders."
        )
    if "train" in presplit and (len(presplit) >= 2 or len(dirs) == 1):  # train/ alone: carve
        labelled, given_splits = [], []
        for name, folder in sorted(presplit.items()):
            items = _scan_class_folders(folder, skipped, note=name == "train")
            labelled += items
            given_splits += [name] * len(items)
        for p in [p for p in dirs.values() if p.name.lower() not in SPLIT_ALIASES]:
            skipped[display_name(p)] = (
                "a folder beside the split folders, not read: rename it train, val or test"
            )
        return "pre-split folders (" + ", ".join(sorted(presplit)) + ")", labelled, given_splits
    labelled = _scan_class_folders(root, skipped)
    for p in entries:
        if not p.is_dir():
            skipped.setdefault(display_name(p), "stray file beside the class folders")
    _warn_splits_inside(root, [p for p in entries if p.is_dir()])
    return "class folders", labelled, None


def manifest_csvs(entries: list, manifest, skipped: dict) -> list[Path]:
    """The CSVs among a folder's entries read as its manifest: beside class folders, only those
    naming files (`is_manifest`), the others into `skipped`."""
    from image_classifier.data.manifest import FILE_COLUMNS, is_manifest

    csvs = sorted(p for p in entries if p.suffix.lower() == ".csv")
    if sum(p.is_dir() for p in entries) > 1:  # class folders beside a CSV that is no manifest
        for p in [p for p in csvs if not is_manifest(p, manifest)]:
            csvs.remove(p)
            skipped[display_name(p)] = (
                f"a CSV with no file column ({', '.join(FILE_COLUMNS[:4])}...), or a metadata.csv "
                "with no label column: not a manifest"
            )
    return csvs


def _warn_splits_inside(root: Path, class_dirs: list[Path]) -> None:
    """ROOT/<class>/train|test/...: read as part of each class, not as splits; say so and how."""
    inside = {c.name for d in class_dirs for c in d.iterdir() if c.is_dir()}
    named = sorted(n for n in inside if n.lower() in SPLIT_ALIASES)
    if named and all(any((d / n).is_dir() for n in named) for d in class_dirs):
        log.warning(
            "%s/<class>/ holds %s folders: they are read as part of each class and split again "
            "by data.split, not kept as splits. To keep them, arrange %s/<split>/<class>/.",
            root,
            "/".join(named),
            root,
        )


def _report_skipped(root: Path, skipped: dict[str, str], strict: bool) -> None:
    if not skipped:
        return
    if strict:
        examples = "; ".join(f"{Path(p).name}: {why}" for p, why in list(skipped.items())[:5])
        raise UserError(
            f"{len(skipped)} file(s) under {str(root)!r} are not usable images "
            f"(data.strict=true): {examples}. Remove them or set data.strict=false to skip them."
        )
    log.warning(
        "Skipping %d unusable file(s) under %s:\n%s", len(skipped), root, unusable_lines(skipped)
    )


def _classes(root: Path, layout: str, labelled: list, given: list[str] | None) -> list[str]:
    """The class names found, sorted (numbers as numbers: 1, 2, 10, not 1, 10, 2), or `given`
    (data.classes: discover kept only its classes)."""
    if given:
        return list(given)
    names = {x for _, label in labelled for x in label_parts(label)}
    numbers = all(n.isascii() and n.isdigit() for n in names)
    classes = sorted(names, key=lambda n: (int(n), n) if numbers else (0, n))
    if not classes:
        raise UserError(f"No readable images found under {str(root)!r} (layout: {layout}).")
    if len(classes) < 2:
        raise UserError(
            f"Only one class ({classes[0]!r}) found under {str(root)!r}: a classifier needs at "
            "least two class folders (or two labels in the manifest)." + _one_level_down(root)
        )
    _warn_near_names(classes, layout)
    return classes


def _one_level_down(root: Path) -> str:
    """' It holds one folder, ...: point data.root at it' (an archive unpacked in its name)."""
    dirs = [p for p in root.iterdir() if p.is_dir() and not is_system(p, root)]
    inner = [p for p in dirs[0].iterdir() if p.is_dir() and not is_system(p, root)] if dirs else []
    looks = len(inner) > 1 or any(p.name.lower() in SPLIT_ALIASES for p in inner)
    if len(dirs) != 1 or not looks:
        return ""
    names = sorted(p.name for p in inner)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    point = override("data.root", dirs[0])
    return f" It holds one folder, whose subfolders ({shown}) look like the data: {point}"


def _warn_near_names(classes: list[str], layout: str) -> None:
    """'Cat' and 'cat ' are two classes (case can matter: EMNIST's 'a' and 'A'), but more often
    two exports that spelled one label differently: say so once, with the fix."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(c.strip().casefold(), []).append(c)
    if near := [" and ".join(repr(c) for c in g) for g in groups.values() if len(g) > 1]:
        log.warning(
            "Classes %s (%s) differ only in case or spaces: each is a class of its own. If they "
            "are one, give them one name.",
            "; ".join(near),
            layout,
        )


def unusable_lines(skipped: dict[str, str], limit: int = 20) -> str:
    """One indented 'path: reason' line per skipped file (the first `limit`, then a count)."""
    lines = [f"  {p}: {why}" for p, why in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all in unusable_files.csv)")
    return "\n".join(lines)


def write_unusable(skipped: dict[str, str], folder: str | Path) -> Path | None:
    """`unusable_files.csv` (path, reason) in `folder`, or None when nothing was skipped."""
    if not skipped:
        return None
    path = Path(folder) / "unusable_files.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(sorted(skipped.items()))
    return path


def _scan_class_folders(folder: Path, skipped: dict, note: bool = True) -> list[tuple[str, str]]:
    out = []
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not is_system(p, folder))
    if not class_dirs:
        unlabelled = ""
        if folder.name.lower() in SPLIT_ALIASES and any(map(is_image_name, folder.iterdir())):
            unlabelled = (  # Kaggle: train/<class>/ beside a test/ of unlabelled images
                " Its images have no labels: to train on the rest, "
                f"{override('data.root', folder.parent / 'train')} (val and test carved out of "
                f"it); to predict them, command=infer {override('infer.input', folder)}."
            )
        elif images := [p for p in folder.iterdir() if is_image_name(p)]:
            unlabelled = (
                f" It holds {len(images)} image(s) directly, without labels: put each in a folder "
                f"named after its class, or name them in a CSV manifest (docs/data.md); to "
                f"predict them, command=infer {override('infer.input', folder)}."
                + name_hint(images)
            )
        raise UserError(
            f"{str(folder)!r} has no class subfolders: expected {folder}/<class name>/<image "
            f"files>.{unlabelled}"
        )
    for d in class_dirs:
        if display_name(d.name) != d.name:  # a class name goes into the model, JSON, CSV, MLflow
            raise UserError(
                f"Class folder '{display_name(d)}': its name is not valid UTF-8. Rename it."
            )
        files = scan.files_under(d)
        if not (images := scan.image_files(files, skipped)):
            one = f"; {files[0].name}: {skipped.get(str(files[0]))}" if files else ""
            raise UserError(
                f"Class folder {str(d)!r} has no images ({len(files)} other file(s){one}). Add "
                "images to it or remove the folder."
            )
        out += [(str(p), d.name) for p in images]
    if note:  # pre-split data: for train/ only (its note once, not once a split folder)
        _note_nested(folder, out)
    return out


def _note_nested(folder: Path, labelled: list[tuple[str, str]]) -> None:
    """Say that the classes are the top folders when they hold their images in subfolders."""
    subs: dict[str, set] = {}
    for path, c in labelled:
        parts = Path(path).relative_to(folder / c).parts
        subs.setdefault(c, set()).add(parts[0] if len(parts) > 1 else "")
    nested = {c: sorted(s) for c, s in subs.items() if len(s) > 1 and "" not in s}
    held = [f"{c}: {', '.join(s[:4])}{', ...' * (len(s) > 4)}" for c, s in nested.items()]
    if held and SPLIT_ALIASES.keys().isdisjoint(x.lower() for s in nested.values() for x in s):
        log.info(
            "The classes are the folders directly in %s; %d of them hold their images in "
            "subfolders (%s), read as part of their class. For the subfolders as classes, move "
            "them up into that folder, or list the images and labels in a CSV (docs/data.md).",
            display_name(folder),
            len(nested),
            "; ".join(held[:3]) + ("; ..." if len(held) > 3 else ""),
        )
