"""GPU targets of fast training: the default job and `experiment=fmnist_fast` on one CUDA GPU.

    uv run python scripts/benchmark_gpu.py            # both jobs, then `test` with and without TTA

For each job: `command=train` on the GPU (bf16-mixed and on-device batches are the defaults
there), timed by the run itself (seconds of training), then `command=test` without TTA, with
`test.tta=hflip` and with `test.tta=hflip+shift`. GPU utilisation is sampled every 200 ms with
`nvidia-smi` while training runs; the mean and median are printed. Targets: fmnist_fast >= 94 %
test accuracy in <= 10 s of training, the default job under 10 s. Exits with a message where
there is no GPU.
"""

from __future__ import annotations

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
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    history = next(v for k, v in ckpt["callbacks"].items() if k.startswith("History"))
    return float(history["epochs"][-1]["seconds"])


def main() -> None:
    import torch

    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        sys.exit("No CUDA GPU (or no nvidia-smi) here: the GPU targets cannot be measured.")
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name, overrides in JOBS.items():
            out = Path(tmp) / name
            common = [f"paths.output_dir={out}", "trainer.enable_progress_bar=false"]
            with Utilisation() as util:
                trained = run("command=train", "trainer.accelerator=gpu", *overrides, *common)
            total = float(re.search(r"Trained \d+ epoch\(s\) in (\d+)s", trained).group(1))
            seconds = training_seconds(out / "checkpoints" / "last.ckpt")
            ckpt = out / "checkpoints" / "best.ckpt"
            accuracy = {}
            for tta in ("false", "hflip", "hflip+shift"):
                tested = run(
                    "command=test",
                    f"test.checkpoint={ckpt}",
                    f"test.tta={tta}",
                    f"paths.output_dir={out}/test-{tta}",
                    "trainer.enable_progress_bar=false",
                    "logger.enabled=false",
                )
                report = re.search(r"report: (\S+)", tested).group(1)
                accuracy[tta] = json.loads(Path(report).read_text())["accuracy"]
            print(
                f"{name}: {seconds:.1f} s of training ({total:.0f} s for the whole command, "
                f"data and calibration included); test accuracy {accuracy['false']:.4f}, "
                f"with hflip TTA {accuracy['hflip']:.4f}, with hflip+shift TTA "
                f"{accuracy['hflip+shift']:.4f}; GPU utilisation while training: "
                f"{util.summary()}"
            )
            print("  " + next(x for x in trained.splitlines() if x.strip().startswith("data:")))


if __name__ == "__main__":
    main()
