"""Config classes' schema: the allowed range of a numeric key, declared next to the key, and the checker.

Every ``int``/``float`` field of a config class reads ``name: Annotated[int, Range(ge=1)] = 100``; fixed sets
of values are ``Literal`` types; a section is a nested dataclass (its fields without a default are required).
:func:`build` turns a mapping (a recipe's YAML) into a config class, checking every key and value against
these types, and names the bad key on one line: the closest valid key or the allowed values or range
(``train.steps: must be >= 1, got 0``). NaN and infinities are outside every range. The recipe loader
(:mod:`mtrl.recipe`) builds every section with it, and a module that takes a section on its own (the
``reward`` flags of ``mtrl score``) does too: a config class has no checks of its own. This module imports
nothing from :mod:`mtrl` but :mod:`mtrl.errors`, so that every config module can import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mtrl.errors import MtrlError


@dataclass(frozen=True)
class Range:
    """Bounds, each optional (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <), and ``also``: values allowed besides
    (e.g. -1 for "off"). ``Range()`` allows any finite number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[Any, ...] = ()

    def __contains__(self, value: Any) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low, low_op, low_bracket = (self.gt, ">", "(") if self.gt is not None else (self.ge, ">=", "[")
        high, high_op, high_bracket = (self.lt, "<", ")") if self.lt is not None else (self.le, "<=", "]")
        if low is not None and high is not None:
            text = f"in {low_bracket}{_num(low)}, {_num(high)}{high_bracket}"
        elif low is not None:
            text = f"{low_op} {_num(low)}"
        elif high is not None:
            text = f"{high_op} {_num(high)}"
        else:
            text = "a finite number"
        return " or ".join([text, *map(str, self.also)])


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


FINITE = Range()  # the range of a number nothing else bounds (the elements of a tuple)


# --------------------------------------------------------------------------- the checker
def type_name(tp: Any) -> str:
    """How a message names what ``tp`` allows."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _takes_mapping(tp: Any) -> bool:
    if typing.get_origin(tp) is Annotated:
        return _takes_mapping(typing.get_args(tp)[0])
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def convert(value: Any, tp: Any, where: str, rng: Range = FINITE, nullable: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses. A number must lie in ``rng``
    (its declared :class:`Range`, or any finite number); ``nullable``: null is allowed too (for the message)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:  # a number and its declared range
        base, *meta = typing.get_args(tp)
        declared = [m for m in meta if isinstance(m, Range)]
        return convert(value, base, where, declared[0] if declared else rng, nullable)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(others) == 1:  # X | None: X's own message says what is wrong
            return convert(value, others[0], where, nullable=True)
        mappings = [a for a in others if _takes_mapping(a)]
        if isinstance(value, dict) and len(mappings) == 1:  # a mapping: that member's message names the key
            return convert(value, mappings[0], where)
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, where)
            except MtrlError:
                pass
        raise MtrlError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise MtrlError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise MtrlError(f"{where}: {value!r} is not allowed; allowed: "
                        + ", ".join(repr(a) for a in typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MtrlError(f"{where}: expected {type_name(tp)}, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:  # fixed length, from a YAML list
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise MtrlError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise MtrlError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MtrlError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {k: convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp in (int, float):
        number = _number(value, tp, where)
        if number not in rng:
            shown = number if isinstance(value, str) else value  # as written; 'nan' read as a string shows nan
            raise MtrlError(f"{where}: must be {rng}{' or null' if nullable else ''}, got {shown!r}")
        return number
    if isinstance(value, tp):
        return value
    raise MtrlError(f"{where}: expected {type_name(tp)}, got {value!r}")


def _number(value: Any, tp: type, where: str) -> int | float:
    """``value`` as an int or a float (an int is a float too; YAML 1.1 reads 2e-5, no dot, as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (tp is int and not isinstance(value, int)):
        raise MtrlError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int:
        return value
    try:
        return float(value)
    except ValueError:
        raise MtrlError(f"{where}: expected float, got {value!r}") from None
    except OverflowError:  # an int too large for a float
        raise MtrlError(f"{where}: must be a finite number, got {value!r}") from None


def build(cls: Any, data: Mapping[str, Any], where: str = "", owner: str = "",
          sections: Mapping[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """The config class ``cls`` from ``data``, every key and value checked (``where``: the section's name in
    messages; ``owner``: said after an unknown key; ``sections``: key -> the function that builds that key's
    value from (value, its name), for a section whose class depends on its content)."""
    hints = typing.get_type_hints(cls, include_extras=True)  # with the declared ranges
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise MtrlError(f"unknown key '{path}'{owner}{hint}")
        if sections and key in sections:
            kwargs[key] = sections[key](value, path)
        else:
            kwargs[key] = convert(value, hints[key], path)
    missing = [f.name for f in fields if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MtrlError(f"{where or cls.__name__}: missing {', '.join(missing)}; needs {', '.join(names)}")
    return cls(**kwargs)
