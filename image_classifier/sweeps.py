"""What a `-m` sweep adds on any launcher (the basic one, submitit, Ray) and any sweeper (grid,
Optuna): the MLflow store and experiment made once before the trials start (parallel trials
would race to create them), and at the end the sweep's best trial named from its MLflow runs,
which `tracking.sweep_tags` tags with the sweep's folder."""

from __future__ import annotations

import time
from pathlib import Path

from hydra.experimental.callback import Callback


def sweep_size(config) -> int | None:
    """How many trials the sweep runs: the sweeper's n_trials (Optuna), else the product of the
    swept values' counts (`train.lr=1e-3,3e-3 model=cnn,cnn4`: 4); None when not countable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials"):
        return int(sweeper.n_trials)
    given = [
        *config.hydra.overrides.task,
        *(f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()),
    ]
    size = 1
    try:
        for o in OverridesParser.create().parse_overrides(given):
            if o.is_sweep_override():
                size *= len(list(o.sweep_string_iterator()))
    except Exception:  # interval() and other sweeps with no count
        return None
    return size


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.started: float | None = None  # set where the sweep starts: trials run here too
        self.total: int | None = None
        self.done = 0

    def on_multirun_start(self, config, **kwargs) -> None:
        from image_classifier import tracking

        _check_ray_address(config)
        tracking.experiment_id(config)
        self.started, self.total = time.perf_counter(), sweep_size(config)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """A line after each trial: how many of how many, the time so far and an ETA. Trials a
        launcher runs in other processes (joblib, submitit, Ray) end there, without one."""
        if self.started is None:
            return
        self.done += 1
        spent = time.perf_counter() - self.started
        of = f" of {self.total}" if self.total else ""
        left = (
            f", about {_clock(spent / self.done * (self.total - self.done))} left"
            if self.total and self.done < self.total
            else ""
        )
        print(f"Sweep: {self.done}{of} trial(s) done in {_clock(spent)}{left}", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        from image_classifier import tracking

        sweep = str(Path(config.hydra.sweep.dir).resolve())
        if config.command == "train" and not config.logger.enabled:
            print(
                f"Sweep {sweep}: each trial's run in its numbered folder (logger.enabled=false: "
                "no MLflow runs to name the best from).",
                flush=True,
            )
        if not config.logger.enabled or config.command != "train":
            return
        runs = tracking.sweep_runs(config, sweep)
        scored = [r for r in runs if "best_score" in r.data.metrics]
        if not scored:
            print(f"Sweep {sweep}: {len(runs)} trial(s) in MLflow, none finished with a score.")
            return
        best = scored[0]
        print(
            f"Sweep {sweep}: {len(runs)} trial(s) in MLflow experiment "
            f"{config.logger.experiment!r}; best: trial {best.data.tags.get('sweep.trial')} "
            f"({best.info.run_id}), {config.train.monitor} = "
            f"{best.data.metrics['best_score']:.4f}, checkpoint "
            f"{best.data.params.get('config/paths/output_dir', '?')}/checkpoints/best.ckpt",
            flush=True,
        )
        if line := _ties(scored, config.train.monitor):
            print(line, flush=True)


def _ties(scored: list, monitor: str) -> str | None:
    """A line when other trials score inside the 95 % interval of the best's score (Wilson's,
    as a proportion of the validation images; at least one image below it): on a small
    validation split a sweep's best is then one of several, not a finding. (Two standard errors
    put 10 of 12 outside a best of 12 of 12, whose interval reaches down to 0.76.)"""
    from image_classifier.models.metrics import wilson_interval

    n = int(scored[0].data.metrics.get("val_images", 0))
    best = scored[0].data.metrics["best_score"]
    if not n or "loss" in monitor or len(scored) < 2 or not 0 <= best <= 1:
        return None
    margin = max(1 / n, best - wilson_interval(best, n)[0])
    near = [r for r in scored[1:] if best - r.data.metrics["best_score"] < margin - 1e-9]
    if not near:
        return None
    return (
        f"  {len(near)} other trial(s) score within {margin:.4f} of the best (inside the 95 % "
        f"interval of {monitor} on {n} validation images, at least one image): not clearly "
        "worse. More validation images tell trials apart (data.split, or a val/ folder)."
    )


def _check_ray_address(config) -> None:
    """On hydra-ray-launcher: the driver's Ray environment (`cluster.client_environment`: Ray's uv
    hook off, which from a `uv run` driver with a project-local uv kills every worker before it
    starts; token authentication), and exit 2 with the fix when no cluster answers at the
    address (the launcher itself would wait, then fail with a traceback)."""
    import sys

    from omegaconf import OmegaConf

    from image_classifier import cluster

    launcher = config.hydra.launcher
    if "RayLauncher" not in str(launcher.get("_target_", "")) or "AWS" in launcher._target_:
        return
    cluster.client_environment()
    address = OmegaConf.select(launcher, "ray.init.address")
    if problem := cluster.address_problem(address, "hydra.launcher.ray.init.address"):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


# hydra/launcher option -> (the module its plugin installs, the package that has it)
LAUNCHERS = {
    **dict.fromkeys(
        ("submitit_local", "submitit_slurm", "slurm"),
        ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ),
    **dict.fromkeys(
        ("ray", "ray_aws", "ray_cluster"),
        ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    ),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "rq": ("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher"),
}


def check_launcher(parsed) -> None:
    """A known Hydra launcher whose plugin is not installed: name the package, not Hydra's list."""
    import importlib.util

    from image_classifier.errors import UserError

    for o in parsed:
        if o.key_or_group != "hydra/launcher":
            continue
        name = o.get_value_element_as_str()
        module, package = LAUNCHERS.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise UserError(
                f"hydra/launcher={name} needs the package {package}, which is not installed "
                f"here. Add it with `uv add {package}` (docs/scale-out.md lists each launcher)."
            )
