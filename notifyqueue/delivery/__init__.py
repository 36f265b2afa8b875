"""The route of a committed batch: transaction end -> delivery mode -> dispatch.

Each channel has a delivery mode (its ``"delivery"`` option, default
``NOTIFYQUEUE_DELIVERY``). :func:`deliver_committed` is the one place a
committed batch goes: it sends ``batch_committed``, honours
``capture(dispatch=False)``, then hands each mode the intents of its
channels. A mode decides where and when they are dispatched; dispatching
itself (:mod:`notifyqueue.dispatch`) is the same for all of them.
"""

from __future__ import annotations

import typing as t

from .. import signals
from ..context import current_context
from ..dispatch import record_batch, send_isolated
from ..errors import DeliveryError
from ..intent import BatchResult
from ..outbox.fast_path import write_batch
from ..state import get_state, state_of
from .background import BackgroundDelivery, BackgroundStats
from .base import DeliveryMode
from .celery import CeleryDelivery
from .inline import InlineDelivery

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import Session

    from ..intent import Intent
    from ..state import State

MODES: dict[str, type[DeliveryMode]] = {
    InlineDelivery.name: InlineDelivery,
    BackgroundDelivery.name: BackgroundDelivery,
    CeleryDelivery.name: CeleryDelivery,
}
"""Every delivery mode, by the name the ``"delivery"`` option gives it."""

__all__ = [
    "MODES",
    "BackgroundDelivery",
    "BackgroundStats",
    "CeleryDelivery",
    "DeliveryMode",
    "InlineDelivery",
    "background_stats",
    "before_commit",
    "deliver_committed",
]


def background_stats(app: Flask | None = None) -> BackgroundStats:
    """Return the counts of the app's background delivery in this process.

    All zero if no channel of the app is ``"delivery": "background"``, or
    nothing was handed off yet.

    :param app: the app; default the current app.
    """
    _, state = get_state(app)
    mode = state.modes.get(BackgroundDelivery.name)
    if isinstance(mode, BackgroundDelivery):
        return mode.stats()
    return BackgroundStats()


def before_commit(session: Session, app: Flask | None, intents: list[Intent]) -> None:
    """Write the durable intents to the outbox, then give each mode the intents
    of its channels, just before the root COMMIT."""
    if app is None or not intents:
        return
    state = state_of(app)
    if state.durable:
        write_batch(session, app, state, intents)
    if not state.preparing:
        return
    for _, mode, part in _parts(state, intents):
        if mode in state.preparing:
            mode.before_commit(app, state, session, part)


def deliver_committed(
    app: Flask | None, intents: list[Intent], discarded: list[Intent]
) -> BatchResult:
    """Route the intents of a committed root transaction to their delivery modes.

    Runs once the root transaction has ended, in the committing thread,
    inside an app context of ``app`` (pushed if another is current).

    :raises DeliveryError: if ``NOTIFYQUEUE_STRICT`` is on and anything failed,
        after the whole batch was dispatched (strict mode is inline only).
    """
    result = BatchResult(committed=True, discarded=discarded)
    if app is None or not intents:
        return result
    state = state_of(app)
    context = current_context()
    if context is not None and context.app is app:
        _route(app, state, intents, result)
    else:
        with app.app_context():
            _route(app, state, intents, result)
    if state.strict and result.failed:
        raise DeliveryError(
            {intent.id: exc for intent, exc in result.failed}, result=result
        )
    return result


def _route(
    app: Flask, state: State, intents: list[Intent], result: BatchResult
) -> None:
    if signals.batch_committed.receivers:
        send_isolated(signals.batch_committed, app, intents=list(intents))
    if state.captures and record_batch(state, intents, result):
        return
    single = state.single_mode
    if single is not None:
        single.deliver(app, state, intents, result)
        return
    for _, mode, part in _parts(state, intents):
        mode.deliver(app, state, part, result)


def _parts(
    state: State, intents: list[Intent]
) -> list[tuple[str, DeliveryMode, list[Intent]]]:
    """Split intents by delivery mode, in ``state.modes`` order, each in call order."""
    by_mode: dict[str, list[Intent]] = {}
    delivery = state.delivery
    for intent in intents:
        name = delivery[intent.channel]
        part = by_mode.get(name)
        if part is None:
            by_mode[name] = [intent]
        else:
            part.append(intent)
    return [
        (name, mode, by_mode[name])
        for name, mode in state.modes.items()
        if name in by_mode
    ]
