"""`command=infer`: predict classes for files, folders, globs or path lists, in batches.

With an .onnx model this path imports numpy, PIL and onnxruntime only (no torch), so one image is
answered about as fast as the interpreter starts.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from image_classifier.data.images import is_image_name
from image_classifier.data.listed import listed_path, read_text
from image_classifier.data.manifest import listed_files
from image_classifier.data.not_images import URL_FIX, archive_hint, is_url
from image_classifier.data.profile import colour_sample
from image_classifier.data.scan import files_under
from image_classifier.errors import Interrupted, UserError, listed, override, shown
from image_classifier.inference.predictor import given_model, load_predictor
from image_classifier.inference.rows import predict_paths
from image_classifier.inference.sorting import sort_into


def collect_inputs(
    spec: str, file_column: str | None = None, own: tuple[str, str | None] = ("", None)
) -> list[Path]:
    """A file, a folder (recursive; its files with image names), a glob, a .txt file with one
    path per line or a .csv (its `file_column`, infer.file_column; None: guessed). A file named
    explicitly that is not an image becomes an error row. `own`: (setting, folder) of what the
    command writes, left out when it lies inside the input (`outside`)."""
    if not spec:
        raise UserError(
            "infer.input is not set: give a file, a folder, a glob, or a .txt or .csv list."
        )
    p = Path(spec).expanduser()
    if file_column and p.suffix.lower() != ".csv":
        raise UserError(
            f"infer.file_column={file_column!r} names a column of a CSV list, but infer.input="
            f"{spec!r} is not a .csv: drop infer.file_column, or give the .csv."
        )
    if p.is_dir():
        every = outside(files_under(p), *own)
        files = [f for f in every if is_image_name(f)]
        if others := [str(f.relative_to(p)) for f in every if not is_image_name(f)]:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            print(
                f"Skipping {len(others)} file(s) under {p} that are not image file names, as "
                f"train does: {shown}",
                file=sys.stderr,
            )
    elif p.is_file() and p.suffix.lower() == ".txt":
        base = p.parent
        lines = [ln.strip() for ln in read_text(p).splitlines()]
        listed = [ln for ln in lines if ln and not ln.startswith("#")]
        if urls := [ln for ln in listed if is_url(ln)]:
            raise UserError(
                f"infer.input={spec!r} lists {len(urls)} URL(s) ({urls[0]!r}): {URL_FIX}."
            )
        files = [listed_path(base, ln) for ln in listed]
    elif p.is_file() and p.suffix.lower() == ".csv":
        files = listed_files(p, file_column)
    elif p.is_file() and (hint := archive_hint(spec)):
        raise UserError(f"infer.input={spec!r} is not an image.{hint}")
    elif p.is_file():
        files = [p]
    elif glob.has_magic(spec):
        files = sorted(
            Path(f)
            for f in glob.glob(os.path.expanduser(spec), recursive=True)
            if not Path(f).is_dir()
        )
    else:
        files = []
    if not files:
        raise UserError(
            f"infer.input={spec!r} matches no image files (give a file, a folder of images, a glob "
            "or a .txt or .csv list)."
            + (f" It is a URL: {URL_FIX}." if is_url(spec) else archive_hint(spec))
        )
    return files if p.is_dir() else outside(files, *own)


def outside(paths: list[Path], setting: str, folder: str | None) -> list[Path]:
    """`paths` less the files under `folder`, this command's own output (`infer.sort_into`,
    `explain.output`) when it lies inside the input: a second run would read its own copies."""
    if not folder:
        return paths
    where = os.path.abspath(os.path.expanduser(folder))
    kept = [p for p in paths if not os.path.abspath(p).startswith(where + os.sep)]
    if len(kept) < len(paths):
        print(
            f"Leaving out {len(paths) - len(kept)} file(s) under {setting}={folder}: this "
            "command's own output, inside the input.",
            file=sys.stderr,
        )
    if paths and not kept:
        raise UserError(f"Every input file lies under {setting}={folder}: nothing else to read.")
    return kept


def check_floor(meta, c) -> list[str]:
    """The model's classes, once infer.min_confidence is known to suit it (before predicting)."""
    if c.get("min_confidence") is not None and meta.multi_label:
        raise UserError(
            f"infer.min_confidence={c.min_confidence} is for single-label models; this "
            "multi-label one decides each label by its threshold: set infer.threshold instead."
        )
    return meta.classes


def mark_uncertain(rows: list[dict], floor: float | None) -> None:
    """infer.min_confidence: each answered row gets `uncertain`, whether its confidence is below
    the floor (its predicted_class stays: the row says what the model thought)."""
    if floor is None:
        return
    for r in rows:
        if not r.get("error"):
            r["uncertain"] = r["confidence"] < floor


def _csv_text(rows: list[dict], classes: list[str]) -> str:
    """path, predicted_class, confidence, then one probability column per class in the model's
    order (`prob_<class>`; empty where infer.top_k left the class out, or the image failed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with_errors = any(r.get("error") for r in rows)
    multi = any("predicted_labels" in r for r in rows)  # multi-label: ';'-joined labels
    floor = any("uncertain" in r for r in rows)  # infer.min_confidence: true or false
    w.writerow(
        ["path", "predicted_class", "confidence"]
        + (["predicted_labels"] if multi else [])
        + (["uncertain"] if floor else [])
        + [f"prob_{name}" for name in classes]
        + (["error"] if with_errors else [])
    )
    for r in rows:
        confidence = "" if r["confidence"] is None else r["confidence"]
        labels = [";".join(r.get("predicted_labels") or [])] if multi else []
        labels += [str(r.get("uncertain", "")).lower()] if floor else []
        probs = [r["all_predictions"].get(name, "") for name in classes]
        errors = [r.get("error") or ""] if with_errors else []
        w.writerow([r["path"], r["predicted_class"] or "", confidence, *labels, *probs, *errors])
    return buf.getvalue()


def _json_text(rows: list[dict], classes: list[str]) -> str:
    return json.dumps(rows[0] if len(rows) == 1 else rows, indent=2, ensure_ascii=False) + "\n"


# infer.output: file suffix -> writer (stdout, with no output, is JSON)
WRITERS = {".json": _json_text, ".csv": _csv_text}


def write_rows(rows: list[dict], output: str | None, classes: list[str]) -> str:
    """JSON (one object for one image, else a list) or CSV; stdout when output is None.
    `classes`: the model's, in its order (the CSV's probability columns)."""
    suffix = Path(output).suffix.lower() if output else ".json"
    if suffix not in WRITERS:
        raise UserError(
            f"infer.output={output!r}: use a file name ending in {' or '.join(WRITERS)} (or leave "
            "it unset for stdout)."
        )
    text = WRITERS[suffix](rows, classes)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    else:
        sys.stdout.write(text)
    return text


def run_infer(cfg, model: Path | None = None, registered: dict | None = None) -> dict:
    """`model`: the file infer.model names, as commands.py resolves it (`runs.model_location`:
    a path, a registered model with its registry info in `registered`, or the newest export); a
    library caller may leave it to infer.model when that is a file's path."""
    started = time.perf_counter()
    c = cfg.infer
    own = ("infer.sort_into", c.get("sort_into"))
    paths = collect_inputs(c.input, c.get("file_column"), own)  # bad input fails before loading
    model = given_model(model, c.get("model"), "infer.model")
    if c.engine == "ray":
        from image_classifier.inference.ray_engine import predict_on_ray

        meta = load_predictor(model, device="cpu", threads=1).meta
        classes = check_floor(meta, c)
        rows, backend = predict_on_ray(cfg, paths, model)
        loading = 0.0  # the workers load it as they start: part of their time
    else:
        before = time.perf_counter()  # the inputs' listing is not the model's loading
        predictor = load_predictor(model, device=c.device)
        loading = time.perf_counter() - before
        check_floor(meta := predictor.meta, c)
        try:
            rows = predict_paths(
                predictor,
                paths,
                batch_size=int(c.batch_size),
                top_k=c.get("top_k"),
                threshold=c.get("threshold"),
            )
        except Interrupted as e:
            mark_uncertain(e.done, c.get("min_confidence"))
            raise _saved(e.done, len(paths), c.get("output"), predictor.meta.classes) from None
        backend, classes = predictor.backend, predictor.meta.classes
    if rows is not None:  # None: the engine wrote them where infer.output says
        mark_uncertain(rows, c.get("min_confidence"))
        write_rows(rows, c.get("output"), classes)
    sorted_n = sort_into(rows, Path(c.sort_into), c.sort_mode, classes) if c.get("sort_into") else 0
    seconds = time.perf_counter() - started
    name = f"{c.model}, version {registered['version']}" if registered else model.name
    name = name if c.get("model") else f"the newest, {model}"  # which run's, when found
    _summary(c, rows, len(paths), f"{backend} ({name})", (seconds, loading), sorted_n)
    for line in (
        folder_agreement(rows or [], classes, str(c.input), model),
        colour_note(paths, meta),
    ):
        if line:
            print(line, file=sys.stderr)
    none_read(rows, c.get("output"))
    return {"rows": rows, "seconds": seconds, "images": len(paths)}


def none_read(rows: list[dict] | None, output: str | None) -> None:
    """Not one input could be read (each row holds its reason, written already): exit 2, as for
    any bad input, so that a script sees it; one readable image is a run that did its work."""
    if rows and all(r.get("error") for r in rows):
        where = f"written to {output}" if output else "printed above"
        raise UserError(
            f"None of the {len(rows)} input(s) could be read as an image; each row, {where}, "
            "holds its reason. Give image files (infer.input: a file, folder, glob or list)."
        )


def _saved(rows: list[dict], n: int, output: str | None, classes: list[str]) -> Interrupted:
    """Ctrl-C part-way: the rows finished so far are written where infer.output says."""
    if rows:
        write_rows(rows, output, classes)
    where = f"written to {output}" if output else "printed above"
    return Interrupted(
        f"infer interrupted after {len(rows)} of {n} image(s); "
        + (f"their rows are {where}." if rows else "no rows were finished.")
    )


def _summary(c, rows: list[dict] | None, n: int, backend: str, times: tuple, sorted_n: int):
    """One line on stderr: how many, with what, how fast, where the outputs went. `times`: the
    whole command's seconds and those of loading the model, said apart (3 images had read
    "0.3 img/s": 10 s of loading a checkpoint, then 7 img/s)."""
    errors = [r for r in rows or [] if r.get("error")]
    done = f"{n - len(errors)} of {n}" if rows is not None else f"{n}"
    floor = c.get("min_confidence") is not None and rows is not None
    unsure = sum(bool(r.get("uncertain")) for r in rows) if floor else None
    seconds, loading = times
    rate = n / max(seconds - loading, 1e-9)
    speed = f"{rate:,.{1 if rate < 10 else 0}f} img/s"
    print(
        f"Predicted {done} image(s) with {backend} in {seconds:.2f}s "
        + (f"({loading:.1f} s loading the model, then {speed})" if loading else f"({speed})")
        + (f"; {len(errors)} unreadable (see their 'error' field)" if errors else "")
        + (f"; written to {c.output}" if c.get("output") else "")
        + (f"; {unsure:,} uncertain (below {c.min_confidence})" if unsure is not None else "")
        + (f"; {sorted_n} {c.sort_mode} into {c.sort_into}/<class>/" if c.get("sort_into") else "")
        + (" and _uncertain/" if c.get("sort_into") and unsure else ""),
        file=sys.stderr,
    )
    answered = [r for r in rows or [] if not r.get("error")]
    if len(answered) > 1:  # what a folder came out as, most predicted first
        counts = Counter(
            c for r in answered for c in r.get("predicted_labels", [r["predicted_class"]])
        )
        top = ", ".join(f"{shown(c)} {k:,}" for c, k in counts.most_common(10))
        more = f", and {len(counts) - 10} more classes" if len(counts) > 10 else ""
        what = "labels" if "predicted_labels" in answered[0] else "classes"
        print(f"  predicted {what}: {top}{more}", file=sys.stderr)
    for r in errors[:20]:
        print(f"  {r['path']}: {r['error']}", file=sys.stderr)


def colour_note(paths: list[Path], meta) -> str:
    """A model trained on grey images sees colour ones in grey: when most of a sample of the
    inputs show colour, a warning ('' otherwise, and for colour models). A Fashion-MNIST model
    answered 'Bag' at 0.77-0.98 for every drawn colour shape (the tour: train, then infer)."""
    if meta.preprocessing.channels != 1 or 2 * (colour := colour_sample(paths))[0] <= colour[1]:
        return ""
    return (
        f"  WARNING: {colour[0]} of {colour[1]} sampled images are in colour, and {meta.name} was "
        "trained on grey images: it sees them in grey, and its predictions on images unlike its "
        "training images may mean little. A model for them: uv run python commands.py "
        "command=train data=folder data.root=FOLDER (class folders of images like these)"
    )


def folder_class(path: str, classes: list[str], given: str) -> str | None:
    """The class a file's folder names, read as train reads class folders: the first folder from
    infer.input down that is a class name (cat/batch2/x.jpg is a cat), else None."""
    folder = os.path.abspath(Path(path).parent)
    root = os.path.abspath(Path(given).expanduser())
    rel = os.path.relpath(folder, root) if folder.startswith(root + os.sep) else ""
    parts = (Path(root).name, *Path(rel).parts) if rel else (Path(folder).name,)
    return next((part for part in parts if part in classes), None)


def folder_agreement(rows: list[dict], classes: list[str], given: str, model: Path) -> str:
    """When most images sit in folders named after the model's classes (a labelled folder run
    through infer), how often the prediction is the folder's name, and the command that tests
    the model on them properly; '' otherwise (and for multi-label models)."""
    answered = [r for r in rows if not r.get("error")]
    folder = {r["path"]: folder_class(r["path"], classes, given) for r in answered}
    named = [r for r in answered if folder[r["path"]]]
    if len(named) < 2 or 2 * len(named) < len(rows) or "predicted_labels" in named[0]:
        return ""
    same = sum(folder[r["path"]] == r["predicted_class"] for r in named)
    other = sorted({Path(r["path"]).parent.name for r in answered if not folder[r["path"]]})
    line = (
        f"  in folders named after a class: {len(named):,} images, {same:,} "
        f"({100 * same / len(named):.1f} %) predicted as their folder"
    )
    if other:
        line += f"; {len(answered) - len(named):,} in folders of no class ({listed(other)})"
    elif (root := Path(given).expanduser()).name not in classes and any(
        (root / name).is_dir() for name in classes
    ):  # given holds the class folders, as data.root would
        line += (
            "; the full report on them: uv run python commands.py command=test "
            f"{override('test.checkpoint', model)} data=folder {override('data.root', given)} "
            "data.split=[0,0,1]"
        )
    return line
