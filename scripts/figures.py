"""Regenerate the headline figures on this machine and write docs/figures.md and README's table.

    uv run python scripts/figures.py            # everything below (44 min on 2-core CPU C)
    uv run python scripts/figures.py --quick    # seed 42 only, without fmnist_fast (about 6 min)
    uv run python scripts/figures.py --render   # rewrite the two pages from docs/figures.json only
    uv run python scripts/figures.py --isa avx2 --only default   # as on a CPU with AVX2 only
    uv run python scripts/figures.py --keep outputs/figures      # keep the runs' checkpoints

Each figure runs the commands exactly as README writes them (`commands.py` under this script's
`uv run` environment), in new processes, one at a time:
- `default`: `command=train seed=S` then `command=test`, seeds 42, 1, 2: best validation accuracy,
  test accuracy (computed once, for the default as it is), seconds of training from the run's own
  history, the precision it used; `calibration`: test ECE before and after its temperature.
- `precision`: on a CPU with bfloat16 instructions, the same seeds trained with
  `trainer.precision=bf16-mixed`, compared with the default on validation only.
- `fmnist_fast`: `command=train experiment=fmnist_fast seed=S` then `command=test` (the six-view
  TTA the recipe sets), seeds 42, 1, 2.
- On a machine with `nvidia-smi`, the GPU's utilisation is sampled while each run trains and its
  mean is reported beside the run's figures.
- `cold_start`: `uv run python commands.py command=infer` on one image with the exported default
  model, median of 5 new processes after one warm-up.
- `choice`, `choice_fast` (only when asked: `--only choice`): the default job's Muon setting and
  `fmnist_fast`'s learning rate, first chosen on test accuracy, re-decided on validation: each
  candidate in CHOICES trained over the seeds, best validation accuracy only (no test), the
  incumbent's taken from this run or from its stored row on this machine; the row's verdict.

`--isa avx2` runs every command with PyTorch's and oneDNN's kernels limited to AVX2
(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): the instructions, kernels and rounding of a
CPU without AVX-512 or bfloat16, not its clock or memory. Its rows are kept beside the native ones
(ids ending in _avx2) and their machine says so.

docs/figures.json keeps every row: what, value, seeds, command, machine, package versions, a
hash of the default training config, and date. A run replaces the rows it measured; the others
stay, and the pages mark each of them with its machine and date when that is not this machine,
and as stale when the packages or the default job changed since it was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "docs" / "figures.json"
PAGE = ROOT / "docs" / "figures.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- figures.py: begin -->", "<!-- figures.py: end -->"
SEEDS = (42, 1, 2)
# --isa: the kernels of a smaller instruction set on this CPU (PyTorch's ATen dispatch, oneDNN)
ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def commands(*args: str) -> str:
    """One command as README writes it, in a new process; its stdout, or exit with its stderr."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "commands.py"), *args], cwd=ROOT, capture_output=True, text=True
    )
    if p.returncode != 0:
        sys.exit(f"commands.py {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


QUIET = ("trainer.enable_progress_bar=false", "logger.enabled=false")


class Utilisation:
    """nvidia-smi's GPU utilisation (%), sampled every 200 ms in a thread while a command runs;
    nothing where there is no nvidia-smi."""

    def __enter__(self):
        self.samples: list[int] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(["nvidia-smi", *query], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            first = line.strip().split(",")[0]
            if first.isdigit():
                self.samples.append(int(first))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def train_and_test(out: Path, *overrides: str, test: bool = True) -> dict:
    """`command=train` (then `command=test` on its best checkpoint): what a figure reads."""
    from image_classifier.models.checkpoint import history

    with Utilisation() as gpu:
        trained = commands("command=train", *overrides, f"paths.output_dir={out}", *QUIET)
    epochs = history(out / "checkpoints" / "last.ckpt")
    run = {
        "val": max(e["val/acc"] for e in epochs),
        "seconds": epochs[-1]["seconds"],
        "precision": re.search(r"precision (\S+)", trained).group(1),
        "gpu": gpu.mean(),
    }
    return {**run, **(tested(out / "checkpoints" / "best.ckpt", out / "t") if test else {})}


def tested(ckpt: Path, out: Path) -> dict:
    """`command=test` on a checkpoint as a user runs it after `train` (a recipe's TTA comes
    from the checkpoint): accuracy, ECE with and without the temperature, the TTA used."""
    printed = commands("command=test", f"test.checkpoint={ckpt}", f"paths.output_dir={out}", *QUIET)
    report = json.loads(Path(re.search(r"report: (\S+)", printed).group(1)).read_text())
    return {
        "test": report["accuracy"],
        "ece": report["ece"],
        "ece_before": report["ece_uncalibrated"],
        "tta": report["tta"],
    }


def per_seed(runs: list[dict], seeds: tuple[int, ...]) -> list[dict]:
    """What each seed's run measured, kept in the row (the page shows the spread)."""
    keys = ("val", "test", "seconds")
    pairs = zip(seeds, runs, strict=True)
    return [{"seed": s, **{k: r[k] for k in keys if k in r}} for s, r in pairs]


def gpu_note(runs: list[dict]) -> str:
    """'; GPU utilisation while training: a / b / c %' (one mean per run), or '' without a GPU."""
    if any(r.get("gpu") is None for r in runs):
        return ""
    return "; GPU utilisation while training: " + " / ".join(f"{r['gpu']:.0f}" for r in runs) + " %"


def spread(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± half the range (lowest–highest)' of values, scaled (accuracies to %)."""
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    half = (max(v) - min(v)) / 2
    low, high = f"{min(v):.{digits}f}", f"{max(v):.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {half:.{digits}f} ({low}–{high})"


DEFAULT_WHAT = (
    "default job on Fashion-MNIST: test accuracy (%), seconds of training (its Muon setting, first "
    "chosen on test on CPU A, is re-decided on validation by the choice row)"
)
# best val/acc of the incumbent of each choice, by (job, seeds): from this run, or from a stored
# row measured on this machine under these packages and this default job
BASELINE_VAL: dict[tuple[str, tuple[int, ...]], list[float]] = {}


def measure_default(tmp: Path, seeds: tuple[int, ...], bf16_cpu: bool) -> list[dict]:
    runs = [train_and_test(tmp / f"default-{s}", f"seed={s}") for s in seeds]
    BASELINE_VAL["default", seeds] = [r["val"] for r in runs]
    for s, r in zip(seeds, runs, strict=True):
        print(f"default seed {s}: {r}", flush=True)
    sec = [r["seconds"] for r in runs]
    cmd = "uv run python commands.py command=train seed=S, then command=test"
    rows = [
        {
            "id": "default",
            "runs": per_seed(runs, seeds),
            "what": DEFAULT_WHAT,
            "value": f"{spread([r['test'] for r in runs])} %; {spread(sec, 1, 0)} s "
            f"(best val {spread([r['val'] for r in runs])} %; precision {runs[0]['precision']}"
            f"{gpu_note(runs)})",
            "command": cmd,
            "target": "≥ 93.0 % in ≤ 300 s (CPU, 2 cores)",
            "met": all(r["test"] >= 0.93 and r["seconds"] <= 300 for r in runs),
        },
        {
            "id": "calibration",
            "what": "default job: test ECE without → with its temperature (15 bins)",
            "value": f"{spread([r['ece_before'] for r in runs], 1, 4)} → "
            f"{spread([r['ece'] for r in runs], 1, 4)}",
            "command": cmd,
        },
    ]
    if bf16_cpu:  # the opt-in precision, compared on validation only
        other = [
            train_and_test(
                tmp / f"bf16-{s}", f"seed={s}", "trainer.precision=bf16-mixed", test=False
            )
            for s in seeds
        ]
        for s, r in zip(seeds, other, strict=True):
            print(f"bf16-mixed seed {s}: {r}", flush=True)
        gain = statistics.mean(r["val"] for r in other) - statistics.mean(r["val"] for r in runs)
        speed = statistics.mean(sec) / statistics.mean(r["seconds"] for r in other)
        rows.append(
            {
                "id": "precision",
                "what": "default job, `trainer.precision=bf16-mixed` against the default "
                "32-true: best val accuracy (%), seconds of training (test not computed)",
                "value": f"bf16-mixed val {spread([r['val'] for r in other])} % in "
                f"{spread([r['seconds'] for r in other], 1, 0)} s; 32-true val "
                f"{spread([r['val'] for r in runs])} %; bf16 {gain * 100:+.2f} points on "
                f"validation, {speed:.2f}× the speed",
                "command": "uv run python commands.py command=train seed=S "
                "[trainer.precision=bf16-mixed]",
            }
        )
    return [dict(r, seeds=", ".join(map(str, seeds))) for r in rows]


# each choice, by its row's id: (the job whose setting it re-decides, what is chosen, candidates
# with the incumbent first); the candidates are the ones it was chosen from on test
CHOICES = {
    "choice": (
        "default",
        "the default job's Muon setting",
        {
            "muon_lr_scale=3, lr 3e-3 (the default)": (),
            "muon_lr_scale=1, lr 3e-3": ("train.muon_lr_scale=1",),
            "muon_lr_scale=1, lr 6e-3": ("train.muon_lr_scale=1", "train.lr=6e-3"),
        },
    ),
    "choice_fast": (
        "fmnist_fast",
        "`experiment=fmnist_fast`'s learning rate at batch 512",
        {
            "lr 1e-2 (the recipe)": ("experiment=fmnist_fast",),
            "lr 6e-3": ("experiment=fmnist_fast", "train.lr=6e-3"),
        },
    ),
}


def measure_choice(tmp: Path, seeds: tuple[int, ...], choice: str = "choice") -> list[dict]:
    """Each candidate of a choice over the seeds, compared on best val/acc only (no test)."""
    job, what, candidates = CHOICES[choice]
    val = {}
    for i, (name, overrides) in enumerate(candidates.items()):
        if i == 0 and (job, seeds) in BASELINE_VAL:
            val[name] = BASELINE_VAL[job, seeds]
            continue
        runs = [
            train_and_test(tmp / f"{choice}{i}-{s}", f"seed={s}", *overrides, test=False)
            for s in seeds
        ]
        print(f"{name}: {runs}", flush=True)
        val[name] = [r["val"] for r in runs]
    each = "; ".join(" ".join(o) or "(no override)" for o in candidates.values())
    row = {
        "id": choice,
        "what": f"{what} re-decided on validation: best val accuracy (%) per candidate, test "
        "not computed",
        "command": f"uv run python commands.py command=train seed=S, with each of: {each}",
    }
    return [{**row, **choice_row(val, seeds)}]


def stored_baselines(store: dict, now: dict) -> None:
    """BASELINE_VAL from stored rows of this machine, packages and default job, with per-seed
    runs: a choice need not train its incumbent again."""
    for row in store["rows"]:
        same = all(row.get(k) == now[k] for k in ("machine", "versions", "default_config"))
        if same and row.get("runs") and row["id"] in ("default", "fmnist_fast"):
            seeds = tuple(r["seed"] for r in row["runs"])
            # this run's own measurement, when it made one, wins over the stored row
            BASELINE_VAL.setdefault((row["id"], seeds), [r["val"] for r in row["runs"]])


def choice_row(val: dict[str, list[float]], seeds: tuple[int, ...]) -> dict:
    """The row of a choice: each candidate's best val/acc over the seeds, and the verdict. The
    first candidate is the incumbent; another replaces it only when its per-seed gains over it
    average more than twice their standard error (a paired comparison): a tie keeps it."""
    names = list(val)
    base = val[names[0]]
    verdict = f"kept: {names[0]} (no candidate ahead by more than twice the standard error)"
    best_gain = 0.0
    for name in names[1:]:
        gains = [a - b for a, b in zip(val[name], base, strict=True)]
        mean = statistics.mean(gains)
        se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("inf")
        if mean > 2 * se and mean > best_gain:
            best_gain, verdict = mean, f"**{name} wins** ({mean * 100:+.2f} points)"
    gains = "; ".join(
        f"{n}: " + " / ".join(f"{(a - b) * 100:+.2f}" for a, b in zip(val[n], base, strict=True))
        for n in names[1:]
    )
    return {
        "value": "; ".join(f"{k}: {spread(v)}" for k, v in val.items())
        + f". Per-seed gains over {names[0]} (points): {gains}. Verdict: {verdict}",
        "seeds": ", ".join(map(str, seeds)),
    }


def measure_fast(tmp: Path, seeds: tuple[int, ...]) -> list[dict]:
    runs = [train_and_test(tmp / f"fast-{s}", "experiment=fmnist_fast", f"seed={s}") for s in seeds]
    BASELINE_VAL["fmnist_fast", seeds] = [r["val"] for r in runs]
    for s, r in zip(seeds, runs, strict=True):
        print(f"fmnist_fast seed {s}: {r}", flush=True)
    return fast_rows(runs, seeds)


def fast_rows(runs: list[dict], seeds: tuple[int, ...]) -> list[dict]:
    seconds, val = spread([r["seconds"] for r in runs], 1, 0), spread([r["val"] for r in runs])
    return [
        {
            "id": "fmnist_fast",
            "runs": per_seed(runs, seeds),
            "what": "`experiment=fmnist_fast`, tested with the TTA it sets: test accuracy (%), "
            "seconds of training (recipe chosen on **test** accuracy on CPU B, 2026-11-24)",
            "value": f"{spread([r['test'] for r in runs])} %; {seconds} s (best val {val} %; "
            f"precision {runs[0]['precision']}; TTA {runs[0]['tta']}{gpu_note(runs)})",
            "seeds": ", ".join(map(str, seeds)),
            "command": "uv run python commands.py command=train experiment=fmnist_fast seed=S, "
            "then command=test",
            "target": "≥ 94.0 % in ≤ 900 s (CPU, 2 cores)",
            "met": all(r["test"] >= 0.94 and r["seconds"] <= 900 for r in runs),
        }
    ]


def measure_cold_start(tmp: Path, rounds: int = 5) -> list[dict]:
    from PIL import Image

    commands("command=export-onnx", f"export.checkpoint={tmp}/default-42/checkpoints/best.ckpt")
    img = tmp / "one.png"
    Image.new("L", (28, 28), 128).save(img)
    uv = os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".uv" / "bin" / "uv")
    line = [
        uv,
        "run",
        "python",
        "commands.py",
        "command=infer",
        f"infer.model={tmp}/default-42/checkpoints/best.onnx",
        f"infer.input={img}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for _ in range(rounds + 1):  # round 0 warms the page cache and writes bytecode
        t0 = time.perf_counter()
        subprocess.run(line, cwd=ROOT, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    t = times[1:]
    return [
        {
            "id": "cold_start",
            "what": "cold start of `infer` on one image (.onnx), wall seconds",
            "value": f"median {statistics.median(t):.2f} s ({min(t):.2f}–{max(t):.2f}, "
            f"{rounds} runs)",
            "seeds": "",
            "command": "uv run python commands.py command=infer infer.model=M.onnx "
            "infer.input=one.png",
            "target": "≤ 2 s",
            "met": statistics.median(t) <= 2.0,
        }
    ]


def context() -> dict:
    """What a figure depends on besides the code: machine, package versions, the default job."""
    from omegaconf import OmegaConf

    from image_classifier import lineage
    from image_classifier.config import compose_config

    cfg = OmegaConf.to_container(compose_config("command=train", root=ROOT), resolve=False)
    # what no figure here reads (the audit's settings: its rows are measured by
    # benchmark_datasets.py and say so)
    for volatile in ("paths", "hydra", "command", "seed", "logger", "audit"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "machine": lineage.describe_machine(lineage.machine_info()),
        "versions": {k.removeprefix("version."): v for k, v in lineage.package_versions().items()},
        "default_config": digest[:12],
        "date": datetime.date.today().isoformat(),
    }


def status(row: dict, now: dict) -> str:
    """How a stored row stands against this machine, these packages and this default job."""
    notes = []
    if row.get("machine") != now["machine"]:
        where = row.get("machine_label") or row.get("machine")
        notes.append(f"not re-run on this machine (measured on {where}, {row['date']})")
    versions = row.get("versions")
    if not versions:
        notes.append("package versions not recorded")
    else:
        changed = [
            f"{k} {v} → {now['versions'].get(k)}"
            for k, v in versions.items()
            if now["versions"].get(k) != v
        ]
        if changed:
            notes.append("stale: " + ", ".join(changed))
    if row.get("default_config") and row["default_config"] != now["default_config"]:
        notes.append("stale: the default job changed since")
    return "; ".join(notes) or f"regenerated by scripts/figures.py, {row['date']}"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def headline(value: str) -> str:
    """The figure without its parenthesised detail (ranges, seeds' spread, what it was before):
    README's table is short, docs/figures.md has the rest."""
    while (shorter := re.sub(r"\s*\([^()]*\)", "", value)) != value:
        value = shorter
    return value


def render(store: dict, now: dict) -> tuple[str, str]:
    """(docs/figures.md, README's table) from the stored rows."""
    labels = store.get("machines", {})
    page = [
        "# Figures",
        "",
        "Written by `uv run python scripts/figures.py` from `docs/figures.json`; do not edit by "
        "hand. Accuracies are mean ± half the range (lowest–highest) over the seeds listed; test "
        "accuracy is computed once per run, for the setting as it is, after any choice made on "
        "validation. Rows that this machine did not re-run name where and when they were "
        "measured; rows measured under other package versions or another default job say so.",
        "",
        "Machines:",
        "",
        *[f"- **{k}**: {v}" for k, v in labels.items()],
        "",
        "| figure | value | seeds | target | command | machine | date | versions | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = ["| what | figure | machine, date |", "| --- | --- | --- |"]
    for row in store["rows"]:
        label = next((k for k, v in labels.items() if v == row.get("machine")), row.get("machine"))
        row = dict(row, machine_label=label)
        every = " by every seed" if "," in str(row.get("seeds", "")) else ""
        met = {True: f" (met{every})", False: f" (**not met**{every})"}.get(row.get("met"), "")
        versions = ", ".join(
            f"{k} {v}"
            for k, v in (row.get("versions") or {}).items()
            if k in ("torch", "lightning", "onnxruntime", "timm")
        )
        page.append(
            f'| <a id="{row["id"]}"></a>{cell(row["what"])} | {cell(row["value"])} | '
            f"{cell(row.get('seeds', ''))} | {cell(row.get('target', ''))}{met} | "
            f"`{cell(row['command'])}` | {cell(label)} | {row['date']} | "
            f"{cell(versions or 'not recorded')} | {cell(status(row, now))} |"
        )
        if row.get("headline"):
            short = row.get("readme_value") or headline(row["value"])
            table.append(
                f"| [{cell(row.get('short', row['what']))}](docs/figures.md#{row['id']}) | "
                f"{cell(short)}{met} | {cell(label)}, {row['date']} |"
            )
    return "\n".join(page) + "\n", "\n".join(table)


def write_pages(store: dict, now: dict) -> None:
    page, table = render(store, now)
    PAGE.write_text(page)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md lacks the {BEGIN} ... {END} markers around its Figures table.")
    head, rest = text.split(BEGIN, 1)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote {PAGE} ({len(store['rows'])} rows) and the table in {README}")


def merge(store: dict, rows: list[dict], now: dict) -> None:
    """Replace the stored rows with these ids (keeping their place, headline flag and README
    label: what the row is does not change with its figure)."""
    by_id = {r["id"]: i for i, r in enumerate(store["rows"])}
    labels = store.setdefault("machines", {})
    if now["machine"] not in labels.values():
        labels[f"machine {len(labels) + 1}"] = now["machine"]
    for row in rows:
        row = {**row, **{k: now[k] for k in ("machine", "versions", "default_config", "date")}}
        if row["id"] in by_id:
            old = store["rows"][by_id[row["id"]]]
            kept = {k: old[k] for k in ("headline", "short") if k in old}
            store["rows"][by_id[row["id"]]] = {"headline": False, **kept, **row}
        else:
            store["rows"].append({"headline": False, **row})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seed 42 only, without fmnist_fast")
    ap.add_argument("--render", action="store_true", help="rewrite the pages, run nothing")
    ap.add_argument("--only", nargs="+", choices=["default", "fmnist_fast", "cold_start", *CHOICES])
    ap.add_argument("--isa", choices=list(ISA), help="limit the kernels to this instruction set")
    ap.add_argument("--keep", type=Path, help="keep the run folders (checkpoints) here")
    args = ap.parse_args()
    from image_classifier import lineage

    store = json.loads(STORE.read_text())
    now = context()
    if args.isa:
        os.environ.update(ISA[args.isa])  # every command below inherits it
        limits = ", ".join(f"{k}={v}" for k, v in ISA[args.isa].items())
        native = next((k for k, v in store["machines"].items() if v == now["machine"]), None)
        now["machine"] += f", kernels limited to {args.isa.upper()} ({limits})"
        if native:
            store["machines"].setdefault(f"{native}-{args.isa.upper()}", now["machine"])
    print(f"machine: {now['machine']}", flush=True)
    if not args.render:
        seeds = SEEDS[:1] if args.quick else SEEDS
        jobs = args.only or (
            ["default", "cold_start"] if args.quick else ["default", "fmnist_fast", "cold_start"]
        )
        bf16_cpu = not args.isa and bool({"avx512_bf16", "amx_bf16"} & set(lineage.cpu_info()[1]))
        started = time.perf_counter()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        keep = contextlib.nullcontext(str(args.keep)) if args.keep else None
        with keep or tempfile.TemporaryDirectory(prefix="figures-") as tmp:
            tmp = Path(tmp)
            rows = []
            if "default" in jobs or "cold_start" in jobs:
                rows += measure_default(tmp, seeds, bf16_cpu) if "default" in jobs else []
                if "cold_start" in jobs:
                    if "default" not in jobs:
                        train_and_test(tmp / "default-42", "seed=42", test=False)
                    rows += measure_cold_start(tmp)
            if "fmnist_fast" in jobs:
                rows += measure_fast(tmp, seeds)
            stored_baselines(store, now)
            for choice in CHOICES:
                rows += measure_choice(tmp, seeds, choice) if choice in jobs else []
        if args.isa:
            suffix = f" [{args.isa.upper()} kernels]"
            rows = [dict(r, id=f"{r['id']}_{args.isa}", what=r["what"] + suffix) for r in rows]
        merge(store, rows, now)
        STORE.write_text(json.dumps(store, indent=1, ensure_ascii=False) + "\n")
        print(
            f"measured {', '.join(r['id'] for r in rows)} in {time.perf_counter() - started:.0f} s"
        )
    write_pages(store, now)


if __name__ == "__main__":
    main()
