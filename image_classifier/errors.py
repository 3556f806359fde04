"""Errors that reach the user as one clear paragraph and an exit code (see docs/commands.md)."""

import difflib
import errno
import re
import shlex
from collections.abc import Iterable


class UserError(Exception):
    """Bad usage or bad input: printed without a traceback, exit code 2."""


def listed(names: list[str], most: int = 10) -> str:
    """'a, b, c' or, past `most`, 'a, b, ... (and 90 more)': a folder of 100 classes filled a
    screen with one warning."""
    names = [str(n) for n in names]
    more = f" (and {len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def shown(name) -> str:
    """A class name as a line prints it beside a count or a score: in quotes when it reads as a
    number ('10'), as it is otherwise (a manifest labelled 1, 2, 10 printed "10 2, 2 1")."""
    text = str(name)
    try:
        float(text)
    except ValueError:
        return text
    return repr(text)


# a disk that will not take what a command writes: the machine's state, said in one line
WRITE_REFUSED = {
    errno.ENOSPC: "No space left on the disk",
    errno.EDQUOT: "The disk quota is used up",
    errno.EROFS: "The file system is read-only",
}


def write_refused(e: BaseException | None) -> tuple[str, str] | None:
    """(why, the file) for a write a full, over-quota or read-only disk refused, from anywhere
    in an exception's chain; the file is '' when SQLite only says "database or disk is full"
    or "attempt to write a readonly database" (the MLflow store); None for any other error. A
    checkpoint that cannot be written fails in Lightning, whose clean-up then fails to mark the
    MLflow run: the OSError is two down."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_REFUSED:
            return WRITE_REFUSED[e.errno], str(e.filename2 or e.filename or "")
        if "database or disk is full" in str(e) or "readonly database" in str(e):
            found = (WRITE_REFUSED[errno.ENOSPC if "full" in str(e) else errno.EROFS], "")
        e = e.__cause__ or e.__context__
    return found


def write_refused_message(refused: tuple[str, str], command: str) -> str:
    """What a refused write stopped, where, and the ways out."""
    why, where = refused
    where = where or "the MLflow store (mlruns/mlflow.db under paths.root)"
    free = "Free space on that disk, or write" if "read-only" not in why else "Write"
    return (
        f"{why} where {command} wrote {where}: it stopped there. {free} elsewhere, with the "
        "setting that names the folder (run folders: hydra.run.dir=DIR; the decoded-image cache: "
        "data.cache_dir=DIR; features: features.dir=DIR; MLflow: "
        "logger.tracking_uri=sqlite:///DIR/mlflow.db)."
    )


def did_you_mean(value: str, options: Iterable[str], n: int = 3) -> str:
    """' Did you mean 'a' or 'b'?' for the options closest to `value`, or ''."""
    close = difflib.get_close_matches(str(value), list(options), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


# what Hydra's override grammar reads unquoted (ASCII only: `café` is a token error there)
_PLAIN = re.compile(r"[\w/.\-+$%*@?|: ]*", re.ASCII)


def hydra_quoted(value) -> str:
    """`value` as Hydra's override grammar reads it back: as it is when the grammar takes it,
    else in single quotes, its quotes and the backslashes before them (or at its end) escaped."""
    text = str(value)
    if _PLAIN.fullmatch(text) and text == text.strip():
        return text
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def override(key: str, value) -> str:
    """`key=value` as one shell word that Hydra reads back as `value`, for the commands messages
    suggest: a path with a space, a comma (a sweep to Hydra), brackets or an accent pasted bare
    broke the command."""
    return shell_word(f"{key}={hydra_quoted(value)}")


def shell_word(word: str) -> str:
    """`word` quoted for a POSIX shell where it needs it (shlex), "a='b,c'" where that is safe."""
    if "'" in word and not re.search(r'["$`!\\]', word):
        return f'"{word}"'  # reads better than shlex's '"'"'
    return shlex.quote(word)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work: `done` holds what was finished before it; the message (set by
    whoever saved that work) says where it went. Exit code 130."""

    def __init__(self, message: str = "", done=None):
        super().__init__(message)
        self.done = done


class ExportError(RuntimeError):
    """An export ran but its result is wrong (parity, checker): nothing was written; exit code 1."""


def override_error(e: Exception, config_dir, overrides: list[str]) -> str:
    """A Hydra override error as one line: Hydra's message, first line only, with the closest
    existing key (or, under the default model=auto, which model option to name)."""
    import re

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    msg = str(e).strip().splitlines()[0]
    m = re.search(r"Could not override '([^']+)'|Key '([^']+)' is not in struct", str(e))
    hint = ""
    if m:
        key = m.group(1) or m.group(2)
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            base = compose(config_name="config")
        group, _, rest = key.partition(".")
        tree = OmegaConf.to_container(base)
        close = closest_keys(key, flat_keys(tree))
        help_line = " `uv run python commands.py --help` lists the settings."
        hint = close + _group_keys(tree, group, close) + help_line
        named = any(o.lstrip("+~").startswith(f"{group}=") for o in overrides)
        having = [] if named else _group_options_with(config_dir, group, rest)
        if group == "model" and base.model.name == "auto" and not named:
            hint = (
                f" The default model=auto picks the network from the data and has no {key}: "
                f"name the network whose option it is, e.g. `model={(having or ['cnn'])[0]} "
                f"{key}=...`."
            )
        elif having:
            hint = (
                f" {key} is a setting of {group}={' or '.join(having[:4])}: name the option "
                f"first, e.g. `{group}={having[0]} {key}=...`."
            )
    elif "Could not find" in str(e):
        hint = " " + " ".join(str(e).split())
        msg = ""
    return f"Bad override: {msg}{hint}".replace(": .", ".").strip()


def _group_keys(tree: dict, group: str, close: str) -> str:
    """When no close match lies in the key's own section (register.checkpoint: 'test.checkpoint'
    ...), the settings that section has: register's are model, name, alias, ..."""
    section = tree.get(group)
    if not isinstance(section, dict) or f"'{group}." in close or len(section) > 12:
        return ""
    return f" {group}.* takes: {', '.join(section)}."


def _group_options_with(config_dir, group: str, key: str) -> list[str]:
    """The options of config group `group` (configs/GROUP/*.yaml) that have `key`: data.root is
    data=folder's, not the default data=fashion_mnist's."""
    from omegaconf import OmegaConf

    folder = config_dir / group
    options = sorted(folder.glob("*.yaml")) if group and folder.is_dir() else []
    absent = object()
    return [
        p.stem
        for p in options
        if OmegaConf.select(OmegaConf.load(p), key, default=absent, throw_on_missing=False)
        is not absent
    ]


def closest_keys(key: str, keys: list[str]) -> str:
    """did_you_mean over setting names: the whole dotted name, else the last part alone
    (`epochs`: 'train.epochs')."""
    same_depth = [k for k in keys if k.count(".") == key.count(".")]
    if hint := did_you_mean(key, same_depth):
        return hint
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)
    named = [k for c in close for k in by_leaf[c]][:3]
    return " Did you mean " + " or ".join(repr(k) for k in named) + "?" if named else ""


def flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, dict):
            keys += flat_keys(v, key + ".")
    return keys
