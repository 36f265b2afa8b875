"""What a type checker sees of a decorated function.

mypy checks this module strictly in CI (see ``[tool.mypy] files``). Each
``type: ignore`` below must match a real error or mypy reports it unused, so
a decorator typed ``Any``, or one that rejects ``notify=``, fails CI.
"""

from __future__ import annotations

from flask import Flask

from notifyqueue import deferred_notify
from notifyqueue.testing import capture


@deferred_notify(log="doubled {number}")
def double(number: int) -> int:
    return 2 * number


class Pond:
    @deferred_notify(log="filled to {depth}")
    def fill(self, depth: int) -> str:
        return f"{depth} cm"


def _wrong_argument() -> None:
    double("2")  # type: ignore[call-overload]


def _wrong_return_type() -> str:
    return double(2)  # type: ignore[return-value]


def _wrong_method_return_type() -> int:
    return Pond().fill(3)  # type: ignore[return-value]


def test_functions_are_checked_and_take_notify(app: Flask) -> None:
    with app.app_context(), capture(dispatch=False) as sent:
        checked: int = double(2)
        chosen: int = double(3, notify=["log"])
        app.extensions["sqlalchemy"].session.commit()
    assert (checked, chosen) == (4, 6)
    assert [intent.payload for intent in sent] == ["doubled 2", "doubled 3"]


def test_methods_keep_their_return_type_and_take_notify(app: Flask) -> None:
    with app.app_context(), capture(dispatch=False) as sent:
        depth: str = Pond().fill(3)
        quiet: str = Pond().fill(4, notify=False)
        app.extensions["sqlalchemy"].session.commit()
    assert (depth, quiet) == ("3 cm", "4 cm")
    assert [intent.payload for intent in sent] == ["filled to 3"]
