"""What a data set is, independent of how it is batched: what the model file records about it
(`DataInfo`), the content hash that names it (and its caches), its files' names relative to its
root, how it is split (ratios per class, or given splits with what is missing carved out of
train), and how imbalanced its classes are."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from image_classifier.data.images import Preprocessing
from image_classifier.errors import UserError, did_you_mean, listed

log = logging.getLogger(__name__)


def stratified_indices(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    frac = n_val / len(labels)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[: round(len(idx) * frac)])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def content_hash(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def relative_name(p: str, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return str(p)


def class_change(model: list[str], data: list[str], sides=("the model", "the data")) -> str:
    """How the data's class names differ from a model's: '; only in the data: ...; only in the
    model: ...', or '; the same names in another order' (`sides`: what to call the two)."""
    extra = [c for c in data if c not in model]
    missing = [c for c in model if c not in data]
    if not extra and not missing:
        return "; the same names in another order"
    return (f"; only in {sides[1]}: {listed(extra)}" if extra else "") + (
        f"; only in {sides[0]}: {listed(missing)}" if missing else ""
    )


def check_classes(path: Path, classes: list[str], info) -> None:
    if info.classes == classes:
        return
    extra = [c for c in info.classes if c not in classes]
    raise UserError(
        f"The checkpoint's classes do not match the data's: the checkpoint {str(path)!r} knows "
        f"{len(classes)} classes, the data ({info.name}) has {len(info.classes)}"
        f"{class_change(classes, info.classes)}. "
        + (
            _unknown_classes_hint(classes, info.classes, extra)
            if extra
            else "If data.classes chose them, drop it: test reads a folder with the model's "
            "classes, and one holding only some of them is tested on those. Otherwise test on the "
            "data the model was trained on (drop the data overrides; with none, its folder's "
            "classes changed since training), or train a new model."
        )
    )


def _unknown_classes_hint(classes: list[str], data: list[str], extra: list[str]) -> str:
    """The data holds classes the model cannot predict: data.classes leaves them out when the
    data has every class of the model (names an override can spell unquoted)."""
    choose = ""
    if set(classes) <= set(data) and all(re.fullmatch(r"[\w.-]+", c) for c in classes):
        choose = f"leave them out with 'data.classes=[{','.join(classes)}]', "
    return (
        f"The model cannot predict {listed(extra)}: {choose}move those images out of the data to "
        "test it on the classes it knows, or train a model that knows them."
    )


def label_parts(label) -> tuple:
    """Every label of an item: the tuple of a multi-label item, (label,) for a single one."""
    return label if isinstance(label, tuple) else (label,)


def only_listed(labelled: list, splits: list | None, classes: list[str], where: str):
    """data.classes chooses the classes: images of any other class are left out. (labelled,
    splits, {class: images left out}). A listed class that no image has, beside left-out ones,
    is most likely a misspelling: refused, naming the closest. The summaries say what was left
    out (left_out_line); `test` refuses the classes its model does not know instead."""
    keep = [isinstance(label, tuple) or label in classes for _, label in labelled]
    left = Counter(label for (_, label), k in zip(labelled, keep, strict=True) if not k)
    if not left:
        return labelled, splits, {}
    kept = [label for (_, label), k in zip(labelled, keep, strict=True) if k]
    present = {x for label in kept for x in label_parts(label)}
    if missing := [c for c in classes if c not in present]:
        raise UserError(
            f"data.classes lists {listed(missing)}, which no image has ({where}); the data's "
            f"other classes are {listed(sorted(left))}.{did_you_mean(missing[0], left)} Fix the "
            "name in data.classes."
        )
    labelled = [x for x, k in zip(labelled, keep, strict=True) if k]
    splits = None if splits is None else [s for s, k in zip(splits, keep, strict=True) if k]
    return labelled, splits, dict(sorted(left.items()))


def left_out_line(left_out: dict[str, int]) -> str:
    """The summary line of only_listed's leaving out ('' when nothing was)."""
    if not left_out:
        return ""
    shown = listed([f"{c} ({n})" for c, n in left_out.items()])
    return (
        f"  left out:   {sum(left_out.values())} images of {len(left_out)} class(es) not in "
        f"data.classes: {shown}"
    )


def check_test_split(info: DataInfo, split) -> None:
    """`command=test` on data whose test split holds no image (data.split=[0.8,0.2,0])."""
    if info.split_sizes.get("test"):
        return
    raise UserError(
        f"The test split of {info.name} holds no images"
        + (f" (data.split={list(split)} gives it none)" if split is not None else "")
        + ". Test on other images, every one of them tested: data=folder data.root=FOLDER "
        "data.split=[0,0,1]; or train again with a test share, e.g. data.split=[0.8,0.1,0.1]."
    )


SPLITS = ("train", "val", "test")


# data.split_order, the rule that cut a run's splits (a checkpoint keeps its own): balanced (since
# 2026-12-05), hash (2026-12-03 on: its cuts rounded down, val short and test long on small
# classes), shuffle (before; a checkpoint with none)
SPLIT_ORDERS = ("balanced", "hash", "shuffle")


def split_items(pairs, given_splits, split, seed: int, multi: bool, root: str, rule: tuple):
    """{split: items}: the given splits (missing val/test carved out of train, stratified), else
    `split` ratios. Multi-label items are not stratified (their label sets are too many).
    `rule`: (data.split_order, the class names the labels index)."""
    cut = _unstratified_split if multi else _stratified_split
    ordered, offset = _orderer(seed, root, *rule)
    if given_splits is None or "train" not in given_splits:
        train, val, test = cut(pairs, split, ordered, offset)
        return {"train": train, "val": val, "test": test}
    splits = {s: [pr for pr, g in zip(pairs, given_splits, strict=True) if g == s] for s in SPLITS}
    missing = [s for s in ("val", "test") if not splits[s]]
    if missing:
        ratios = {"val": split[1], "test": split[2]}
        carved = cut(splits["train"], (split[0], *[ratios[s] for s in missing]), ordered, offset)
        splits["train"] = carved[0]
        for s, part in zip(missing, carved[1:], strict=True):
            splits[s] = part
    return splits


def _orderer(seed: int, root: str, order: str, classes: list[str]):
    """(items -> the order they are cut in, label -> the offset its cuts are rounded down from).
    `balanced`: stable_order, each class's cuts floor(share x n + u), u in [0, 1) a seeded hash of
    its name: unbiased on average over classes and unchanged by other classes' files (rounding
    down gave 100 classes of 15 images 100 val and 200 test images for [0.8, 0.1, 0.1]). `hash`:
    the same order, rounded down. `shuffle`: a seeded permutation per call, what checkpoints from
    before 2026-12-03 were split by. The old rules stay so that `test` of such a checkpoint
    tests the split it was trained beside."""
    if order == "shuffle":
        rng = np.random.default_rng(seed)
        return (lambda items: rng.permutation(len(items))), (lambda label: 1e-9)

    def offset(label) -> float:
        if order != "balanced":
            return 1e-9
        name = "/".join(classes[x] for x in label_parts(label)) if classes else str(label)
        digest = hashlib.blake2b(f"{seed}/class/{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    return (lambda items: stable_order(items, seed, root)), offset


def _cuts(ratios: np.ndarray, n: int, u: float) -> np.ndarray:
    """Where `n` items in order are cut: floor(cumulative share x n + u), the last at n."""
    cuts = np.floor(np.cumsum(ratios) * n + u).astype(int)
    cuts[-1] = n
    return np.minimum(cuts, n)


def _stratified_split(pairs: list[tuple[str, int]], ratios, ordered, offset) -> list[list]:
    """Per class: in `ordered`'s order, cut by ratios (`offset`: _orderer's); each split gets
    >= 1 image when it can, and train first (rounding down gave a class's only image to test)."""
    ratios = _ratios(ratios)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for pr in sorted(pairs):
        by_class.setdefault(pr[1], []).append(pr)
    parts: list[list[tuple[str, int]]] = [[] for _ in ratios]
    for label in sorted(by_class):
        items = by_class[label]
        order = ordered(items)
        n = len(items)
        cuts = _cuts(ratios, n, offset(label))
        # a split with a positive ratio takes one image from train when rounding left it none
        sizes = np.diff(np.concatenate([[0], cuts]))
        for k in range(1, len(sizes)):
            if ratios[k] > 0 and sizes[k] == 0 and sizes[0] > 1:
                sizes[k], sizes[0] = 1, sizes[0] - 1
        if sizes[0] == 0 and ratios[0] > 0:  # a class of one image: trained on, not tested
            k = max(k for k in range(len(sizes)) if sizes[k])
            sizes[k], sizes[0] = sizes[k] - 1, 1
        start = 0
        for k, size in enumerate(sizes):
            parts[k] += [items[i] for i in order[start : start + size]]
            start += size
    return parts


def _unstratified_split(pairs: list, ratios, ordered, offset) -> list[list]:
    """All items in `ordered`'s order, cut by ratios (rounded as a class named "" would be)."""
    ratios = _ratios(ratios)
    items = sorted(pairs)
    order = ordered(items)
    cuts = _cuts(ratios, len(items), offset(()))
    starts = np.concatenate([[0], cuts[:-1]])
    return [[items[i] for i in order[a:b]] for a, b in zip(starts, cuts, strict=True)]


def stable_order(items: list[tuple], seed: int, root: str) -> list[int]:
    """Indices of (path, label) `items` in the order of a seeded hash of each file's path relative
    to the data's `root`, so that a file added or removed
    moves at most one other across each cut and none from train to test (a seeded shuffle re-drew
    every split: 20 images added to a 1,000-image folder put 59 training images in test). Moving
    the data keeps the split; the class folder in the path keeps classes of the same file names
    (0.jpg, 1.jpg...) from all being cut alike."""

    def key(i: int) -> tuple[bytes, str]:
        name = f"{seed}/{os.path.relpath(items[i][0], root)}".encode()
        return hashlib.blake2b(name, digest_size=8).digest(), items[i][0]

    return sorted(range(len(items)), key=key)


def _ratios(ratios) -> np.ndarray:
    ratios = np.asarray(ratios, dtype=float)
    if (ratios < 0).any() or ratios.sum() <= 0:
        raise UserError(
            f"data.split={list(ratios)} must be non-negative ratios with a positive sum."
        )
    return ratios / ratios.sum()


DIGEST = 16  # hex digits of a file's SHA-256 that identify it (a checkpoint keeps its train's)
IMBALANCED = 10  # largest/smallest train class at which train's summary says so


def imbalance_ratio(counts) -> float | None:
    """Images in the largest class over the smallest, of the classes that have any (an empty
    class is named as such, not as a ratio); None for none. One figure for train's summary and
    the audit."""
    counts = np.asarray([c for c in counts if c], dtype=float)
    return float(counts.max() / counts.min()) if len(counts) else None


@dataclass
class DataInfo:
    """What the model file records about its data."""

    name: str
    classes: list[str]
    preprocessing: Preprocessing
    class_counts: list[int]
    split_sizes: dict[str, int]
    data_hash: str
    layout: str
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""
    multi_label: bool = False
    cache: str = ""  # the decoded-image cache folder the splits are read from, if any
    digests: dict[str, list[str]] = field(default_factory=dict)  # per split, each file's content
    left_out: dict[str, int] = field(default_factory=dict)  # images of classes not in data.classes


def data_mismatch(hp, info, trained: list[str] | None = None, asked: bool = False) -> str:
    """A note when the test data is not the data the model was trained on, else '': with the
    digests of the images it `trained` on, how many of the tested ones it has seen. Data the
    command line `asked` for, every image of it tested and none a training image, is what the
    user meant: an INFO line says so, and '' comes back."""
    trained_hash = (hp.get("data") or {}).get("hash")
    if not trained_hash or trained_hash == info.data_hash:
        return ""
    note = (
        f"the test data (hash {info.data_hash}) differs from the data this model was trained on "
        f"(hash {trained_hash})"
    )
    tested, trained = info.digests.get("test", []), set(trained or ())
    if seen := sum(d in trained for d in tested):
        note += (
            f". {seen} of the {len(tested)} test images were training images of this model "
            "(the same content): its accuracy on them is no test"
        )
    sizes = info.split_sizes
    partial = info.layout == "class folders" and sizes.get("test", 0) < sum(sizes.values())
    if partial:
        note += (
            f". Only its test split was tested ({sizes.get('test', 0)} of {sum(sizes.values())} "
            "images, by data.split): if the model never saw these images, data.split=[0,0,1] "
            "tests every one"
        )
    if asked and not seen and not partial:
        log.info(
            "Testing on the data the command line names, not the model's training data (hash "
            "%s, trained on %s)%s.",
            info.data_hash,
            trained_hash,
            f"; none of its {len(tested)} images is one the model trained on"
            if trained
            else "; the model file lists no training images (an export does not; its training "
            "checkpoint does), so whether any of these were among them is not known",
        )
        return ""
    log.warning("Data mismatch: %s; metrics may not be comparable.", note)
    return note
