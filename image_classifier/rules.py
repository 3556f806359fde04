"""The kinds of value a config key takes (a number in a range, one of some choices, a file suffix,
a fixed word or a value, a list of values), each answering with the one sentence that says what
is wrong and what would do. `config.py` holds the table of which key takes which."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from image_classifier.errors import did_you_mean


@dataclass(frozen=True)
class Number:
    """An int (`integer=True`) or a float within [lo, hi]; `open_lo` makes lo itself invalid."""

    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False
    open_lo: bool = False
    optional: bool = False
    open_hi: bool = False

    def problem(self, key: str, v) -> str | None:
        if v is None:
            return None if self.optional else f"{key} must be set (it is null)."
        kind = "an integer" if self.integer else "a number"
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or (self.integer and not float(v).is_integer())
        ):
            return f"{key}={v!r} must be {kind}{self._range()}."
        if (
            v < self.lo
            or (self.open_lo and v == self.lo)
            or v > self.hi
            or (self.open_hi and v == self.hi)
        ):
            return f"{key}={v!r} must be {kind}{self._range()}."
        return None

    def _range(self) -> str:
        lo = "" if self.lo == -math.inf else f"{'>' if self.open_lo else '>='} {self.lo:g}"
        hi = "" if self.hi == math.inf else f"{'<' if self.open_hi else '<='} {self.hi:g}"
        both = " and ".join(x for x in (lo, hi) if x)
        return f" {both}" if both else ""


@dataclass(frozen=True)
class Choice:
    options: tuple
    optional: bool = False

    def problem(self, key: str, v) -> str | None:
        if v is None and self.optional:
            return None
        if v in self.options:
            return None
        shown = ", ".join(str(o) for o in self.options)
        return f"{key}={v!r} is not one of {shown}.{did_you_mean(str(v), map(str, self.options))}"


@dataclass(frozen=True)
class Suffix:
    """A file name ending in one of `options` (or null when optional)."""

    options: tuple
    optional: bool = True

    def problem(self, key: str, v) -> str | None:
        if v is None and self.optional:
            return None
        if Path(str(v)).suffix.lower() in self.options:
            return None
        *rest, last = self.options
        ends = f"{', '.join(rest)} or {last}" if rest else last
        return f"{key}={v!r} must be a file name ending in {ends}."


@dataclass(frozen=True)
class Either:
    """A fixed word (`word`) or a value that passes `rule`."""

    word: str
    rule: object

    def problem(self, key: str, v) -> str | None:
        if v == self.word:
            return None
        if why := self.rule.problem(key, v):
            return f"{why.rstrip('.')}, or {self.word!r}."
        return None


@dataclass(frozen=True)
class Each:
    """Every item of a list passes `rule`; `length` fixes how many there are. `one_for_all`: a
    single value stands for every item (data.size=128 is [128,128]; see `items`)."""

    rule: object
    length: int | None = None
    means: str = ""  # what the items are ("height, width") ...
    example: str = ""  # ... and a value of the right length ("[128,128]")
    one_for_all: bool = False
    least: int = 0  # at least this many items ...
    distinct: bool = False  # ... each named once

    def problem(self, key: str, v) -> str | None:
        if self.one_for_all and not isinstance(v, list | tuple):
            why = self.rule.problem(key, v)
            return why and f"{why.rstrip('.')}, or {self.length} values ({self.means}), e.g. " + (
                f"{key}={self.example}."
            )
        if not isinstance(v, list | tuple):
            n = self.length or 1
            many = f" of {n} values" if self.length else ""
            return f"{key}={v!r} must be a list{many}, e.g. {key}=[{','.join([str(v)] * n)}]."
        if self.length is not None and len(v) != self.length:
            return f"{key}={list(v)} must have {self.length} values" + (
                f" ({self.means}), e.g. {key}={self.example}." if self.means else "."
            )
        for i, item in enumerate(v):
            if why := self.rule.problem(f"{key}[{i}]", item):
                return why
        if v and len(v) < self.least:
            return (
                f"{key}={list(v)} must list at least {self.least}{self.means and ' ' + self.means}."
            )
        if self.distinct and (twice := [x for i, x in enumerate(v) if x in v[:i]]):
            return f"{key}={list(v)} names {twice[0]!r} twice: list each once."
        return None


@dataclass(frozen=True)
class Text:
    """A non-empty string: a path, a name, an address (or null when optional)."""

    optional: bool = True

    def problem(self, key: str, v) -> str | None:
        if v is None:
            return None if self.optional else f"{key} must be set (it is null)."
        if isinstance(v, str) and v.strip():
            return None
        return f"{key}={v!r} must be a non-empty string (a path or a name)."


@dataclass(frozen=True)
class Entries:
    """A mapping whose every value passes `rule` (file name -> checksum, preset -> values)."""

    rule: object

    def problem(self, key: str, v) -> str | None:
        if not isinstance(v, dict):
            return f"{key}={v!r} must be a mapping of names to values."
        return next((w for k, x in v.items() if (w := self.rule.problem(f"{key}.{k}", x))), None)


PROBABILITY = Number(0, 1, open_lo=True, open_hi=True)  # a decision threshold
FLAG = Choice((True, False))


POSITIVE_INT, COUNT = Number(1, integer=True), Number(0, integer=True)
POSITIVE, FRACTION = Number(0, open_lo=True), Number(0, 1)


def items(value, length: int) -> list:
    """A setting of `Each(..., one_for_all=True)` as its list: one value repeated `length` times."""
    return [value] * length if isinstance(value, int | float | str) else list(value)


def is_auto(value) -> bool:
    """A setting left to the data (`auto`, the default of several keys)."""
    return isinstance(value, str) and value == "auto"


def fine_tunes(model_cfg) -> bool:
    """Whether a model config starts from trained weights (pretrained ones, or a checkpoint's:
    train.init_from), which decides the schedule, batch size, frozen stages and optimizer."""
    return bool(model_cfg.get("pretrained") or model_cfg.get("init_from"))


def safe_name(name: str) -> str:
    """A name as one part of a metric key, a folder or a served model's name: anything but
    letters, digits, - _ . becomes _."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


REGISTRY_PREFIX = "models:/"  # infer.model / serve.model from MLflow's model registry
