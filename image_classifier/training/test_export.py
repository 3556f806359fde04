"""`command=test` on an exported model (`test.checkpoint=best.onnx`, a TensorRT engine, or a
registered model `models:/NAME@ALIAS`): the test split scored by the backend that serves it, with
a checkpoint's report, less what only training keeps (the loss, the curves, the ECE without the
temperature). The export carries its training data config (since 2026-12-04), so the same split
is tested; another `data...` on the command line tests that instead, as for a checkpoint."""

from __future__ import annotations

import time

import numpy as np
import torch
from lightning.fabric.utilities.data import AttributeDict

from image_classifier import lineage, runs, tracking
from image_classifier.data.identity import check_test_split, data_mismatch
from image_classifier.errors import Interrupted, UserError
from image_classifier.inference.predictor import load_predictor
from image_classifier.models.metrics import metric_set
from image_classifier.models.multilabel import decide
from image_classifier.training.evaluate import finish, run_test, test_config, test_data


class ExportedModel:
    """What the report code reads from a module after trainer.test, for an exported model."""

    test_ece_raw = None  # the temperature is inside the graph: no ECE without it

    def __init__(self, meta):
        extra, self.multi_label = meta.extra, meta.multi_label
        self.classes, self.tta = list(meta.classes), extra.get("tta")
        self.temperature = float(extra.get("temperature") or 1.0)
        self.hparams = AttributeDict(
            model={
                "name": "export"
            },  # images in, whatever the network (a head's holds its backbone)
            preprocessing=meta.preprocessing.to_dict(),
            data={"hash": extra.get("data_hash"), "name": extra.get("data_name")},
            config={"data": extra["data_config"]} if extra.get("data_config") else {},
        )
        sets = metric_set(len(self.classes), multi_label=self.multi_label)
        self.test_metrics, self.test_ranking = sets["test_metrics"], sets.get("test_ranking")
        self.thresholds = torch.tensor(meta.thresholds() or [], dtype=torch.float32)
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(self, predictor, dataset, batch_size: int) -> None:
        """Probabilities for every test image, batch by batch, with a bar on stderr."""
        from tqdm.auto import tqdm

        n = len(dataset)
        with tqdm(total=n, desc="test", unit="img", disable=n <= 4 * batch_size) as bar:
            for start in range(0, n, batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, n))]
                x = np.stack([np.asarray(image) for image, _ in items])
                y = torch.stack([torch.as_tensor(label) for _, label in items])
                try:
                    probs = torch.from_numpy(np.asarray(predictor.predict(x), dtype=np.float32))
                except KeyboardInterrupt:
                    raise Interrupted("test interrupted before its report was written.") from None
                if self.multi_label:  # as ClassifierModule.test_step: decisions, then rankings
                    self.test_metrics.update(decide(probs, self.thresholds), y.int())
                    self.test_ranking.update(probs, y.int())
                else:
                    self.test_metrics.update(probs, y)
                self.test_outputs.append((probs, y))
                bar.update(len(items))


def run_any_test(cfg, use_checkpoint_data: bool = True, use_checkpoint_tta: bool = False) -> dict:
    """`command=test`: a training checkpoint (training/evaluate.py), or an export (below)."""
    if runs.is_export(cfg.test.get("checkpoint")):  # .onnx, .engine, models:/NAME@ALIAS
        return run_test_export(cfg, use_checkpoint_data)
    return run_test(cfg, use_checkpoint_data, use_checkpoint_tta)


def run_test_export(cfg, use_checkpoint_data: bool = True) -> dict:
    """The export test.checkpoint names, on the test split of its data (or of the data the
    command line names), through the backend that serves it."""
    started = time.perf_counter()
    given = cfg.test.checkpoint
    path, registered = runs.model_location(cfg, given, "test.checkpoint")
    predictor = load_predictor(path)
    if tta := cfg.test.get("tta"):
        raise UserError(
            f"test.tta={str(tta).lower()} applies to a checkpoint; an export's test-time "
            "augmentation is inside its graph (this one's: "
            f"{predictor.meta.extra.get('tta') or 'none'}). Drop test.tta."
        )
    model = ExportedModel(predictor.meta)
    if use_checkpoint_data and not model.hparams.config:
        source = predictor.meta.extra.get("source_checkpoint") or "the checkpoint it came from"
        raise UserError(
            f"test.checkpoint={given} was exported before exports carried their data config: "
            "name the data to test it on (data=folder data.root=PATH; data.split=[0,0,1] tests "
            f"every image), or test {source}."
        )
    cfg = test_config(cfg, model.hparams, use_checkpoint_data)
    out = runs.output_dir(cfg)
    dm, info = test_data(cfg, model, path)
    check_test_split(info, cfg.data.get("split"))
    hash_note = data_mismatch(model.hparams, info, asked=not use_checkpoint_data)
    name = (predictor.meta.extra.get("model") or {}).get("name", "model")
    tags = {"model_file": str(path), **({"registered": str(given)} if registered else {})}
    logger = tracking.create_logger(
        cfg,
        run_name=f"test-{name}-{predictor.backend}",
        tags={**lineage.lineage_tags(cfg.paths.root, info.data_hash), **tags},
    )
    model.score(predictor, dm.dataset("test"), int(cfg.test.batch_size))
    run = {"logger": logger, "train_run": predictor.meta.extra.get("mlflow_run_id")}
    run |= {"started": started, "hash_note": hash_note, "loss": None}
    return finish(cfg, path, model, dm, info, out, run)
