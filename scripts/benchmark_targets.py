"""The fast-training targets, measured end to end on this machine: the default job and
`experiment=fmnist_fast`, each trained by `command=train` and tested by `command=test`.

    uv run python scripts/benchmark_targets.py                      # both jobs, seed 42, CPU or GPU
    uv run python scripts/benchmark_targets.py --seeds 42 1 2       # the spread over seeds
    uv run python scripts/benchmark_targets.py --jobs default --accelerator cpu
    uv run python scripts/benchmark_targets.py --jobs fmnist_fast --train train.time_budget=840

For each job and seed: `command=train` (on the GPU when there is one: bf16-mixed and on-device
batches are the defaults there), timed by the run itself (seconds of training, from its history),
then `command=test` without TTA, with `test.tta=hflip` and with `test.tta=hflip+shift`. It prints
the machine first (CPU model, cores, instructions, GPU), then one line per run with the verdict
against the target for that accelerator, computed from the figures it just measured:

    CPU (2 cores)  default >= 93 % test accuracy in <= 300 s; fmnist_fast >= 94 % in <= 900 s
    GPU            default in <= 10 s; fmnist_fast >= 94 % in <= 10 s

The default job is judged without TTA, fmnist_fast with six views (the test setting its config
names). On a GPU, utilisation is sampled every 200 ms with `nvidia-smi` while training runs.
`--train` adds overrides to every training run; with `train.time_budget`, the seconds judged
include the probe and data setup before the first epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOBS = {"default": [], "fmnist_fast": ["experiment=fmnist_fast"]}
# accelerator -> job -> (minimum test accuracy or None, most seconds of training), from issue 13
TARGETS = {
    "cpu": {"default": (0.93, 300.0), "fmnist_fast": (0.94, 900.0)},
    "gpu": {"default": (None, 10.0), "fmnist_fast": (0.94, 10.0)},
}
JUDGED_TTA = {"default": "false", "fmnist_fast": "hflip+shift"}  # the accuracy a target reads


class Utilisation:
    """nvidia-smi's GPU utilisation (%) sampled in a thread while a job runs."""

    def __enter__(self):
        self.samples: list[int] = []
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.split(",")[0]))

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        mean, median = statistics.mean(self.samples), statistics.median(self.samples)
        return f"mean {mean:.0f} %, median {median:.0f} % ({len(self.samples)} samples)"


def run(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, str(ROOT / "commands.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def training_seconds(last: Path) -> float:
    """Wall seconds of the epochs (validation included), from the run's own history."""
    from image_classifier.models.checkpoint import history

    return float(history(last)[-1]["seconds"])


def verdict(job: str, accelerator: str, accuracy: float, seconds: float) -> str:
    least, most = TARGETS[accelerator][job]
    ok_time = seconds <= most
    ok_acc = least is None or accuracy >= least
    want = (f">= {least:.0%} " if least else "") + f"in <= {most:.0f} s"
    return f"target ({want}) {'met' if ok_time and ok_acc else 'NOT met'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--train", nargs="*", default=[], help="more overrides for command=train")
    args = ap.parse_args()

    import torch

    from image_classifier.lineage import describe_machine, machine_info

    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and (not torch.cuda.is_available() or not shutil.which("nvidia-smi")):
        sys.exit("No CUDA GPU (or no nvidia-smi) here: run with --accelerator cpu.")
    print(f"machine: {describe_machine(machine_info())}; training on the {accelerator}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-targets-") as tmp:
        for name in args.jobs:
            judged = []
            for seed in args.seeds:
                out = Path(tmp) / f"{name}-{seed}"
                common = [f"paths.output_dir={out}", "trainer.enable_progress_bar=false"]
                watch = Utilisation() if accelerator == "gpu" else contextlib.nullcontext()
                with watch as util:
                    trained = run(
                        "command=train",
                        f"trainer.accelerator={accelerator}",
                        f"seed={seed}",
                        *JOBS[name],
                        *args.train,
                        *common,
                    )
                total = float(re.search(r"Trained \d+ epoch\(s\) in (\d+)s", trained).group(1))
                seconds = training_seconds(out / "checkpoints" / "last.ckpt")
                if probe := re.search(r"after ([\d.]+) s of setup and probing", trained):
                    seconds += float(probe.group(1))  # a time budget's probe counts too
                ckpt = out / "checkpoints" / "best.ckpt"
                accuracy = {}
                for tta in ("false", "hflip", "hflip+shift"):
                    tested = run(
                        "command=test",
                        f"test.checkpoint={ckpt}",
                        f"test.tta={tta}",
                        f"trainer.accelerator={accelerator}",
                        f"paths.output_dir={out}/test-{tta}",
                        "trainer.enable_progress_bar=false",
                        "logger.enabled=false",
                    )
                    report = re.search(r"report: (\S+)", tested).group(1)
                    accuracy[tta] = json.loads(Path(report).read_text())["accuracy"]
                judged.append(accuracy[JUDGED_TTA[name]])
                job = " ".join([name, *args.train])
                print(
                    f"{job} seed {seed}: {seconds:.1f} s of training ({total:.0f} s for the whole "
                    f"command, data and calibration included); test accuracy "
                    f"{accuracy['false']:.4f}, with hflip TTA {accuracy['hflip']:.4f}, with "
                    f"hflip+shift TTA {accuracy['hflip+shift']:.4f}; "
                    f"{verdict(name, accelerator, judged[-1], seconds)}"
                    + (
                        f"; GPU utilisation while training: {util.summary()}"
                        if accelerator == "gpu"
                        else ""
                    ),
                    flush=True,
                )
                for line in trained.splitlines():
                    if line.strip().startswith(("data:", "budget:")):
                        print("  " + line.strip(), flush=True)
            if len(judged) > 1:
                print(
                    f"{name}: judged accuracy over {len(judged)} seeds: mean "
                    f"{statistics.mean(judged):.4f}, min {min(judged):.4f}, max {max(judged):.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
