"""Helpers for testing code that queues notifications."""

from __future__ import annotations

import contextlib
import typing as t

from .extension import _Capture, get_state

if t.TYPE_CHECKING:
    from flask import Flask

    from .intent import Intent


@contextlib.contextmanager
def capture(
    app: Flask | None = None, *, dispatch: bool = True
) -> t.Iterator[list[Intent]]:
    """Record every intent the app dispatches while the block runs.

    Yields a list that each dispatched :class:`~notifyqueue.Intent` is
    appended to, in dispatch order; intents that failed are not recorded.
    With ``dispatch=False`` the channels are not called: committed intents are
    recorded (and count as dispatched in the :class:`~notifyqueue.BatchResult`)
    but no ``dispatch`` or ``intent_dispatched`` signal is sent.

    :param app: the app to watch; default the current app.
    """
    _, state = get_state(app)
    recorded: list[Intent] = []
    entry = _Capture(recorded, dispatch)
    state.captures.append(entry)
    try:
        yield recorded
    finally:
        state.captures.remove(entry)
