"""The value types of the config schema, as pydantic types: what a YAML value may be and how it is converted.

Deliberately narrow, so that a slip in a YAML file is reported instead of guessed at: a boolean is never taken
for a number nor a number for a boolean; an integer field takes ``3`` or ``3.0``, never ``"3"``; a number field
also takes the text PyYAML leaves ``1e-4`` as; a text field takes a number (``output.dir=2024``). Each type
carries an :class:`Expect`, which the loader turns into the "expected ..., got .... Fix: ..." line.
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


def _number(value: Any) -> Any:
    """Text that reads as a number -> the number (PyYAML reads ``1e-4`` as text)."""
    try:
        return float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        return value


_whole = BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)  # 3.0 -> 3
_text = BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)  # 2024
_bool_text = BeforeValidator(lambda v: ("true" if v else "false") if isinstance(v, bool) else v)  # auto|true|false
_empty = BeforeValidator(lambda v: {} if v is None else v)  # null -> {} for a mapping

Int = Annotated[int, Strict(), _whole, Expect("an integer", "a whole number")]
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_number), Expect("a number", "a number")]
Bool = Annotated[bool, Strict(), Expect("true or false", "true or false")]
Str = Annotated[str, Strict(), _text, Expect("a string", "a string")]
OptStr = Annotated[str | None, _text, Expect("a string or null", "a string (or null)")]
BoolText = Annotated[str, Strict(), _bool_text, Expect("a string", "a string")]
Names = Annotated[
    list[Str],
    BeforeValidator(lambda v: v.split(",") if isinstance(v, str) else v),  # the command line writes a,b
    AfterValidator(lambda items: [item.strip() for item in items if item.strip()]),
    Expect("a list of strings", "a comma-separated list of names"),
]
Params = Annotated[
    dict[str, Annotated[dict[str, Any], _empty]],
    _empty,
    Expect("a mapping of method name to keyword parameters", "a mapping"),
]
Mapping = Annotated[dict[str, Any], _empty, Expect("a mapping", "a mapping")]
PathOrMapping = Annotated[
    str | dict[str, Any] | None, Expect("a path to a JSON file or a mapping", "a file path or an inline mapping")
]
