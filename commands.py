"""The command line: `uv run python commands.py command=<name> [key=value ...]`.

Thin on purpose: pick the command, let Hydra compose the config, map errors to exit codes
(0 success, 2 bad usage or input with one clear message, 1 anything else).
"""

from __future__ import annotations

import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from image_classifier import CONFIG_DIR
from image_classifier.errors import ExportError, UserError
from image_classifier.runs import claim_run_dir

# hydra.run.dir: outputs/<date>/<time>, or <time>-2 when another command started that second
OmegaConf.register_new_resolver("claim", claim_run_dir)

# command=NAME: (what runs it, what it does for --help)
COMMANDS = {
    "download": ("image_classifier.data.sources:run_download", "fetch and verify the dataset"),
    "train": ("image_classifier.training.train:run_train", "train; best.ckpt in the run folder"),
    "test": ("image_classifier.training.test_export:run_any_test", "a model on the test split"),
    "calibrate": (
        "image_classifier.training.evaluate:run_calibrate",
        "fit a checkpoint's temperature on validation",
    ),
    "cache-features": (
        "image_classifier.training.features:run_cache_features",
        "frozen-backbone features for model=head",
    ),
    "export-onnx": ("image_classifier.export.onnx:run_export_onnx", "a checkpoint to ONNX"),
    "export-trt": ("image_classifier.export.tensorrt:run_export_trt", "ONNX to TensorRT (GPU)"),
    "export-triton": (
        "image_classifier.export.triton:run_export_triton",
        "a Triton model repository",
    ),
    "register": (
        "image_classifier.export.registry:run_register",
        "an export into MLflow's model registry",
    ),
    "infer": (
        "image_classifier.inference.infer:run_infer",
        "predict for a file, folder, glob or list",
    ),
    "explain": (
        "image_classifier.inference.explain:run_explain",
        "where in each image the network looked (Grad-CAM)",
    ),
    "serve": ("image_classifier.serving.app:run_serve", "an HTTP prediction service"),
    "audit": (
        "image_classifier.audit.run:run_audit",
        "duplicates, leaks, label errors, outliers",
    ),
}
# --help lists them (configs/config.yaml: hydra.help.template)
OmegaConf.register_new_resolver(
    "commands_help", lambda: "\n".join(f"  {k:<15} {v[1]}" for k, v in COMMANDS.items())
)

# torch deprecates the LeafSpec that Lightning 2.6 still builds; the warning names Lightning's own
# line and means nothing to a user of this tool
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# commands handed another command's function: the audit trains for audit.probabilities=trained,
# and its package does not import the training code (pyproject.toml's import contracts)
HANDED = {"audit": {"train": "train"}}  # command: {keyword: the command whose function it gets}
# commands whose test-time augmentation defaults to the checkpoint's recipe unless these are set
CHECKPOINT_TTA = {"test": ("test.tta", "experiment"), "export-onnx": ("export.tta", "experiment")}
# commands that take a model file, by the setting that names it
MODEL_SETTINGS = {"infer": "infer.model", "serve": "serve.model"}
# commands that need the network of a training checkpoint (an export names the .ckpt beside it)
NETWORK_SETTINGS = {"explain": "explain.model"}
# the settings naming what a command writes (True: a folder), checked before any work is done
OUTPUT_SETTINGS = {
    "infer": {"infer.output": False, "infer.sort_into": True},
    "explain": {"explain.output": True},
    "export-onnx": {"export.output": False},
    "export-trt": {"export.trt.output": False},
    "export-triton": {"export.triton.output": True},
}


def _fail(message: str, code: int = 2) -> None:
    print(message if code == 130 else f"error: {message}", file=sys.stderr)  # 130: Ctrl-C
    sys.exit(code)


def _run(cfg: DictConfig):
    name = cfg.command
    if name not in COMMANDS:
        from image_classifier.errors import did_you_mean

        raise UserError(
            f"Unknown command {name!r}.{did_you_mean(name, COMMANDS)} "
            f"Valid commands: {', '.join(COMMANDS)}."
        )
    import importlib

    def function(command: str):
        module, func = COMMANDS[command][0].split(":")
        return getattr(importlib.import_module(module), func)

    fn = function(name)
    with open_dict(cfg):
        if cfg.paths.output_dir is None:
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
        if cfg.data.get("root"):  # stored in the model file: `test` from elsewhere must find it
            cfg.data.root = os.path.abspath(os.path.expanduser(str(cfg.data.root)))
    from image_classifier import runs

    for key, folder in OUTPUT_SETTINGS.get(name, {}).items():
        if value := OmegaConf.select(cfg, key):
            runs.check_writable(str(value), key, folder)
    if name in MODEL_SETTINGS:  # a path, a registered model or the newest export, resolved once
        key = MODEL_SETTINGS[name]
        return fn(cfg, *runs.model_location(cfg, OmegaConf.select(cfg, key), key))
    if name in NETWORK_SETTINGS:
        key = NETWORK_SETTINGS[name]
        return fn(cfg, runs.network_checkpoint(cfg, OmegaConf.select(cfg, key), key))
    if name in CHECKPOINT_TTA:  # what the command line does not set comes from the checkpoint
        given = [o.lstrip("+~") for o in HydraConfig.get().overrides.task]
        kwargs = {"use_checkpoint_tta": not any(o.startswith(CHECKPOINT_TTA[name]) for o in given)}
        if name == "test":
            kwargs["use_checkpoint_data"] = not any(o.startswith("data") for o in given)
        return fn(cfg, **kwargs)
    return fn(cfg, **{k: function(other) for k, other in HANDED.get(name, {}).items()})


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig):
    try:
        result = _run(cfg)
        # sweepers (Optuna) optimise the value the task returns
        return result.get("objective") if isinstance(result, dict) else result
    except (UserError, ExportError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(e), 2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt as e:  # Interrupted says what was kept; a bare Ctrl-C, the command
        _fail(str(e) or f"{cfg.command} interrupted.", 130)
    except Exception as e:  # a full or read-only disk is the machine's state: said, not traced
        from image_classifier.errors import write_refused, write_refused_message

        if (refused := write_refused(e)) is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(write_refused_message(refused, cfg.command), 1)


def _rewrite_model(args: list[str]) -> list[str]:
    """`model=resnet18` (no such config file) means `model=timm model.name=resnet18`."""
    out = []
    for a in args:
        if a.startswith("model=") and "," not in a:
            value = a.split("=", 1)[1]
            if value and not (CONFIG_DIR / "model" / f"{value}.yaml").exists():
                out += ["model=timm", f"model.name={value}"]
                continue
        out.append(a)
    return out


def _check_overrides(args: list[str]) -> None:
    """Compose and validate once before Hydra runs: a bad key, group or value exits 2 at once."""
    from image_classifier.config import check_command_line

    try:
        check_command_line(args, CONFIG_DIR)
    except UserError as e:
        _fail(str(e))


def _check_run_folder(args: list[str]) -> None:
    """Hydra makes the run folder before any of this tool's code runs: one that cannot be
    written (a read-only checkout, a file in the way) ended in Hydra's traceback. The part of
    its path before the first interpolation (the date and time) is checked first."""
    from image_classifier import runs

    sweep = bool({"-m", "--multirun"} & set(args))
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    root = given.get("paths.root", ".")
    value = given.get(key, f"{root}/{'multirun' if sweep else 'outputs'}/")
    fixed = value.replace("${paths.root}", root).split("${", 1)[0] or "."
    try:
        runs.check_writable(fixed, key, folder=True)
    except UserError as e:
        _fail(str(e))


# infer answers on stdout and should start fast: no run folder, no log files, Hydra's logging off
QUIET = (
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_rewrite_model(sys.argv[1:])]
    if "command=infer" in sys.argv and "-m" not in sys.argv:
        given = {a.split("=", 1)[0] for a in sys.argv[1:]}
        sys.argv += [q for q in QUIET if q.split("=", 1)[0] not in given]
    if not any(
        a in ("--help", "-h", "--cfg", "-c", "--info") or a.startswith("--cfg")
        for a in sys.argv[1:]
    ):
        _check_overrides(sys.argv[1:])
        if "hydra.run.dir=." not in sys.argv:  # infer (QUIET) writes no run folder
            _check_run_folder(sys.argv[1:])
    main()
