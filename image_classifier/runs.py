"""Which run folder, checkpoint or model file a command works on: the one place that decides.

Every command that takes a model accepts an explicit path and otherwise finds the newest one that
`train` (and `export-onnx`) wrote under `paths.search`; the error names the option of the command
that asked, so the user knows which `key=PATH` to set.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from image_classifier.errors import UserError, override
from image_classifier.rules import REGISTRY_PREFIX

log = logging.getLogger(__name__)

_CLAIMED: dict[str, str] = {}
RANK_VARIABLES = ("RANK", "LOCAL_RANK")  # torchrun and Lightning set them in each rank's process


def _distributed() -> bool:
    """A process of a run on several processes (a Slurm job array's tasks are one each)."""
    return (
        any(v in os.environ for v in RANK_VARIABLES) or int(os.environ.get("SLURM_NTASKS") or 1) > 1
    )


class RankZeroConsole(logging.Filter):
    """The console's warnings from the first process of a distributed run only (errors from
    every one): each rank scans the same data, and a torchrun or Lightning DDP run printed every
    data warning once per process. Hydra's job_logging puts it on the console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        first = all(os.environ.get(v, "0") == "0" for v in (*RANK_VARIABLES, "SLURM_PROCID"))
        return first or record.levelno >= logging.ERROR


def claim_run_dir(path: str) -> str:
    """hydra.run.dir's default, outputs/<date>/<time>, as a folder no other command holds (the
    `claim` resolver): two commands started in the same second shared one folder and wrote
    over each other's last.ckpt, log and plots; the second now gets <time>-2. One process
    always gets the same answer. The processes of one distributed run share the folder."""
    if path in _CLAIMED or _distributed():
        return _CLAIMED.get(path, path)
    candidate, n = path, 1
    while True:
        try:
            os.makedirs(candidate)
            break
        except FileExistsError:
            n += 1
            candidate = f"{path}-{n}"
    _CLAIMED[path] = candidate
    return candidate


def output_dir(cfg) -> Path:
    """This command's run folder (Hydra's, or outputs/<date>/<time> when run as a library), as
    an absolute path: the one form every run records, whatever the working directory."""
    out = Path(
        cfg.paths.output_dir
        or Path(cfg.paths.root) / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S")
    ).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def newest(root: str | Path, search: list[str], pattern: str, setting: str) -> Path:
    """The most recently written <root>/<search>/**/checkpoints/<pattern>; `setting` is the option
    that would have named a file instead (the error message tells the user to set it)."""
    root = Path(root)
    found = [p for d in search for p in (root / d).glob(f"**/checkpoints/{pattern}")]
    if not found:
        where = ", ".join(f"{root / d}/" for d in search)
        lasts = [p for d in search for p in (root / d).glob("**/checkpoints/last.ckpt")]
        if pattern != "last.ckpt" and lasts:  # trained, but no validation ever chose a best
            last = max(lasts, key=lambda p: p.stat().st_mtime)
            raise UserError(
                f"No best checkpoint under {where}: the newest run kept only its last epoch "
                f"({last}), as a run does when validation never ran (trainer.limit_val_batches=0)."
                f" Name it with {setting}={last}, or train with validation."
            )
        raise UserError(
            f"No trained checkpoint found under {where}. Train one first "
            f"(`uv run python commands.py command=train`) or name one with {setting}=PATH."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def next_test(cfg, best: str | Path, test_images: int = 1) -> str:
    """The `command=test` line after `train`: bare when the newest-checkpoint search would find
    `best` (a best checkpoint under paths.search), else naming it (a run in hydra.run.dir=/tmp/x
    is not searched); with no test split, on a folder of test images."""
    path, root = Path(best).resolve(), Path(cfg.paths.root).resolve()
    found = path.name.startswith("best") and any(
        path.is_relative_to(root / d) for d in cfg.paths.search
    )
    line = "uv run python commands.py command=test"
    line += "" if found else f" {override('test.checkpoint', best)}"
    if not test_images:
        return line + " data=folder data.root=TEST_FOLDER data.split=[0,0,1]  (no test split)"
    return line


def newest_best(root: str | Path, search: list[str], setting: str) -> Path:
    return newest(root, search, "best*.ckpt", setting)


def checkpoint(cfg, given, setting: str) -> Path:
    """`given` when set (a run folder: its best checkpoint), else the newest best checkpoint."""
    if given:
        path = in_run_folder(given, setting, ("best.ckpt", "last.ckpt"))
        if path.suffix.lower() in EXPORTS:  # torch.load's pickle error
            beside = path.with_suffix(".ckpt")
            raise UserError(
                f"{setting}={str(given)!r} is an exported model; this command reads the training "
                "checkpoint (.ckpt)"
                + (f": the one beside it is {beside}." if beside.is_file() else ".")
                + f" To predict with the exported model: `command=infer "
                f"{override('infer.model', path)}`"
                + (
                    f"; to test it: `command=test {override('test.checkpoint', path)}`."
                    if setting != "test.checkpoint"
                    else "."
                )
            )
        return path
    found = newest_best(cfg.paths.root, cfg.paths.search, setting)
    if not (found.parent.parent / "train_summary.json").is_file():  # written when a run ends
        log.warning(
            "The newest best checkpoint, %s, is from a run that has not finished (no "
            "train_summary.json beside its checkpoints/: still training, or stopped early): its "
            "best epoch so far, not calibrated. Name another with %s=PATH.",
            found,
            setting,
        )
    return found


def network_checkpoint(cfg, given, setting: str) -> Path:
    """The checkpoint of a command that needs the network itself (explain: gradients): as
    `checkpoint`, with an export standing for the .ckpt beside it and a registered model refused."""
    text = str(given or "")
    if text.startswith(REGISTRY_PREFIX):
        raise UserError(
            f"{setting}={text!r} is a registered export; this command needs the network's "
            "gradients, which only the training checkpoint has: give the run folder or its "
            "best.ckpt (`uv run mlflow ui` shows the run each version came from)."
        )
    if is_export(text) and (beside := Path(text).expanduser().with_suffix(".ckpt")).is_file():
        return beside
    return checkpoint(cfg, given, setting)


def in_run_folder(given, setting: str, names: tuple[str, ...]) -> Path:
    """`given` as a path; a run folder (or its checkpoints/) stands for the first of `names`
    found in it."""
    path = Path(str(given)).expanduser()
    if not path.is_dir():
        return path
    for name in names:
        for folder in (path / "checkpoints", path):
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"{setting}={str(given)!r} is a folder with no {' or '.join(names)} in it or in its "
        f"checkpoints/. Name the file, e.g. {setting}=<run folder>/checkpoints/{names[0]}."
    )


def last_checkpoint(cfg, given, setting: str) -> Path:
    """train.resume: `last` means the newest last.ckpt, anything else is a path (a run folder:
    its last.ckpt)."""
    if given == "last":
        return newest(cfg.paths.root, cfg.paths.search, "last.ckpt", setting)
    return in_run_folder(given, setting, ("last.ckpt",))


def requeued_checkpoint(cfg) -> Path | None:
    """A Slurm job requeued at its time limit (SLURM_RESTART_COUNT > 0: Lightning's Slurm
    environment or submitit requeued it) continues from its own run folder's last.ckpt, when the
    first attempt wrote one; None otherwise."""
    import os

    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1 or not cfg.paths.get("output_dir"):
        return None
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def model_file(cfg, given, setting: str, exported: bool = True) -> Path:
    """`given` when set (a run folder: its exported model, else its checkpoint), else the .onnx
    export-onnx wrote beside the newest best checkpoint; without one, that checkpoint when not
    `exported` (infer and serve predict with it; export-trt, export-triton and register need
    the ONNX file)."""
    if given:
        return in_run_folder(given, setting, ("best.onnx", "best.ckpt", "last.ckpt"))
    best = newest_best(cfg.paths.root, cfg.paths.search, setting)
    if (onnx := best.with_suffix(".onnx")).exists():
        return onnx
    if not exported:
        return best
    raise UserError(
        f"{setting} is not set and {onnx} does not exist: export it first "
        f"(`uv run python commands.py command=export-onnx`) or pass {setting}=PATH."
    )


EXPORTS = (".onnx", ".engine", ".plan")  # model files that are not training checkpoints


def is_export(given) -> bool:
    """Whether a model address names an exported model: a registered one or an export file."""
    text = str(given or "")
    return text.startswith(REGISTRY_PREFIX) or Path(text).suffix.lower() in EXPORTS


def model_location(cfg, given, setting: str) -> tuple[Path, dict | None]:
    """(model file, registry info or None): `given` as a path, a registered model
    (models:/NAME@ALIAS or models:/NAME/VERSION, downloaded once), or the newest export."""
    if given and str(given).startswith(REGISTRY_PREFIX):
        from image_classifier import tracking

        return tracking.fetch_registered(cfg, str(given))
    return model_file(cfg, given, setting, exported=False), None


def write_problem(folder: Path) -> str | None:
    """Why nothing can be written in `folder`, "<reason> (<path>)", or None: the folder is made
    and a scratch file is written in it and removed (a file in the way is named as such)."""
    import tempfile

    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(0, "a file is in the way", str(existing))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        return f"{e.strerror} ({e.filename or folder})"
    return None


def check_writable(path: str, setting: str, folder: bool = False) -> None:
    """A UserError, before any work is done, when `path` (a file, or a folder when `folder`)
    cannot be written (`write_problem`)."""
    where = Path(path).expanduser()
    if why := write_problem(where if folder else where.parent):
        raise UserError(
            f"{setting}={str(path)!r} cannot be written: {why}. "
            "Give a path in a folder you can write to."
        )
