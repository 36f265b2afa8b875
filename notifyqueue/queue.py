"""Queueing intents and ending batches: :func:`enqueue` and :func:`finalise`."""

from __future__ import annotations

import sys
import typing as t

from . import signals
from .errors import ChannelNotFound, DeliveryError
from .intent import BatchResult, Intent
from .outbox.fast_path import check_payload
from .state import State, get_state
from .transaction import add_intents, current_batch

if t.TYPE_CHECKING:
    from flask import Flask


def queue_rendered(
    app: Flask,
    state: State,
    templates: t.Iterable[tuple[str, t.Any]],
    context: t.Mapping[str, t.Any],
    source: str,
) -> list[Intent]:
    """Render each ``(channel, template)`` and add the intents to the session's batch.

    All are rendered before any is queued, so a rendering error queues none.
    """
    channels = state.channels
    intents = []
    for name, template in templates:
        intents.append(
            Intent.new(name, channels[name].render(template, context), source)
        )
    if state.durable:
        for intent in intents:
            if intent.channel in state.durable:
                check_payload(intent)
    # The registry directly: scoped_session.__call__ adds a frame and checks
    # for keyword arguments we never pass.
    session = state.session.registry()
    if signals.intent_queued.receivers:
        for intent in intents:
            signals.intent_queued.send(app, intent=intent)
    add_intents(session, app, intents)
    return intents


def enqueue(channel: str, template: t.Any, /, **context: t.Any) -> Intent | None:
    """Queue one intent from code that is not decorated.

    It joins the session's current transaction (or the next one it begins),
    and is dispatched when that commits.

    :param channel: a configured channel's name.
    :param template: the channel's template (a ``str`` for ``log``; a dict
        with ``subject`` and ``body`` for ``mail``). It *is* a template: its
        braces are fields. Wrap text already rendered in
        :class:`~notifyqueue.Raw`.
    :param context: the values the template's fields name.
    :return: the queued intent; ``None`` for a channel configured with
        ``"enabled": False``, which queues nothing.
    :raises ChannelNotFound: the channel is not configured.
    :raises TemplateError: the template is invalid or a field has no value.
    :raises LifecycleError: no app context, or NotifyQueue not initialised.
    """
    app, state = get_state()
    if channel not in state.channels:
        if channel in state.disabled:
            return None
        raise ChannelNotFound(
            f"Unknown channel {channel!r}; configured channels:"
            f" {', '.join(state.options)}. Add it to NOTIFYQUEUE_CHANNELS."
        )
    intent = queue_rendered(app, state, ((channel, template),), context, "enqueue")[0]
    # The source stays "enqueue"; who called it is kept aside, for the warning
    # about a batch discarded without a commit: two strings that exist
    # already, joined only if that warning runs.
    frame = sys._getframe(1)
    code = frame.f_code
    intent.__dict__["_caller"] = (
        frame.f_globals.get("__name__"),
        getattr(code, "co_qualname", code.co_name),  # co_qualname: Python 3.11+
    )
    return intent


def finalise(commit: bool = True) -> BatchResult:
    """End the current batch.

    ``commit=True`` commits the session; once the commit has succeeded the
    batch is dispatched and its result returned. If the commit raises, the
    session is rolled back, the batch discarded, and the error re-raised.
    ``commit=False`` rolls the session back and discards the batch.

    :raises DeliveryError: with ``NOTIFYQUEUE_STRICT``, if anything failed to
        dispatch (the data is committed).
    """
    _, state = get_state()
    session = state.session()
    batch = current_batch(session)
    if not commit:
        session.rollback()
        if batch is None or batch.result is None:
            return BatchResult(committed=False)
        return batch.result
    try:
        session.commit()
    except DeliveryError:
        raise  # strict mode: the commit succeeded, delivery did not
    except Exception:
        session.rollback()
        raise
    if batch is None or batch.result is None:
        return BatchResult(committed=True)
    return batch.result
