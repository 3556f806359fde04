"""Started by tests/test_scale.py under `torchrun`, once per node: the training command's own code
(`run_train`, what `command=train` runs) with a callback that records which images this rank
trained on and a digest of its weights at the end, into $PROBE_DIR/rank<global rank>.json."""

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

from image_classifier.config import compose_config
from image_classifier.training.train import run_train


class Probe(L.Callback):
    def __init__(self):
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        for image in batch[0]:
            self.seen.append(
                hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=8).hexdigest()
            )

    def on_train_end(self, trainer, module):
        weights = torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])
        out = Path(os.environ["PROBE_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(
            json.dumps(
                {
                    "seen": self.seen,
                    "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
                    "world_size": trainer.world_size,
                    "node_rank": trainer.node_rank,
                }
            )
        )


if __name__ == "__main__":
    run_train(compose_config(*sys.argv[1:]), callbacks=[Probe()])
