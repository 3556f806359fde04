"""`command=infer infer.engine=ray`: the rows of `infer`, computed by a pool of Ray actors.

The driver lists the input exactly as `infer` does (a file, a folder, a glob or a .txt list) into
a Ray Data dataset of paths. `map_batches` hands batches of `infer.batch_size` paths to
`infer.workers` actors, each holding one ONNX Runtime session of the model file, which travels
through Ray's object store: the nodes need to see the images, not the model. Each actor reads
and decodes its own files on the node it runs on, with the same per-file reasons as `infer`.
Rows come back in the input's order (CSV, JSON), or stay on the cluster and are written as a
folder of Parquet files (`infer.output=NAME.parquet`) when they are too many for one process.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from image_classifier import cluster
from image_classifier.data.images import display_name, path_problem
from image_classifier.errors import UserError
from image_classifier.inference.predictor import load_predictor
from image_classifier.inference.rows import error_row, predict_batch

ENGINES = ("local", "ray")  # infer.engine
PARQUET = ".parquet"  # infer.output suffix that only the Ray engine writes
# Parquet columns beside the index and the whole row (as JSON)
COLUMNS = {
    "path": "string",
    "predicted_class": "string",
    "confidence": "float64",
    "error": "string",
}


class Predict:
    """One Ray actor: the model loaded once, then `__call__` per batch of paths."""

    def __init__(self, model: bytes, device: str, threads: int, top_k, threshold):
        import tempfile

        fd, name = tempfile.mkstemp(suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        try:
            self.predictor = load_predictor(name, device, threads=threads)
        finally:
            os.unlink(name)
        self.top_k = top_k
        self.thresholds = self.predictor.meta.thresholds(threshold)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))  # file reading and decoding

    def __call__(self, batch: dict) -> dict:
        paths = [Path(p) for p in batch["path"]]
        rows = predict_batch(
            self.predictor, paths, list(batch["name"]), self.pool, self.top_k, self.thresholds
        )
        return {"index": batch["index"], "row": [json.dumps(r, ensure_ascii=False) for r in rows]}


def unseen_paths(ray, paths: list[str]) -> list[tuple[str, str]]:
    """(node address, path) for each of `paths` that a worker on some alive node cannot see."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(ps: list[str]) -> list[str]:
        return [p for p in ps if not os.path.lexists(p)]

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    answers = ray.get(
        [
            missing.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(paths)
            for n in nodes
        ]
    )
    return [(n["NodeManagerAddress"], p) for n, ps in zip(nodes, answers, strict=True) for p in ps]


def check_visible(ray, items: list[dict], setting: str) -> None:
    """UserError with the fix when a worker node cannot see some of `items` (paths this machine
    sees): the first, middle and last are asked on every alive node."""
    sample = [items[i]["path"] for i in sorted({0, len(items) // 2, len(items) - 1})]
    if unseen := unseen_paths(ray, sample):
        node, path = unseen[0]
        raise UserError(
            f"{setting}: the Ray worker on node {node} cannot see {path!r}, which this machine "
            f"can. Put the images where every node mounts them at the same path (a shared or "
            f"network file system), or run on this machine with infer.engine=local."
        )


def _workers(ray, c) -> int:
    if c.get("workers"):
        return int(c.workers)
    return max(1, int(ray.cluster_resources().get("CPU", 1) // float(c.cpus_per_worker)))


def predict_on_ray(cfg, paths: list[Path], model: Path) -> tuple[list[dict] | None, str]:
    """(rows in input order, or None when written as Parquet; what ran them)."""
    c = cfg.infer
    if model.suffix.lower() != ".onnx":
        raise UserError(
            f"infer.engine=ray runs ONNX models; {model.name!r} is not one. Export it with "
            "`uv run python commands.py command=export-onnx` and pass the .onnx file."
        )
    # Arrow holds UTF-8 only: a name that is not stays here, with the reason `infer` gives it
    names = [display_name(p) for p in paths]
    local = {
        i: error_row(n, path_problem(p))
        for i, (p, n) in enumerate(zip(paths, names, strict=True))
        if n != str(p)
    }
    items = [
        {"index": i, "path": os.path.abspath(p), "name": n}
        for i, (p, n) in enumerate(zip(paths, names, strict=True))
        if i not in local
    ]
    ray = cluster.connect(c.get("address"), "infer.address")
    try:
        # a listed file missing here too is a row with its reason, not a cluster problem
        seen_here = [it for it in items if os.path.lexists(it["path"])]
        if seen_here:
            check_visible(ray, seen_here, "infer.input")
        workers = _workers(ray, c)
        rows = _run(ray, c, items, model, workers, local)
    finally:
        ray.shutdown()
    return rows, f"onnxruntime in {workers} Ray actor(s)"


def _run(ray, c, items: list[dict], model: Path, workers: int, local: dict) -> list[dict] | None:
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its bar stays; its notes go
    threads = max(1, int(c.cpus_per_worker))
    batch = int(c.batch_size)
    blocks = _blocks(len(items), batch, workers)
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        Predict,
        fn_constructor_kwargs={
            "model": model.read_bytes(),
            "device": c.device,
            "threads": threads,
            "top_k": c.get("top_k"),
            "threshold": c.get("threshold"),
        },
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=float(c.cpus_per_worker),
        num_gpus=1 if c.device == "cuda" else 0,
    )
    output = c.get("output")
    if output and Path(output).suffix.lower() == PARQUET:
        here = [{"index": i, "row": json.dumps(r, ensure_ascii=False)} for i, r in local.items()]
        if here:
            ds = ds.union(ray.data.from_items(here))
        ds.map_batches(_columns, batch_format="numpy").write_parquet(str(Path(output).resolve()))
        return None
    rows = dict(local)
    for r in ds.take_all():
        rows[int(r["index"])] = json.loads(r["row"])
    return [rows[i] for i in range(len(rows))]


def _blocks(n: int, batch: int, workers: int) -> int:
    """How many blocks Ray Data cuts n inputs into: several batches each (Ray's default of 200
    small blocks cost a third of the time), and at least one per actor (180 images in one block
    left the second actor idle, and Ray warned of it)."""
    blocks = max(1, min(n // (4 * batch), max(4 * workers, n // (64 * batch))))
    return max(blocks, min(workers, n))


def _columns(batch: dict):
    """Parquet's columns, typed the same in every file: the input's index, the row's flat
    fields, and the whole row as JSON."""
    import pyarrow as pa

    rows = [json.loads(r) for r in batch["row"]]
    columns = {
        "index": pa.array(batch["index"], pa.int64()),
        **{k: pa.array([r.get(k) for r in rows], kind) for k, kind in COLUMNS.items()},
        "row": pa.array(batch["row"], pa.string()),
    }
    return pa.table(columns)
