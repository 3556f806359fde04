"""The composed config, checked once at load, before any data, model or MLflow run is touched.

Every key's rule comes from one table (settings.py); this module applies it, adds the values that
cannot go together, and composes configs for Python callers. `commands.py` checks every command
line before Hydra runs; bad values exit 2 with every problem listed, each with the options and
the closest match.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from image_classifier.errors import (
    closest_keys,
    did_you_mean,
    flat_keys,
    hydra_quoted,
    override,
    shell_word,
)
from image_classifier.rules import Entries
from image_classifier.settings import rule_table

_MISSING = object()


def problems(cfg) -> list[str]:
    """Every value of `cfg` that breaks its rule, as one sentence each (empty when all is well)."""
    found = []
    for key, rule in rule_table().items():
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if value is _MISSING:
            continue  # not in this config (a data group without that key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if why := rule.problem(key, value):
            found.append(why)
    return found + _combination_problems(cfg)


def _combination_problems(cfg) -> list[str]:
    """Values that are each fine but cannot go together."""
    found = []
    budget, nodes = (OmegaConf.select(cfg, k) for k in ("train.time_budget", "trainer.num_nodes"))
    if budget and nodes and int(nodes) > 1:
        found.append(
            f"train.time_budget={budget} cannot be used with trainer.num_nodes={nodes}: each node "
            "would time its own epochs and stop at a different one, and the others would wait "
            "for it forever. Set train.epochs instead."
        )
    from image_classifier.inference.ray_engine import PARQUET

    output, engine = (OmegaConf.select(cfg, k) for k in ("infer.output", "infer.engine"))
    parquet = str(output or "").lower().endswith(PARQUET)
    if parquet and engine != "ray":
        found.append(
            f"infer.output={output!r}: Parquet is written by the Ray engine (infer.engine=ray); "
            "with infer.engine=local use a .csv or .json file."
        )
    for key in ("infer.sort_into", "infer.min_confidence"):
        if parquet and OmegaConf.select(cfg, key) is not None:
            found.append(
                f"{key} needs the rows on this machine; with infer.output=*.parquet they stay on "
                "the cluster. Use a .csv or .json output."
            )
    return found


# -- the command line, checked before Hydra runs ---------------------------------------------------
def check_command_line(args: list[str], config_dir: Path) -> None:
    """Parse and compose the overrides once, and validate the result: a bad key, group or value
    raises UserError (exit 2) in a second or two, before any work starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from image_classifier.errors import UserError

    parser, parsed = OverridesParser.create(), []
    for one in [a for a in args if not a.startswith("-")]:  # each alone: a message names it
        try:
            parsed += parser.parse_overrides([one])
        except HydraException as e:
            raise UserError(f"Cannot parse the override {one!r}: {e}.{_quote(one)}") from None
        if parsed[-1].is_sweep_override() and not {"-m", "--multirun"} & set(args):
            raise UserError(
                f"{one!r}: Hydra reads a comma as a list of values to sweep.{_quote(one)} To "
                "sweep, add -m."
            )
    _note_unused_preprocessing(parsed)
    from image_classifier.sweeps import check_launcher

    check_launcher(parsed)
    variants = _variants(parsed, config_dir)
    for overrides in variants:
        found = problems(_compose(overrides, config_dir))
        found += _unread_additions(parsed, overrides, config_dir)
        if found:
            raise UserError(
                "Bad configuration value" + ("s" if len(found) > 1 else "") + ": " + " ".join(found)
            )


# what a model file fixes: the commands that read images with it do not read these settings
MODEL_PREPROCESSING = ("data.size", "data.channels", "data.resize", "data.mean", "data.std")
MODEL_PREPROCESSING += ("data.grey_white",)
WITH_A_MODEL = ("test", "calibrate", "export-onnx", "infer", "serve")


def _note_unused_preprocessing(parsed) -> None:
    """`command=test data.size=64` tested at the model's own size without a word: say so."""
    given = {o.key_or_group: o for o in parsed}
    command = given["command"].value() if "command" in given else None
    if command in WITH_A_MODEL and (unused := [k for k in MODEL_PREPROCESSING if k in given]):
        print(
            f"note: {', '.join(unused)} not used: {command} reads images with the model's own "
            "preprocessing (the size, channels, resize, mean, std and grey white its file "
            "records).",
            file=sys.stderr,
        )


def _quote(given: str) -> str:
    """The fix for a value that holds Hydra's special characters (a folder `photos (1)`, `set,v2`
    or `café`): the override as a shell word that Hydra reads back (errors.override); a list
    (`data.classes=[chat noir,café]`) with each item quoted, so that it stays a list."""
    key, sep, value = given.partition("=")
    if value.startswith("[") and value.endswith("]") and "'" not in value and '"' not in value:
        items = ",".join(hydra_quoted(x.strip()) for x in value[1:-1].split(","))
        return f" If it is a list of names, quote each: {shell_word(f'{key}=[{items}]')}."
    if not sep or hydra_quoted(value) == value:
        return ""
    home = ""
    if value.startswith("~/"):  # bash expands no ~ after `=` in such a word
        home = f", or {key}=$HOME{value[1:]} (the shell leaves ~ after = as it is)"
    return f" If it is one value (a path, a name), quote it: {override(key, value)}{home}."


def _variants(parsed, config_dir: Path) -> list[list[str]]:
    """The overrides as `key=value` lists: the first value of every sweep, then one list per
    further value of each sweep (so each value a multirun would use is checked)."""
    first, sweeps = [], []
    for o in parsed:
        if o.is_hydra_override():
            continue
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        _check_group(o.key_or_group, values, config_dir)
        first.append(f"{o.get_key_element()}={values[0]}")
        sweeps.append((len(first) - 1, o.get_key_element(), values[1:]))
    variants = [first]
    for i, key, rest in sweeps:
        variants += [[*first[:i], f"{key}={v}", *first[i + 1 :]] for v in rest]
    return variants


SET_BY_TRAIN = ("max_epochs", "min_epochs", "max_steps", "callbacks", "logger", "default_root_dir")


def _unread_additions(parsed, overrides: list[str], config_dir: Path) -> list[str]:
    """`+key=value` for a key no config has: Hydra adds it and nothing reads it (+train.max_epochs=5
    trained the default schedule), except what something reads: Lightning's Trainer options,
    a network's own (model.*) and new entries of a mapping (normalization.NAME)."""
    added = {
        o.key_or_group: o
        for o in parsed
        if (o.is_add() or o.is_force_add())
        and not o.is_hydra_override()
        and not (config_dir / o.key_or_group.split("@")[0]).is_dir()
    }
    if not added:
        return []
    base = _compose([x for x in overrides if x.lstrip("+").split("=")[0] not in added], config_dir)
    maps = [k for k, rule in rule_table().items() if isinstance(rule, Entries)]  # normalization
    found = []
    for key in added:
        if OmegaConf.select(base, key, default=_MISSING) is not _MISSING:
            continue  # ++ on a key that exists
        if key.startswith(("model.", *(f"{k}." for k in maps))):
            continue  # a network's own option (timm's), or a new entry of a mapping
        option = key.removeprefix("trainer.")
        if option in SET_BY_TRAIN:
            found.append(
                f"+{key}: train sets Lightning's {option} itself; for the length of training use "
                "train.epochs=N or train.time_budget=SECONDS."
            )
        elif option == key or option not in _trainer_options():
            options = (
                [f"trainer.{o}" for o in _trainer_options()]
                if option != key
                else flat_keys(OmegaConf.to_container(base))
            )
            found.append(
                f"+{key}: no setting has that name, so nothing would read it."
                f"{closest_keys(key, options)} "
                "`uv run python commands.py --help` lists the settings."
            )
    return found


def _trainer_options() -> list[str]:
    """lightning.Trainer's keyword arguments (read only when a +trainer.KEY is given)."""
    import inspect

    import lightning

    return [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]


def _check_group(key: str, values: list[str], config_dir: Path) -> None:
    """A config group's value must name one of its files."""
    from image_classifier.errors import UserError

    if not (config_dir / key).is_dir():
        return
    options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
    for v in values:
        if v not in options:
            extra = (
                " (or any timm architecture: model=timm model.name=NAME)" if key == "model" else ""
            )
            raise UserError(
                f"Unknown {key} option {v!r}.{did_you_mean(v, options)} "
                f"Available: {', '.join(options)}{extra}."
            )


def compose_config(*overrides: str, root: str | Path | None = None):
    """The composed config for Python callers (scripts, notebooks): the project's configs with
    these overrides, `paths.root` set to `root` when given, checked by the same rules as the
    command line."""
    from image_classifier import CONFIG_DIR
    from image_classifier.errors import UserError

    given = [*([f"paths.root={root}"] if root is not None else []), *overrides]
    cfg = _compose(given, CONFIG_DIR)
    if found := problems(cfg):
        raise UserError(" ".join(found))
    return cfg


def _compose(overrides: list[str], config_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from image_classifier.errors import UserError, override_error

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(override_error(e, config_dir, overrides)) from None
