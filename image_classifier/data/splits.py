"""What the data is and how it is split: the packaged IDX files or a user's folder, read once
into train/val/test datasets and a DataInfo, through the decoded-image cache when it is on.
How the splits are batched (DataLoaders, on-device batches, the balanced sampler) is
datamodule.py's.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from image_classifier.data.cachedir import one_builder
from image_classifier.data.datasets import ArrayDataset, FileDataset
from image_classifier.data.identity import (
    DIGEST,
    SPLITS,
    DataInfo,
    content_hash,
    label_parts,
    relative_name,
    stratified_indices,
)
from image_classifier.data.images import Preprocessing, normalisation
from image_classifier.data.profile import auto_size, detect_channels, grey_white, profile_folder
from image_classifier.data.sources import sha256_file
from image_classifier.errors import UserError, listed
from image_classifier.rules import is_auto, items
from image_classifier.runs import write_problem

log = logging.getLogger(__name__)

FEW_TO_LEARN = 5  # training images below which a class is flagged as too few to learn


def load_splits(
    c, fixed: Preprocessing | None = None, project_root=".", build_cache=False, workers=0
) -> tuple[dict, DataInfo]:
    """(datasets by split, DataInfo) for the data settings `c` (cfg.data). `fixed`: a model's
    own preprocessing (test, export, audit); None derives it from the data. `build_cache`:
    build the decoded-image cache when missing (training); otherwise it is read when present."""
    if c.kind == "idx":
        datasets, info = _idx(c, fixed, Path(project_root))
    else:
        datasets, info = _folder(c, fixed)
    return _through_decoded_cache(c, datasets, info, build_cache, workers), info


def preprocessing_for(c, channels: int) -> Preprocessing:
    """The preprocessing the data settings ask for: data.size (`auto`: from the images' median
    size; `train` chooses it with the model in training/adapt.py), data.mean/std, data.resize,
    data.grey_white (`auto`: from the images, profile.grey_white)."""
    profiled = is_auto(c.size) or c.get("grey_white") == "auto"  # one read of the headers
    profile = profile_folder(c.root, file_column=c.get("csv_file_column")) if profiled else None
    size = auto_size(profile.median_size, pretrained=False) if is_auto(c.size) else items(c.size, 2)
    mean, std = normalisation(c.get("mean"), c.get("std"), channels)
    white = grey_white(c, profile)[0]
    return Preprocessing(tuple(size), channels, mean, std, c.resize, grey_white=white)


def _idx(c, fixed: Preprocessing | None, project_root: Path) -> tuple[dict, DataInfo]:
    """The packaged IDX files (Fashion-MNIST): fetched when missing, split train/val by label."""
    from image_classifier.data.idx import read_idx
    from image_classifier.data.sources import download, verify

    d = Path(c.dir)
    source = "local"
    if verify(d, dict(c.files)) is not None:
        source = download(c, project_root).source
    x_train = read_idx(d / c.train_images)
    y_train = read_idx(d / c.train_labels).astype(np.int64)
    x_test = read_idx(d / c.test_images)
    y_test = read_idx(d / c.test_labels).astype(np.int64)
    tr, va = stratified_indices(y_train, int(c.val_size), int(c.seed))

    pre = fixed or preprocessing_for(c, int(c.channels))

    def ds(x, y):
        return ArrayDataset(
            torch.from_numpy(np.array(x[:, None])), torch.from_numpy(np.array(y)), pre
        )

    datasets = {
        "train": ds(x_train[tr], y_train[tr]),
        "val": ds(x_train[va], y_train[va]),
        "test": ds(x_test, y_test),
    }
    classes = list(c.classes)
    if int(y_train.max()) >= len(classes):
        raise UserError(
            f"data.classes lists {len(classes)} names, but {c.name}'s labels run 0 to "
            f"{y_train.max()}: for a packaged data set it names every label in order (drop the "
            "override). To train on some of its classes, give them as class folders (data=folder)."
        )
    return datasets, DataInfo(
        name=c.name,
        classes=classes,
        preprocessing=pre,
        class_counts=np.bincount(y_train[tr], minlength=len(classes)).tolist(),
        split_sizes={k: len(v) for k, v in datasets.items()},
        data_hash=content_hash(sorted(f"{k}:{v}" for k, v in c.files.items())),
        layout="IDX files",
        source=source,
    )


def _folder(c, fixed: Preprocessing | None) -> tuple[dict, DataInfo]:
    """A user's folder: class folders, split folders or a CSV manifest (data/layouts.py)."""
    from image_classifier.data.layouts import ManifestOptions, data_folder, discover

    if not c.get("root"):
        raise UserError(
            "data=folder needs data.root=PATH (a folder of class subfolders, "
            "train/val/test folders, or a CSV manifest)."
        )
    samples = discover(
        c.root,
        split=tuple(c.split),
        seed=int(c.seed),
        strict=bool(c.strict),
        split_order=c.get("split_order") or "shuffle",  # a checkpoint's config from before it
        manifest=ManifestOptions(
            file_column=c.get("csv_file_column"),
            label_column=c.get("csv_label_column"),
            multi_label=c.get("multi_label", "auto"),
            separator=str(c.get("label_separator") or ";"),
            classes=list(c.classes) if c.get("classes") else None,
            label_pattern=c.get("label_pattern"),
        ),
        checked=_checked_file(c),
    )
    shas = {s: [sha256_file(p) for p, _ in items] for s, items in samples.splits.items()}
    copies_together(samples, shas)
    for line in class_gaps(samples):
        log.warning(line)
    pre = fixed
    if pre is None:
        channels = c.channels
        if channels == "auto":
            channels = detect_channels([p for p, _ in samples.splits["train"]])
        pre = preprocessing_for(c, int(channels))
    n = len(samples.classes)
    datasets = {s: FileDataset(items, pre, n) for s, items in samples.splits.items()}
    root = data_folder(c.root)

    def names(y) -> str:
        return ";".join(samples.classes[i] for i in label_parts(y))

    parts = sorted(
        f"{s}:{relative_name(p, root)}:{names(y)}:{sha}"
        for s, items in samples.splits.items()
        for (p, y), sha in zip(items, shas[s], strict=True)
    )
    return datasets, DataInfo(
        name=data_name(c),
        classes=samples.classes,
        preprocessing=pre,
        class_counts=samples.counts("train"),
        split_sizes={k: len(v) for k, v in samples.splits.items()},
        data_hash=content_hash(parts),
        layout=samples.layout,
        skipped=samples.skipped,
        multi_label=samples.multi_label,
        digests={s: [h[:DIGEST] for h in v] for s, v in shas.items()},
        left_out=samples.left_out,
    )


def copies_together(samples, shas: dict[str, list[str]]) -> None:
    """Exact copies (one content under two names) in one split: an image of a split data.split
    drew whose content an earlier split (train, then val) holds moves into that split, so that no
    copy tests what training saw. Copies across the splits the data gives stay, with a warning,
    and so do val's when moving them would leave val empty. `samples.splits` and `shas` (each
    file's SHA-256, per split) change in place."""
    home: dict[str, str] = {}
    moved, stayed = Counter(), Counter()
    for s in SPLITS:
        kept, out = [], []
        for item, sha in zip(samples.splits[s], shas[s], strict=True):
            first = home.setdefault(sha, s)
            if first != s and s in samples.drawn:
                out.append((item, sha, first))
            else:
                stayed[s] += first != s
                kept.append((item, sha))
        if out and not kept and s == "val":  # nothing would be left to validate on
            stayed[s] += len(out)
            kept, out = [(item, sha) for item, sha, _ in out], []
        for item, sha, first in out:
            samples.splits[first].append(item)
            shas[first].append(sha)
            moved[s] += 1
        samples.splits[s], shas[s] = [i for i, _ in kept], [h for _, h in kept]
    if moved:
        log.info(
            "%s had the same content as an image of an earlier split (a copy under another "
            "name): moved into it, so that no copy tests what training saw (command=audit lists "
            "the copies).",
            _counted(moved),
        )
    if stayed := +stayed:
        log.warning(
            "%s have the same content as an image of an earlier split and stay (a split the data "
            "gives, or val, which would be left empty): they test what training saw. "
            "command=audit lists them; delete one of each.",
            _counted(stayed),
        )


def _counted(by_split: Counter) -> str:
    """'3 val and 1 test image(s)'."""
    return " and ".join(f"{n} {s}" for s, n in by_split.items()) + " image(s)"


def data_name(c) -> str:
    """data.name, except that a folder read under data=folder's own name is called by the
    folder's name (/photos/flowers: flowers). Runs, registered models (<data name>-<model>) and
    served models of two folders are then not all called 'folder'. In ASCII (/photos/Café
    crème: Cafe_creme), as a URL path and a Triton model name take it."""
    if c.name != "folder" or not c.get("root"):
        return str(c.name)
    import unicodedata

    from image_classifier.data.layouts import data_folder
    from image_classifier.rules import safe_name

    name = unicodedata.normalize("NFKD", data_folder(c.root).resolve().name)
    return safe_name(name.encode("ascii", "ignore").decode()).strip("_") or "folder"


def class_gaps(samples) -> list[str]:
    """A line for each split that lacks some classes, and one for the classes with fewer than
    FEW_TO_LEARN training images."""
    why = {
        "train": "the model cannot learn them; add training images",
        "val": "validation cannot measure them",
        "test": "test reports no recall for them",
    }
    lines = []
    counts = {s: dict(zip(samples.classes, samples.counts(s), strict=True)) for s in why}
    for split, reason in why.items():
        if lacking := [c for c, n in counts[split].items() if n == 0 and samples.splits[split]]:
            lines.append(f"The {split} split has no images of {listed(lacking)}: {reason}.")
    if thin := [f"{c} ({n})" for c, n in counts["train"].items() if 0 < n < FEW_TO_LEARN]:
        lines.append(
            f"Classes with fewer than {FEW_TO_LEARN} training images: {listed(thin)}. "
            "Too few to learn or to audit; add images of them if you can."
        )
    return lines


def _checked_file(c) -> Path | None:
    """With the decoded cache on, where the scan remembers which files it has checked."""
    if c.get("cache", "none") != "decoded":
        return None
    root = str(Path(c.root).expanduser().resolve())
    return Path(c.cache_dir).expanduser() / ".checked" / f"{content_hash([root])}.json"


def _through_decoded_cache(c, datasets: dict, info: DataInfo, build: bool, workers: int) -> dict:
    """data.cache=decoded: read the splits from the decoded-image cache, building it first
    when training and it is missing (and fits data.cache_max_gb and the disk)."""
    if c.get("cache", "none") != "decoded" or not any(
        isinstance(d, FileDataset) or getattr(d, "pre", None) for d in datasets.values()
    ):
        return datasets  # off, or already uint8 arrays at the model's size: nothing to decode
    from image_classifier.data import decoded

    key = decoded.cache_key(info.data_hash, info.preprocessing, info.classes)
    folder = Path(c.cache_dir).expanduser() / key
    arrays = decoded.load(folder, key)
    if arrays is None and build and (why := write_problem(folder.parent)):
        # a cache is worth having, not worth stopping for (a read-only mount, a shared folder)
        log.warning(
            "Not building the decoded-image cache: %s cannot be written: %s. Images are decoded "
            "every epoch instead (data.cache_dir=DIR names a folder that can be; data.cache=none "
            "silences this).",
            folder.parent,
            why,
        )
    elif arrays is None and build:
        with one_builder(folder, f"Waiting for another process decoding into {folder}"):
            arrays = _decoded_arrays(c, folder, key, datasets, info, workers)
    if arrays is None:
        return datasets
    info.cache = str(folder)
    return {
        s: ArrayDataset(x, y, items=getattr(datasets[s], "items", None))
        for s, (x, y) in arrays.items()
    }


def _decoded_arrays(c, folder: Path, key: str, datasets: dict, info: DataInfo, workers: int):
    """The decoded cache's arrays, built first unless another process has built them meanwhile
    (or they do not fit: None)."""
    from image_classifier.data import decoded

    if (arrays := decoded.load(folder, key)) is None:
        needed = decoded.size_bytes(info.split_sizes, info.preprocessing)
        if why := decoded.fits(folder, needed, float(c.get("cache_max_gb", 20))):
            log.warning(
                "Not building the decoded-image cache: %s. Images are decoded every "
                "epoch instead (data.cache=none silences this).",
                why,
            )
            return None
        print(  # by the one process that decodes: the others wait for it (one_builder)
            f"Decoding {sum(info.split_sizes.values())} images once into {folder} "
            f"({decoded.size_text(needed)}); later runs on the same data read it"
        )
        describe = {
            "data": {"name": info.name, "hash": info.data_hash, "layout": info.layout},
            "classes": info.classes,
            "preprocessing": info.preprocessing.to_dict(),
        }
        decoded.build(folder, key, datasets, describe, workers)
        arrays = decoded.load(folder, key)
    return arrays
