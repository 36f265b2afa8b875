"""``"delivery": "inline"``: dispatch in the committing thread, right after COMMIT."""

from __future__ import annotations

import typing as t

from ..outbox.fast_path import dispatch
from .base import DeliveryMode

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import BatchResult, Intent
    from ..state import State


class InlineDelivery(DeliveryMode):
    """The default: the commit returns once every channel has been called."""

    name = "inline"

    def deliver(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        dispatch(app, state, intents, result)
