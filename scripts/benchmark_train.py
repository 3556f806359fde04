"""Training benchmark: the project's `train` vs a plain PyTorch loop; the default job end to end.

    uv run python scripts/benchmark_train.py            # both parts (about 10 minutes on 2 cores)
    uv run python scripts/benchmark_train.py --quick    # throughput ratio only (about 2 minutes)

Part 1 measures training throughput (images/s) of `run_train` against a hand-written loop over
in-memory tensors: same model, batch size, optimizer and thread count, augmentation off in both,
alternating rounds so both see the same machine load; it prints the median ratio.
Part 2 runs `command=train` then `command=test` with default settings in a fresh project root
(so the data is downloaded again), and prints the wall time and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def throughput(rounds: int, steps: int, warmup: int) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from image_classifier.data.datamodule import ImageDataModule
    from image_classifier.models.factory import Normalized, create_model
    from image_classifier.training.train import run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    base = [
        f"paths.root={ROOT}",
        "train.augment.hflip=false",
        "train.augment.shift=0",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "train.epochs=1",
        f"trainer.limit_train_batches={steps}",
        "logger.enabled=false",
    ]
    cfg = compose(*base, f"paths.output_dir={tmp}/probe")
    bs, threads = int(cfg.train.batch_size), torch.get_num_threads()

    class Timer(Callback):
        def __init__(self):
            self.t0 = self.n = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.t0 is not None:
                self.n += len(batch[1])
                self.rate = self.n / (time.perf_counter() - self.t0)

    def project_round(i):
        timer = Timer()
        run_train(compose(*base, f"paths.output_dir={tmp}/r{i}"), callbacks=[timer])
        return timer.rate

    dm = ImageDataModule(cfg.data, batch_size=bs, project_root=ROOT)
    info = dm.prepare()
    images, labels = dm.dataset("train").images, dm.dataset("train").labels

    def plain_round(i):
        L.seed_everything(i, verbose=False)
        spec = dict(cfg.model)
        net = Normalized(
            create_model(spec.pop("name"), num_classes=len(info.classes), in_chans=1, **spec),
            info.preprocessing.mean,
            info.preprocessing.std,
        )
        net = net.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(
            net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        perm = torch.randperm(len(labels))
        n, t0 = 0, None
        for step in range(steps):
            if step == warmup:
                t0, n = time.perf_counter(), 0
            idx = perm[step * bs : (step + 1) * bs]
            x, y = images[idx].contiguous(memory_format=torch.channels_last), labels[idx]
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        return n / (time.perf_counter() - t0)

    plain, project = [], []
    for i in range(rounds):
        plain.append(plain_round(i))
        project.append(project_round(i))
        print(
            f"  round {i + 1}: plain loop {plain[-1]:.0f} img/s, project train {project[-1]:.0f} "
            "img/s"
        )
    ratio = statistics.median(p / q for p, q in zip(project, plain, strict=True))
    print(
        f"Throughput (model={cfg.model.name}, batch {bs}, {threads} threads, {steps - warmup} "
        "timed steps "
        f"x {rounds} rounds): plain loop {statistics.median(plain):.0f} img/s, project train "
        f"{statistics.median(project):.0f} img/s, ratio {ratio:.3f} (target >= 0.9)"
    )


def end_to_end() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as root:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        cmds = [["command=train", "trainer.enable_progress_bar=false"], ["command=test"]]
        out = ""
        for args in cmds:
            p = subprocess.run(
                [sys.executable, str(ROOT / "commands.py"), *args, f"paths.root={root}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            out += p.stdout
            if p.returncode != 0:
                sys.exit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
        wall = time.perf_counter() - t0
        report = json.loads(Path(re.search(r"report: (\S+)", out).group(1)).read_text())
        print(out)
        print(
            f"Default job from an empty project root (download + train + test): {wall:.0f} s wall, "
            f"test accuracy {report['accuracy']:.4f}, macro F1 {report['f1_macro']:.4f} "
            "(target >= 0.92 within 600 s)"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="throughput ratio only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    throughput(args.rounds, args.steps, args.warmup)
    if not args.quick:
        end_to_end()
