"""Checking JSON input before anything touches the database.

Each endpoint's body, and each operation of a batch, is a JSON object with
known fields. A missing, unknown, oversized or mistyped field is an
:class:`InputError` that names it, raised before any change is made.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from .froggies import MAX_ID
from .models import COLOUR_MAX, JUMP_HEIGHT_MAX, NAME_MAX

MAX_OPERATIONS = 100


class InputError(ValueError):
    """The request's input is invalid; the message says which part and why.

    :param status: the HTTP status to answer with.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _text(limit: int) -> t.Callable[[str, t.Any], str]:
    def check(where: str, value: t.Any) -> str:
        if not isinstance(value, str):
            raise InputError(f"{where} must be a string, got {_json_type(value)}.")
        if not value:
            raise InputError(f"{where} must not be empty.")
        if len(value) > limit:
            raise InputError(
                f"{where} is {len(value)} characters long; the limit is {limit}."
            )
        # Control characters (and NUL, which PostgreSQL refuses) have no
        # place in a name, a colour or a height.
        if not value.isprintable():
            raise InputError(f"{where} contains a control or unprintable character.")
        return value

    return check


def _froggy_id(where: str, value: t.Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where} must be an integer, got {_json_type(value)}.")
    if not 1 <= value <= MAX_ID:
        raise InputError(f"{where} must be between 1 and {MAX_ID}, got {value}.")
    return value


Check = t.Callable[[str, t.Any], t.Any]


@dataclass(frozen=True)
class Shape:
    """The fields of a JSON object: each with its check, and which are required."""

    fields: t.Mapping[str, Check]
    required: frozenset[str]

    def check(self, where: str, body: t.Any) -> dict[str, t.Any]:
        if not isinstance(body, dict):
            raise InputError(f"{where} must be a JSON object, got {_json_type(body)}.")
        unknown = sorted(set(body) - set(self.fields))
        if unknown:
            raise InputError(
                f"{where} has unknown {_fields(unknown)};"
                f" the fields are {', '.join(map(repr, self.fields))}."
            )
        missing = [n for n in self.fields if n in self.required and n not in body]
        if missing:
            raise InputError(f"{where} is missing {_fields(missing)}.")
        return {
            name: self.fields[name](f"{where}: field {name!r}", value)
            for name, value in body.items()
        }


def _shape(required: t.Iterable[str] = (), **fields: Check) -> Shape:
    return Shape(fields, frozenset(required))


CREATE = _shape(["name"], name=_text(NAME_MAX), colour=_text(COLOUR_MAX))
COLOUR = _shape(["colour"], colour=_text(COLOUR_MAX))
JUMP = _shape(["jump_height"], jump_height=_text(JUMP_HEIGHT_MAX))

OPERATIONS: dict[str, Shape] = {
    "create": CREATE,
    "colour": _shape(["id", "colour"], id=_froggy_id, colour=_text(COLOUR_MAX)),
    "jump": _shape(
        ["id", "jump_height"], id=_froggy_id, jump_height=_text(JUMP_HEIGHT_MAX)
    ),
}


def batch(body: t.Any) -> list[tuple[str, dict[str, t.Any]]]:
    """Check a ``POST /batch`` body; return its ``(operation, fields)`` pairs.

    Every operation is checked before the first runs.
    """
    if not isinstance(body, dict):
        raise InputError(f"The body must be a JSON object, got {_json_type(body)}.")
    unknown = sorted(set(body) - {"operations"})
    if unknown:
        raise InputError(
            f"The body has unknown {_fields(unknown)}; the only field is 'operations'."
        )
    if "operations" not in body:
        raise InputError("The body is missing field 'operations'.")
    operations = body["operations"]
    if not isinstance(operations, list):
        raise InputError(
            "The body's field 'operations' must be a list of operations,"
            f" got {_json_type(operations)}."
        )
    if not 1 <= len(operations) <= MAX_OPERATIONS:
        raise InputError(
            f"'operations' has {len(operations)} operations; send 1 to"
            f" {MAX_OPERATIONS}."
        )
    checked = []
    for index, operation in enumerate(operations):
        where = f"operations[{index}]"
        if not isinstance(operation, dict):
            raise InputError(
                f"{where} must be a JSON object, got {_json_type(operation)}."
            )
        if "op" not in operation:
            raise InputError(
                f"{where} is missing field 'op'; the operations are"
                f" {', '.join(map(repr, OPERATIONS))}."
            )
        name = operation["op"]
        if not isinstance(name, str) or name not in OPERATIONS:
            raise InputError(
                f"{where} has unknown operation {name!r} in field 'op'; the"
                f" operations are {', '.join(map(repr, OPERATIONS))}."
            )
        fields = {key: value for key, value in operation.items() if key != "op"}
        checked.append((name, OPERATIONS[name].check(where, fields)))
    return checked


def _fields(names: t.Sequence[str]) -> str:
    """``field 'a'`` or ``fields 'a', 'b'``."""
    return f"field{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}"


def _json_type(value: t.Any) -> str:
    """How JSON names the value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
