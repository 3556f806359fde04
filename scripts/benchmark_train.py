"""Training benchmark: the project's `train` vs a plain PyTorch loop; the default job end to end.

    uv run python scripts/benchmark_train.py            # both parts (about 10 minutes on 2 cores)
    uv run python scripts/benchmark_train.py --quick    # throughput ratio only (about 2 minutes)
    uv run python scripts/benchmark_train.py --memory   # train.keep_freed_memory on vs off
    uv run python scripts/benchmark_train.py --optimizer  # train.optimizer adamw vs muon

Part 1 measures training throughput (images/s) of `run_train` against a hand-written loop over
in-memory tensors: same model, batch size, optimizer and thread count, augmentation off in both,
alternating rounds so both see the same machine load; it prints the median ratio.
Part 2 runs `command=train` then `command=test` with default settings in a fresh project root
(so the data is downloaded again), and prints the wall time and the test accuracy.
`--memory` compares the project's training throughput with `train.keep_freed_memory` on and off,
each round in a fresh process (the setting lasts for the process), alternating, and prints the
median ratio and the page faults per step. `--optimizer` does the same for AdamW against Muon, after
timing Muon's Newton-Schulz iterations as torch.optim.Muon runs them (bfloat16) against float32.
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

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides):
    """The project's config with these overrides; the CNN unless another network is named (the
    benchmarks build the network themselves, before model=auto would choose it)."""
    from image_classifier.config import compose_config

    named = any(o.startswith("model=") for o in overrides)
    return compose_config(*([] if named else ["model=cnn"]), *overrides)


class Timer(Callback):
    """Lightning callback: images/s and minor page faults per step after `warmup` steps."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.t0, self.n, self.steps = warmup, None, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0, self.n, self.faults0 = time.perf_counter(), 0, _faults()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.n, self.steps = self.n + len(batch[1]), self.steps + 1
            self.rate = self.n / (time.perf_counter() - self.t0)
            self.faults = (_faults() - self.faults0) / self.steps


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_overrides(steps: int, *more: str) -> list[str]:
    return [
        f"paths.root={ROOT}",
        "train.augment.hflip=false",
        "train.augment.shift=0",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "train.epochs=1",
        f"trainer.limit_train_batches={steps}",
        "logger.enabled=false",
        *more,
    ]


def one_round(steps: int, warmup: int, overrides: list[str]) -> None:
    """Run by `compare()` in a fresh process: prints {"rate": img/s, "faults": per step}."""
    from image_classifier.training.train import run_train

    timer = Timer(warmup)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        run_train(compose(*bench_overrides(steps, *overrides), f"paths.output_dir={tmp}"), [timer])
    print(json.dumps({"rate": timer.rate, "faults": timer.faults}))


def alternate(rounds: int, first, second, describe) -> tuple[list, list]:
    """first(i) and second(i) in turns, so both see the same machine load; prints every round."""
    a, b = [], []
    for i in range(rounds):
        a.append(first(i))
        b.append(second(i))
        print(f"  round {i + 1}: {describe(a[-1], b[-1])}")
    return a, b


def compare(key: str, values: tuple[str, str], rounds: int, steps: int, warmup: int) -> None:
    """The project's training throughput with `key` set to each of two values, each round in a
    fresh process (some settings last for the process), alternating."""

    def run(value: str) -> dict:
        cmd = [sys.executable, __file__, "--one-round", f"{key}={value}"]
        args = cmd + ["--steps", str(steps), "--warmup", str(warmup)]
        p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, second = values
    a, b = alternate(
        rounds,
        lambda i: run(first),
        lambda i: run(second),
        lambda x, y: (
            f"{key}={first} {x['rate']:.0f} img/s ({x['faults']:.0f} faults/step), "
            f"{second} {y['rate']:.0f} img/s ({y['faults']:.0f} faults/step)"
        ),
    )
    ratio = statistics.median(y["rate"] / x["rate"] for x, y in zip(a, b, strict=True))
    print(
        f"{key} ({steps - warmup} timed steps x {rounds} rounds): {first} "
        f"{statistics.median(r['rate'] for r in a):.0f} img/s, {second} "
        f"{statistics.median(r['rate'] for r in b):.0f} img/s, ratio {ratio:.3f}; page faults "
        f"per step {statistics.median(r['faults'] for r in a):.0f} vs "
        f"{statistics.median(r['faults'] for r in b):.0f}"
    )


def newton_schulz(rounds: int) -> None:
    """Muon's orthogonalisation for the default CNN's hidden weights: torch.optim.Muon (bfloat16
    iterations, 2-D parameters) against this project's float32 iterations, same matrices."""
    import torch

    from image_classifier.models.factory import create_model
    from image_classifier.models.muon import hidden_weights, orthogonalize

    cfg = compose(f"paths.root={ROOT}")
    spec = dict(cfg.model)
    net = create_model(spec.pop("name"), num_classes=10, in_chans=1, **spec)
    mats = [torch.nn.Parameter(torch.randn(w.shape[0], w[0].numel())) for w in hidden_weights(net)]
    torch_muon = torch.optim.Muon(mats, lr=1e-3, adjust_lr_fn="match_rms_adamw")

    def timed(step) -> float:
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        return (time.perf_counter() - t0) / 20 * 1000

    for m in mats:
        m.grad = torch.randn_like(m)
    a, b = alternate(
        rounds,
        lambda i: timed(torch_muon.step),
        lambda i: timed(lambda: [orthogonalize(m.grad) for m in mats]),
        lambda x, y: f"torch.optim.Muon {x:.1f} ms/step, float32 iterations {y:.1f} ms/step",
    )
    bf16, fp32 = statistics.median(a), statistics.median(b)
    print(
        f"Newton-Schulz for {len(mats)} hidden weights ({torch.get_num_threads()} threads): "
        f"torch.optim.Muon (bfloat16) {bf16:.1f} ms/step, float32 {fp32:.1f} ms/step, "
        f"ratio {bf16 / fp32:.1f}"
    )


def throughput(rounds: int, steps: int, warmup: int) -> None:
    import lightning as L
    import torch

    from image_classifier.data.datamodule import ImageDataModule, train_batch_size
    from image_classifier.models.factory import Normalized, create_model
    from image_classifier.models.optim import create_optimizer
    from image_classifier.training.train import run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    base = bench_overrides(steps)
    cfg = compose(*base, f"paths.output_dir={tmp}/probe")
    bs, threads = train_batch_size(cfg), torch.get_num_threads()

    def project_round(i):
        timer = Timer(warmup)
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
        opt = create_optimizer(list(net.parameters()), dict(cfg.train), net=net.net)
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

    plain, project = alternate(
        rounds,
        plain_round,
        project_round,
        lambda a, b: f"plain loop {a:.0f} img/s, project train {b:.0f} img/s",
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
    ap.add_argument("--memory", action="store_true", help="train.keep_freed_memory on vs off")
    ap.add_argument("--optimizer", action="store_true", help="train.optimizer adamw vs muon")
    ap.add_argument("--one-round", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    if args.one_round is not None:
        sys.exit(one_round(args.steps, args.warmup, args.one_round))
    if args.memory:
        values = ("false", "true")
        sys.exit(compare("train.keep_freed_memory", values, args.rounds, args.steps, args.warmup))
    if args.optimizer:
        newton_schulz(args.rounds)
        values = ("adamw", "muon")
        sys.exit(compare("train.optimizer", values, args.rounds, args.steps, args.warmup))
    throughput(args.rounds, args.steps, args.warmup)
    if not args.quick:
        end_to_end()
