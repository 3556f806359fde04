"""Feature-cache benchmark on Fashion-MNIST: head on cached features vs fine-tuning the backbone.

    uv run python scripts/benchmark_features.py                    # about 15 minutes on 2 cores
    uv run python scripts/benchmark_features.py --size 96 --head-epochs 30

In one run, in a fresh project root (paths.root), with the packaged EfficientNet-Lite0 backbone at
--size pixels:
1. the one-off cache build (all 70,000 images through the frozen backbone);
2. head training on the cache (`model=head`) for --head-epochs, then `test`;
3. fine-tuning the same pretrained backbone end to end (`model=efficientnet_lite0`) for the same
   total wall budget as 1 + 2 (Lightning's max_time), then `test`;
and prints the time per epoch of each (the fine-tuning epoch measured over its timed steps and
scaled to a full epoch), their ratio (target >= 20x), and both test accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides):
    """The project's config with these overrides; the CNN unless another network is named (the
    benchmarks build the network themselves, before model=auto would choose it)."""
    from image_classifier.config import compose_config

    named = any(o.startswith("model=") for o in overrides)
    return compose_config(*([] if named else ["model=cnn"]), *overrides)


def main():
    from lightning.pytorch.callbacks import Callback

    from image_classifier.training.evaluate import run_test
    from image_classifier.training.features import build_cache
    from image_classifier.training.train import run_train

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--head-epochs", type=int, default=20)
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    (root / "data").symlink_to(ROOT / "data")  # the Fashion-MNIST files already downloaded
    s = args.size
    common = [
        f"paths.root={root}",
        f"features.size=[{s},{s}]",
        "trainer.enable_progress_bar=false",
        "logger.enabled=false",
    ]

    class EpochTimer(Callback):
        def __init__(self):
            self.times, self.steps, self.t0 = [], 0, None

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.steps += 1
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    cache = build_cache(compose(*common))
    build_s = time.perf_counter() - t0
    steps_per_epoch = -(-cache["manifest"]["counts"]["train"] // 128)

    head_timer = EpochTimer()
    t1 = time.perf_counter()
    head = run_train(
        compose(
            *common,
            "model=head",
            f"train.epochs={args.head_epochs}",
            "train.early_stopping=0",
            f"paths.output_dir={root}/head",
        ),
        callbacks=[head_timer],
    )
    head_train_s = time.perf_counter() - t1
    head_test = run_test(
        compose(
            *common, f"test.checkpoint={head['checkpoint']}", f"paths.output_dir={root}/head_test"
        )
    )
    budget = build_s + head_train_s

    ft_timer = EpochTimer()
    h, rem = divmod(int(budget), 3600)
    m, sec = divmod(rem, 60)
    ft = run_train(
        compose(
            *common,
            "model=efficientnet_lite0",
            f"data.size=[{s},{s}]",
            "data.channels=3",
            "train.epochs=100",
            "train.scheduler=cosine",
            "train.lr=1e-3",
            "train.early_stopping=0",
            f"trainer.max_time=00:{h:02d}:{m:02d}:{sec:02d}",
            "trainer.val_check_interval=0.25",
            f"paths.output_dir={root}/ft",
        ),
        callbacks=[ft_timer],
    )
    ft_test = run_test(
        compose(*common, f"test.checkpoint={ft['checkpoint']}", f"paths.output_dir={root}/ft_test")
    )
    ft_epoch_s = (
        (ft_timer.last - ft_timer.t0) / max(1, ft_timer.steps) * steps_per_epoch
        if ft_timer.t0
        else float("nan")
    )
    head_epoch_s = sum(head_timer.times) / len(head_timer.times)

    print(
        json.dumps(
            {"size": s, "build_s": build_s, "head_epoch_s": head_epoch_s, "ft_epoch_s": ft_epoch_s},
            indent=1,
        )
    )
    print(f"\nFashion-MNIST, packaged EfficientNet-Lite0 at {s}x{s}, 2-core CPU:")
    print("| what | figure |")
    print("| --- | --- |")
    print(f"| cache build, 70,000 images, one-off | {build_s:.0f} s |")
    print(f"| head epoch on the cache (55,000 features) | {head_epoch_s:.2f} s |")
    print(
        f"| fine-tuning epoch of the same backbone (from {ft_timer.steps} timed steps) | "
        f"{ft_epoch_s:.0f} s |"
    )
    print(f"| ratio (target >= 20x) | {ft_epoch_s / head_epoch_s:.0f}x |")
    print(
        f"| test accuracy, cache + {args.head_epochs} head epochs ({budget:.0f} s in all) | "
        f"{head_test['accuracy']:.4f} |"
    )
    print(f"| test accuracy, fine-tuning for the same {budget:.0f} s | {ft_test['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
