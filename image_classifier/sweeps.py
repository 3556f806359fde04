"""What a `-m` sweep adds on any launcher (the basic one, submitit, Ray) and any sweeper (grid,
Optuna): the MLflow store and experiment made once before the trials start (parallel trials
would race to create them), and at the end the sweep's best trial named from its MLflow runs,
which `tracking.sweep_tags` tags with the sweep's folder."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        import os

        from image_classifier import tracking

        # A driver started by `uv run` (README's way) makes Ray rebuild that uv environment on
        # every worker from the driver's folder (Ray's uv hook): with a project-local uv
        # (.uv/bin/uv) the workers die before they start, and a cluster whose nodes already hold
        # the environment does not need it. Read by Ray at import, so before the launcher's.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        tracking.experiment_id(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        from image_classifier import tracking

        if not config.logger.enabled or config.command != "train":
            return
        sweep = str(Path(config.hydra.sweep.dir).resolve())
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
