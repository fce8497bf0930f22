"""Hyper-parameters declared once, in a method's typed signature.

A keyword-only parameter annotated ``Annotated[T, Hp("help", low=.., high=..)]`` with a default
is a hyper-parameter: its name, type, default, range and help come from that one place
(``params_of``). ``T`` may be ``float``, ``int``, ``bool``, ``str``, a ``Literal[...]`` (the
choices), ``dict``, ``list[float]``/``list[int]``, or a union of those with ``None``.
``Hp(aliases=(..))`` keeps an old spelling accepted (``lambda``, ``base``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Annotated, Any, Callable, Literal, Union

from mergeflow.errors import MergeflowError

RESERVED = ("ctx", "stats")  # what the engine passes besides hyper-parameters


@dataclasses.dataclass(frozen=True)
class Hp:
    """What a signature cannot say about a hyper-parameter: help text, range and old spellings."""

    help: str
    low: float | None = None
    high: float | None = None
    high_open: bool = False  # the range is [low, high): ``high`` itself is refused
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyper-parameter as the registry checks it (built by ``params_of``)."""

    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    kinds: tuple[type, ...] = (float,)  # allowed types; ``list`` holds ``item``s
    item: type = float
    high_open: bool = False
    aliases: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> Any:
        """``value`` validated (ints widened to float where a float is expected), or a one-line error."""
        if value is None and (self.default is None or type(None) in self.kinds):
            return None
        if isinstance(value, list) and list in self.kinds:
            return [self._scalar(v, f"{where}[{i}]", self.item) for i, v in enumerate(value)]
        if dict in self.kinds:
            if not isinstance(value, dict):
                raise MergeflowError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        scalar = [k for k in self.kinds if k not in (list, type(None))]
        if not scalar:
            raise MergeflowError(f"{where}: expected a list, got {value!r}")
        return self._scalar(value, where, scalar[0])

    def _scalar(self, value: Any, where: str, kind: type[Any]) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise MergeflowError(f"{where}: expected {kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MergeflowError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if self.low is not None and value < self.low or above:
            raise MergeflowError(f"{where}: {value!r} is outside [{self.low}, {self.high}{')' if self.high_open else ']'}")
        return value


def _kinds(tp: Any) -> tuple[tuple[type, ...], type, tuple[Any, ...] | None]:
    """(allowed types, list item type, choices) of a signature type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        kinds: list[type] = []
        item: type = float
        choices: tuple[Any, ...] | None = None
        for arm in typing.get_args(tp):
            k, i, c = _kinds(arm)
            kinds += [x for x in k if x not in kinds]
            item = i if list in k else item
            choices = c or choices
        return tuple(kinds), item, choices
    if origin is Literal:
        values = typing.get_args(tp)
        return (type(values[0]),), float, values
    if origin is list:
        (arg,) = typing.get_args(tp) or (float,)
        return (list,), arg, None
    if origin is dict or tp is dict:
        return (dict,), float, None
    if tp is None or tp is type(None):
        return (type(None),), float, None
    if isinstance(tp, type):
        return (tp,), float, None
    raise TypeError(f"unsupported hyper-parameter type {tp!r}")


def params_of(fn: Callable[..., Any]) -> dict[str, Param]:
    """The hyper-parameters a method's signature declares, in signature order."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out: dict[str, Param] = {}
    for pname, prm in inspect.signature(fn).parameters.items():
        if prm.kind is not inspect.Parameter.KEYWORD_ONLY or pname in RESERVED:
            continue
        hint = hints.get(pname)
        if typing.get_origin(hint) is not Annotated:
            raise TypeError(f"{fn.__qualname__}: hyper-parameter {pname} needs Annotated[type, Hp(...)]")
        tp, *extras = typing.get_args(hint)
        hp = next((e for e in extras if isinstance(e, Hp)), None)
        if hp is None or prm.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__qualname__}: hyper-parameter {pname} needs an Hp(...) annotation and a default")
        kinds, item, choices = _kinds(tp)
        out[pname] = Param(prm.default, hp.help, hp.low, hp.high, choices, kinds, item, hp.high_open, hp.aliases)
    return out
