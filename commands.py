"""The command line: `uv run python commands.py command=<name> [key=value ...]`.

Thin on purpose: pick the command, let Hydra compose the config, map errors to exit codes
(0 success, 2 bad usage or input with one clear message, 1 anything else).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from image_classifier.errors import ExportError, UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMMANDS = {
    "download": "image_classifier.data.sources:run_download",
    "train": "image_classifier.training.train:run_train",
    "test": "image_classifier.training.evaluate:run_test",
    "cache-features": "image_classifier.data.features:run_cache_features",
    "export-onnx": "image_classifier.export.onnx:run_export_onnx",
    "export-trt": "image_classifier.export.tensorrt:run_export_trt",
    "export-triton": "image_classifier.export.triton:run_export_triton",
    "infer": "image_classifier.inference.infer:run_infer",
    "serve": "image_classifier.serving.app:run_serve",
    "audit": "image_classifier.audit:run_audit",
}


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _run(cfg: DictConfig):
    name = cfg.command
    if name not in COMMANDS:
        from image_classifier.errors import did_you_mean

        raise UserError(f"Unknown command {name!r}.{did_you_mean(name, COMMANDS)} "
                        f"Valid commands: {', '.join(COMMANDS)}.")  # fmt: skip
    import importlib

    module, func = COMMANDS[name].split(":")
    fn = getattr(importlib.import_module(module), func)
    with open_dict(cfg):
        if cfg.paths.output_dir is None:
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    if name == "test":
        overrides = HydraConfig.get().overrides.task
        return fn(
            cfg, use_checkpoint_data=not any(o.lstrip("+~").startswith("data") for o in overrides)
        )
    return fn(cfg)


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
    except KeyboardInterrupt:
        _fail(
            "interrupted. A training run continues from its last finished epoch with "
            "`uv run python commands.py command=train train.resume=last`.",
            130,
        )


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
    """Compose once before Hydra runs, so a bad key or group exits 2 with close matches."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from image_classifier.errors import did_you_mean

    plain = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as e:
        _fail(f"Cannot parse the overrides: {e}")
    simple = []
    for o in parsed:
        if o.is_hydra_override():
            continue
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        key = o.key_or_group
        if (CONFIG_DIR / key).is_dir():  # a config group: each value must name one of its files
            options = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
            for v in values:
                if v not in options:
                    extra = (
                        " (or any timm architecture: model=timm model.name=NAME)"
                        if key == "model"
                        else ""
                    )
                    _fail(f"Unknown {key} option {v!r}.{did_you_mean(v, options)} "
                          f"Available: {', '.join(options)}{extra}.")  # fmt: skip
        simple.append(f"{o.get_key_element()}={values[0]}")
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name="config", overrides=simple)
    except (HydraException, OmegaConfBaseException) as e:
        import re

        msg = str(e).strip().splitlines()[0]
        m = re.search(r"Could not override '([^']+)'|Key '([^']+)' is not in struct", str(e))
        hint = ""
        if m:
            key = m.group(1) or m.group(2)
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                base = compose(config_name="config")
            keys = [
                k
                for k in _flat_keys(OmegaConf.to_container(base))
                if k.count(".") == key.count(".")
            ]
            hint = did_you_mean(key, keys) + " (prefix with + to add a new key)"
        elif "Could not find" in str(e):
            hint = " " + " ".join(str(e).split())
            msg = ""
        _fail(f"Bad override: {msg}{hint}".replace(": .", ".").strip())


def _flat_keys(d, prefix=""):
    keys = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, dict):
            keys += _flat_keys(v, key + ".")
    return keys


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
    main()
