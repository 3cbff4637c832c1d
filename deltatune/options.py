"""Valid ranges of options, declared in the field itself: one mechanism for every Config and CLI flag.

    @dataclass
    class Config:
        r: int = option(8, ge=1)
        \"\"\"Rank of the update BA.\"\"\"              # the docstring under the field stays the help text
        bias: str = option("none", choices=("none", "all", "lora_only"))

- `validate(config, prefix)` checks every field of a dataclass instance and raises a one-line UserError
  (`option 'r' must be >= 1, got 0`); floats with a range must also be finite (no nan, no inf);
- `describe(field)` renders the range for `--help` and option listings: "(>= 1)", "(0 <= x < 1)",
  "(one of: none, all, lora_only)";
- a plain CLI parameter declares its range with `Annotated[int, Range(ge=1)]` (read by cliargs).

A tuple-valued field (`layers`, `c_grid`) applies its range to each element. None always passes: an
optional field's None means "unset".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Annotated, Any

from deltatune.errors import UserError

KEY = "deltatune.range"
"""Field-metadata key that holds a field's Range."""


@dataclass(frozen=True)
class Range:
    """Bounds (ge/gt/le/lt) of a number, or the allowed values (choices) of a string."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def numeric(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def text(self) -> str:
        """The range in words, without parentheses: `one of: a, b`, `>= 1`, `0 <= x < 1`."""
        if self.choices is not None:
            return "one of: " + ", ".join(map(str, self.choices))
        low = ("<=", self.ge) if self.ge is not None else ("<", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:
            return f"{_num(low[1])} {low[0]} x {high[0]} {_num(high[1])}"
        if low:
            return f"{low[0].replace('<', '>')} {_num(low[1])}"
        return f"{high[0]} {_num(high[1])}" if high else ""

    def problem(self, value: Any, integer: bool = False) -> str | None:
        """What is wrong with one value ("must be >= 1, got 0"), or None when it is valid; `integer`: the
        field is an int (a config file's 2.5 is refused, not truncated)."""
        if value is None:
            return None
        if isinstance(value, tuple | list):
            return next((p for p in (self.problem(v, integer) for v in value) if p is not None), None)
        if self.choices is not None:
            return None if value in self.choices else f"must be {self.text()}, got {value!r}"
        if not self.numeric:
            return None
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            return f"must be {'an integer' if integer else 'a number'} ({self.text()}), got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number ({self.text()}), got {value}"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"must be {self.text()}, got {_num(value)}"


AtLeastOne = Annotated[int, Range(ge=1)]
"""A CLI parameter that counts something (a batch size, threads): `batch_size: AtLeastOne = 64`."""
NonNegative = Annotated[int, Range(ge=0)]
"""A CLI parameter where 0 means "none" (layers to unfreeze)."""
TCPPort = Annotated[int, Range(ge=1, le=65535)]


def _num(value: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": bounds read as the user would write them."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def option(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: tuple[str, ...] | list[str] | None = None,
           default_factory: Any = MISSING) -> Any:
    """A dataclass field with its valid range in the metadata (write its docstring under it as usual)."""
    bounds = Range(ge, gt, le, lt, tuple(choices) if choices is not None else None)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: bounds})


def range_of(field: dataclasses.Field) -> Range | None:
    """The Range a field declares, or None."""
    return field.metadata.get(KEY)


def describe(field: dataclasses.Field | Range | None) -> str:
    """`(>= 1)`, `(0 <= x < 1)`, `(one of: none, all, lora_only)`; "" for a field without a range."""
    bounds = field if isinstance(field, Range) or field is None else range_of(field)
    return f"({bounds.text()})" if bounds is not None else ""


@functools.cache
def integer_fields(cls: type) -> frozenset[str]:
    """Fields typed int, `int | None` or `tuple[int, ...]`: their values must be whole numbers."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if is_integer_type(hints[f.name]))


def is_integer_type(hint: Any) -> bool:
    """int, int | None, tuple[int, ...], Annotated[int, ...]."""
    if hint is int:
        return True
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return bool(args) and is_integer_type(args[0])


def validate(config: Any, prefix: str = "", *, name: Callable[[str], str] | None = None) -> None:
    """Check every field of a dataclass instance; raise UserError for the first value out of its range.

    The message names `option '{prefix}{field}'`, or `name(field)` when given (cliargs: `--batch-size`)."""
    integers = integer_fields(type(config))
    for field in dataclasses.fields(config):
        bounds = range_of(field)
        problem = bounds.problem(getattr(config, field.name), field.name in integers) if bounds else None
        if problem is not None:
            shown = name(field.name) if name is not None else f"option '{prefix}{field.name}'"
            raise UserError(f"{shown} {problem}")
