"""The value types of the config schema, as pydantic types: what a YAML value may be and how it is converted.

The conversions are deliberately narrow, so that a slip in a YAML file is reported instead of guessed at:
a boolean is never taken for a number nor a number for a boolean, an integer field takes a whole number
only (``3`` or ``3.0``, never ``"3"``), a number field also takes the text PyYAML leaves exponents without a
dot as (``1e-4``), and a text field takes a number (``output.dir=2024``). Each type carries an
:class:`Expect`, which the loader turns into the "expected ..., got .... Fix: set FIELD to ..." line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, AllowInfNan, BeforeValidator, Strict


@dataclass(frozen=True)
class Expect:
    """For a field's type error: what the value should have been, and what to set it to."""

    expected: str
    fix: str


def _whole(value: Any) -> Any:
    """``3.0`` -> ``3`` (YAML may write a count as a float); anything else is left to the type check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(value: Any) -> Any:
    """Text that reads as a number -> the number (PyYAML reads ``1e-4`` as text)."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _text(value: Any) -> Any:
    """A number -> its text (``output.dir=2024`` is read by YAML as an int); booleans stay invalid."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _bool_text(value: Any) -> Any:
    """A YAML boolean -> ``"true"`` / ``"false"``, for a choice of ``auto``, ``true`` and ``false``."""
    return ("true" if value else "false") if isinstance(value, bool) else value


def _split(value: Any) -> Any:
    """``"a, b"`` -> ``["a", " b"]`` (the command line writes lists comma-separated)."""
    return value.split(",") if isinstance(value, str) else value


def _strip(items: list[str]) -> list[str]:
    return [item.strip() for item in items if item.strip()]


def _empty(value: Any) -> Any:
    """``null`` -> ``{}`` for a mapping."""
    return {} if value is None else value


Int = Annotated[int, Strict(), BeforeValidator(_whole), Expect("an integer", "a whole number")]
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_number), Expect("a number", "a number")]
Bool = Annotated[bool, Strict(), Expect("true or false", "true or false")]
Str = Annotated[str, Strict(), BeforeValidator(_text), Expect("a string", "a string")]
OptStr = Annotated[str | None, BeforeValidator(_text), Expect("a string or null", "a string (or null)")]
BoolText = Annotated[str, Strict(), BeforeValidator(_bool_text), Expect("a string", "a string")]
Names = Annotated[
    list[Str],
    BeforeValidator(_split),
    AfterValidator(_strip),
    Expect("a list of strings", "a comma-separated list of names"),
]
Params = Annotated[
    dict[str, Annotated[dict[str, Any], BeforeValidator(_empty)]],
    BeforeValidator(_empty),
    Expect("a mapping of method name to keyword parameters", "a mapping"),
]
Mapping = Annotated[dict[str, Any], BeforeValidator(_empty), Expect("a mapping", "a mapping")]
PathOrMapping = Annotated[
    str | dict[str, Any] | None, Expect("a path to a JSON file or a mapping", "a file path or an inline mapping")
]
