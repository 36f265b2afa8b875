"""Helpers for testing code that queues notifications."""

from __future__ import annotations

import contextlib
import time
import typing as t
from datetime import datetime, timedelta, timezone

from .state import Capture, get_state

if t.TYPE_CHECKING:
    from flask import Flask

    from .intent import Intent
    from .outbox import DrainStats


@contextlib.contextmanager
def capture(
    app: Flask | None = None, *, dispatch: bool = True
) -> t.Iterator[list[Intent]]:
    """Record every intent the app dispatches while the block runs.

    Yields a list that each dispatched :class:`~notifyqueue.Intent` is
    appended to when its channels have been called, in whichever thread that
    happens (a ``"background"`` channel's pool thread, say: call :func:`wait`
    before reading the list); intents that failed are not recorded.

    With ``dispatch=False`` the channels are not called, whatever their
    delivery mode: committed intents are recorded at the commit, in the
    committing thread (and count as dispatched in the
    :class:`~notifyqueue.BatchResult`), but no ``dispatch`` or
    ``intent_dispatched`` signal is sent.

    :param app: the app to watch; default the current app.
    """
    _, state = get_state(app)
    recorded: list[Intent] = []
    entry = Capture(recorded, dispatch)
    state.captures.append(entry)
    try:
        yield recorded
    finally:
        state.captures.remove(entry)


def wait(app: Flask | None = None, timeout: float = 10.0) -> None:
    """Block until everything handed off so far has been delivered or has failed.

    Covers what the app's non-inline channels (``"delivery": "background"``)
    were handed before the call, and what those tasks hand off in turn (a
    channel that commits in its task); returns at once if there is nothing.

    :param app: the app; default the current app.
    :param timeout: seconds to wait in all.
    :raises TimeoutError: past the timeout, naming the intents still pending.
    :raises LifecycleError: called inside a background delivery task.
    """
    _, state = get_state(app)
    deadline = time.monotonic() + timeout
    for mode in state.modes.values():
        mode.wait(deadline)


def shutdown(app: Flask | None = None, timeout: float = 10.0) -> list[Intent]:
    """Finish the app's background delivery (up to ``timeout``), then stop its threads.

    What interpreter exit does with ``NOTIFYQUEUE_SHUTDOWN_TIMEOUT``, for a
    test's teardown (or a worker's own stop hook). The next hand-off starts
    the threads again.

    :return: the intents left without an outcome (also logged at ERROR).
    """
    _, state = get_state(app)
    deadline = time.monotonic() + timeout
    left: list[Intent] = []
    for mode in state.modes.values():
        left.extend(mode.shutdown(max(0.0, deadline - time.monotonic())))
    return left


def drain(
    app: Flask | None = None,
    *,
    channels: t.Sequence[str] | None = None,
    batch: int = 100,
    now: datetime | None = None,
    expire_leases: bool = False,
) -> DrainStats:
    """Run the outbox drainer once, synchronously, in this thread.

    Delivers every due durable row, as ``flask notifyqueue drain --once``
    does, and returns what it did.

    :param app: the app; default the current app.
    :param now: the time taken as now when choosing due rows: a later one
        makes retries waiting for their backoff due.
    :param expire_leases: take every lease as expired, as if the process that
        holds it had died (after a :func:`crash_at`, say).
    """
    from .outbox import drain as drain_outbox

    app, state = get_state(app)
    if expire_leases:
        later = (now or datetime.now(timezone.utc)) + timedelta(
            seconds=state.outbox_lease + 1
        )
        now = later if now is None or later > now else now
    return drain_outbox(app, once=True, channels=channels, batch=batch, now=now)


@contextlib.contextmanager
def crash_at(
    point: str, app: Flask | None = None, *, kill: bool = False
) -> t.Iterator[None]:
    """Stop the durable fast path at ``point`` while the block runs.

    As if the process had died there: ``"after_commit"`` (nothing delivered),
    ``"mid_send"`` (the commit's first durable intent delivered, the rest
    not) or ``"before_ack"`` (everything delivered, nothing recorded). The
    rows stay leased; :func:`drain` with ``expire_leases=True`` then plays
    the drainer that finds them, so a test can prove its channels' receivers
    cope with a repeat. With ``kill=True`` the process really dies there, by
    ``SIGKILL`` (for a test's subprocess).
    """
    from .outbox.fast_path import set_crash_point

    app, _ = get_state(app)
    set_crash_point(app, point, kill=kill)
    try:
        yield
    finally:
        set_crash_point(app, None)
