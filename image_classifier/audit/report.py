"""What a person sees of the audit: example grids, the console summary, the MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from image_classifier import lineage, tracking
from image_classifier.data.identity import SPLITS, left_out_line
from image_classifier.data.splits import data_name
from image_classifier.errors import shown


def _image(d, i: int) -> np.ndarray:
    if d.pixels is not None:
        p = d.pixels[i]
        return p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)
    from image_classifier.data.images import open_image, to_model_mode

    im = to_model_mode(open_image(d.names[i]), 3, d.grey_white)  # 16-bit greys scaled
    im.thumbnail((128, 128))
    return np.asarray(im)


def grids(d, groups, near, suspects, outliers, flags, out: Path, n: int) -> list[str]:
    """PNG grids: one row per example (per image-quality check, its worst first); the titles
    say what each image is."""

    def short(i):
        split, label = SPLITS[int(d.splits[i])], d.classes[int(d.labels[i])]
        return f"{Path(d.names[i]).name[-18:]}\n{split} · {label}"

    def pair(e):
        i, j, r = e
        return [(i, short(i)), (j, short(j) + f"\n{r:.1f} grey levels apart")]

    def suspect(e):
        i, q, s = e
        if isinstance(s, str):  # multi-label: the labels suggested, cleanlab's label quality
            return i, short(i) + f"\n→ {s}? (quality {q:.3f})"
        return i, short(i) + f"\n→ {d.classes[s]}? (p={q:.3f})"

    leaks_first = sorted(near, key=lambda e: (d.splits[e[0]] == d.splits[e[1]], e[2]))
    ranked, beyond = outliers  # every image, most unusual first; how many are beyond the fence
    unusual = list(enumerate(int(i) for i in ranked[: n * 4]))
    made = [
        _grid(
            d,
            [[(i, short(i)) for i in g[:4]] for g in groups[:n]],
            "Exact duplicates",
            out / "exact_duplicates.png",
        ),
        _grid(
            d,
            [pair(e) for e in leaks_first[:n]],
            "Near-duplicates (leaks across splits first)",
            out / "near_duplicates.png",
        ),
        _grid(
            d,
            _chunks([suspect(e) for e in suspects[: n * 4]], 4),
            "Label issues: given labels → suggested (cleanlab's label quality)"
            if d.multi_label
            else "Label issues: given label → suggested (out-of-sample p of the given label)",
            out / "label_errors.png",
        ),
        _grid(
            d,
            _chunks([(i, short(i) + "\nbeyond the fence" * (k < beyond)) for k, i in unusual], 4),
            f"Most unusual first ({beyond:,} beyond the outlier fence)",
            out / "outliers.png",
        ),
        _grid(
            d,
            [[(i, f"{check}: {short(i)}") for i in idx[:4]] for check, idx in flags.items() if idx],
            "Image quality: each check's flagged images, worst first",
            out / "image_quality.png",
        ),
    ]
    return [m for m in made if m]


def _grid(d, rows: list[list[tuple[int, str]]], title: str, path: Path) -> str | None:
    if not rows:
        return None
    from image_classifier.plotting import gallery_layout, plt, save

    cols = max(len(r) for r in rows)
    # 2.7 in a row: the image and a caption of up to three lines
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.7 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, (i, caption) in enumerate(row):
            img = _image(d, i)
            axes[r][c].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            axes[r][c].set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return str(save(fig, path, dpi=80, layout=gallery_layout))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def log_mlflow(cfg, report: dict, out: Path, data_hash: str) -> str | None:
    tags = {**lineage.lineage_tags(cfg.paths.root, data_hash), "command": "audit"}
    logger = tracking.create_logger(cfg, run_name=f"audit-{data_name(cfg.data)}", tags=tags)
    if logger is None:  # logger.enabled=false
        return None
    metrics = {
        "images": report["data"]["images"],
        "unusable_files": len(report["unusable_files"]),
        "exact_duplicate_groups": report["exact_duplicates"]["groups"],
        "exact_duplicates_across_splits": report["exact_duplicates"]["across_splits"],
        "near_duplicate_pairs": report["near_duplicates"]["pairs"],
        "near_duplicate_leaks": report["near_duplicates"]["leaks_train_to_eval"],
        "suspected_label_errors": report["label_errors"]["suspects"],
        "outliers": report["outliers"]["beyond_fence"],
        "imbalance_ratio": report["class_counts"]["imbalance_ratio"] or 0.0,
        "seconds": report["seconds"]["total"],
        **{f"quality_{k}": v["count"] for k, v in report["image_quality"].items()},
    }
    tracking.log_metrics(logger, metrics)
    params = {f"audit.{k}": v for k, v in report["settings"].items() if k != "quality"}
    params |= {f"audit.quality.{k}": v for k, v in report["settings"]["quality"].items()}
    logger.log_hyperparams(params)
    tracking.log_artifacts(logger, [out], artifact_path="audit")
    tracking.finish(logger)
    return logger.run_id


def _too_few(classes: dict, most: int = 10) -> str:
    if not classes:
        return ""
    named = ", ".join(f"{shown(c)} ({n})" for c, n in list(classes.items())[:most])
    if len(classes) > most:  # a folder of many small classes named each on one line
        named += f" and {len(classes) - most:,} more (report.json: too_few_to_rank)"
    return f"\n    not ranked, too few images to learn: {named}; look at them yourself"


def _label_line(e: dict) -> str:
    if e["cut_rule"] is None:  # multi-label: ranked by cleanlab's label quality, no cut
        found = (
            f"{e['suspects']:,} ranked in label_issues.csv, most suspicious first (cleanlab's "
            "multi-label label quality; no recommended cut)"
            if e["suspects"]
            else "none (cleanlab flags none)"
        )
        views = e["features"].removeprefix("multi-label: ")
        return f"  label issues: {found}\n    probabilities per label from {views}"
    found = (
        f"{e['suspects']:,} ranked in label_issues.csv, most suspicious first; review the first "
        f"{e['recommended_cut']:,} (their given label is less likely than {e['cut_rule']})"
        if e["suspects"]
        else "none (no given label is less likely than chance, and cleanlab flags none)"
    )
    return (
        f"  label issues: {found}\n    probabilities from {e['features']}"
        + _agreement(e)
        + _too_few(e["too_few_to_rank"])
    )


# below this share of given labels named by the features' classifiers, the summary points to
# audit.probabilities=trained (colour-96, 63 %: it lifted the ranking; photos-7 and digits, 99 %:
# nothing to lift)
FEW_RIGHT = 0.8


def _agreement(e: dict) -> str:
    """How often the out-of-sample probabilities name the given label, and cleanlab's estimate
    beside it: the estimate counts every image they confidently put in another class, so it
    includes their own mistakes (fmnist-2000 at 1 % planted flips: 193 for 32 planted; a folder
    of 100 classes of 15 images whose classifiers named 15 % of the labels: 1,222 for 15)."""
    if (agree := e.get("agreement")) is None:
        return ""
    hint = ""
    if agree < FEW_RIGHT and e.get("probabilities") == "features":
        hint = (
            "\n    a sharper ranking where the features' classifiers name few labels: "
            "audit.probabilities=trained ranks with the model itself, trained audit.folds times "
            "(on Fashion-MNIST items on photos, 63 % named: precision at 80 % recall 33-44 % -> "
            "60-63 % at 5 % wrong labels)"
        )
    return (
        f"\n    out of sample they name the given label of {agree * 100:.0f} % of the images "
        f"(chance {e['chance'] * 100:.2g} %); cleanlab's estimate of wrong labels, their "
        f"confident mistakes included: {e['cleanlab_estimate']:,}"
    ) + hint


def summary(r: dict, out: Path, run_id: str | None) -> None:
    c, ex, near = r["class_counts"], r["exact_duplicates"], r["near_duplicates"]
    train = c["per_split"].get("train", {})
    quality = ", ".join(f"{k} {v['count']}" for k, v in r["image_quality"].items() if v["count"])
    lines = [
        f"Audit of {r['data']['name']} ({r['data']['layout']}): {r['data']['images']:,} images, "
        + (
            f"{len(r['data']['classes'])} classes"
            if not (labels := r["data"]["multi_label"])
            else f"{len(labels)} labels in {len(r['data']['classes'])} label sets (multi-label)"
        )
        + f", in {r['seconds']['total']:.1f}s",
        "  splits: "
        + ", ".join(f"{s} {c['images_per_split'][s]:,}" for s in c["per_split"])
        + (f"; train imbalance {c['imbalance_ratio']:.1f}x (largest/smallest)" if train else "")
        + (f"; EMPTY classes: {', '.join(c['empty_classes'])}" if c["empty_classes"] else ""),
        *([line] if (line := left_out_line(r["data"]["left_out"])) else []),
        f"  unusable files: {len(r['unusable_files'])}"
        + "".join(f"\n    {Path(u['path']).name}: {u['reason']}" for u in r["unusable_files"][:5]),
        f"  exact duplicates: {ex['groups']} group(s) ({ex['extra_copies']} extra file(s)), "
        f"{ex['across_splits']} across splits, {ex['conflicting_labels']} with conflicting labels",
        f"  near-duplicates: {near['pairs']} pair(s) in near_duplicates.csv, "
        f"{near['leaks_train_to_eval']} leak train into val/test",
        _label_line(r["label_errors"]),
        _outlier_line(r["outliers"]),
        f"  image quality: {quality or 'nothing flagged'}",
        f"  report: {out / 'report.json'}; grids: {out}/*.png"
        + (f"; mlflow run {run_id}" if run_id else ""),
    ]
    print("\n".join(lines))


def _outlier_line(o: dict) -> str:
    more = o["beyond_fence"] > o["count"]
    return (
        f"  outliers: {o['beyond_fence']:,} beyond the fence"
        + (f" (report.json lists the first {o['count']}: audit.max_outliers)" if more else "")
        + "; every image ranked in outliers.csv, most unusual first"
    )
