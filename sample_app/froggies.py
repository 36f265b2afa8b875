"""The API methods: what the views, the batch endpoint and the demo call.

The decorated methods only change the model; ``@deferred_notify`` queues
their notifications, and the commit that ends the request delivers them.
"""

from __future__ import annotations

import typing as t

from notifyqueue import BatchResult, deferred_notify, finalise

from .extensions import db
from .models import Froggy

MAX_ID = 2**31 - 1


class FroggyNotFound(LookupError):
    """No froggy has this id.

    :param where: what named the id, to start the message with.
    """

    def __init__(self, froggy_id: int, where: str | None = None) -> None:
        message = f"no froggy with id {froggy_id}."
        super().__init__(f"{where}: {message}" if where else message.capitalize())
        self.froggy_id = froggy_id


def get_froggy(froggy_id: int) -> Froggy:
    """The froggy with this id.

    :raises FroggyNotFound: there is none.
    """
    # An id no integer column can hold names no froggy (and must not reach
    # PostgreSQL, which would refuse the query).
    if not 1 <= froggy_id <= MAX_ID:
        raise FroggyNotFound(froggy_id)
    froggy = db.session.get(Froggy, froggy_id)
    if froggy is None:
        raise FroggyNotFound(froggy_id)
    return froggy


def create_froggy(
    name: str, colour: str = "green", *, froggy_id: int | None = None
) -> Froggy:
    """Add a new froggy to the session; it is inserted at the next flush.

    :param froggy_id: an explicit id; by default the database assigns one.
    """
    froggy = Froggy(id=froggy_id, name=name, colour=colour, is_jumping=False)
    db.session.add(froggy)
    return froggy


@deferred_notify(
    log="Froggy colour updated: {froggy.id}; new value: {colour}",
    mail={
        "subject": "Froggy colour updated",
        "body": "Froggy: {froggy.id}; new colour: {colour}",
    },
)
def update_froggy_colour(froggy: Froggy, colour: str) -> None:
    froggy.colour = colour


@deferred_notify(
    log="Made froggy jump: {froggy.id}; jump height: {jump_height}",
    # Text and HTML from templates/email/froggy_jump.txt and .html (Jinja).
    mail={"subject": "Made froggy jump", "template": "email/froggy_jump"},
)
def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
    froggy.is_jumping = True
    froggy.jump_height = jump_height


def make_froggy_brightpink_and_highjump(froggy: Froggy) -> BatchResult:
    """Both changes in one transaction: two log lines, then one email.

    Commits, so the caller's other pending changes commit with it.
    """
    update_froggy_colour(froggy, "bright_pink", notify=["log"])
    make_froggy_jump(froggy, "50 metres")
    return finalise(commit=True)


def apply(operation: str, fields: t.Mapping[str, t.Any]) -> Froggy:
    """Run one checked operation of a batch (see :mod:`.schema`) in the session.

    Nothing commits here: the caller ends the batch with ``finalise()``.
    """
    if operation == "create":
        return create_froggy(fields["name"], fields.get("colour", "green"))
    froggy = get_froggy(fields["id"])
    if operation == "colour":
        update_froggy_colour(froggy, fields["colour"])
    elif operation == "jump":
        make_froggy_jump(froggy, fields["jump_height"])
    else:
        raise ValueError(f"Unknown operation {operation!r}.")
    return froggy
