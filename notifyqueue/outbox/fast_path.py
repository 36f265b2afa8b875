"""The durable fast path: rows written inside the COMMIT, settled right after it.

:func:`write_batch` runs from the root transaction's ``before_commit``: one
multi-row INSERT of the durable intents that survived every savepoint
rollback, leased to this process, so that no drainer takes them while the
fast path delivers. :func:`dispatch` is what every delivery mode calls to
dispatch committed intents: it dispatches them, then settles the durable
ones in the outbox.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import typing as t
import weakref
from datetime import timedelta

from ..dispatch import dispatch_batch
from ..errors import PayloadError
from . import store
from .settle import now, settle_result
from .table import LEASED

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import Session

    from ..intent import BatchResult, Intent
    from ..state import State

CRASH_POINTS = ("after_commit", "mid_send", "before_ack")

logger = logging.getLogger("notifyqueue")


def new_owner() -> str:
    """A lease owner token, new at every call: host, pid and 48 random bits.

    Never reused, so rows a dead process held are always told apart from the
    rows of the process that took its pid or host name.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"


_owner = new_owner()


def _new_process_owner() -> None:
    global _owner
    _owner = new_owner()


# A forked child is another process: its fast-path rows are its own.
os.register_at_fork(after_in_child=_new_process_owner)


def process_owner() -> str:
    """The lease owner of this process's fast path."""
    return _owner


def check_payload(intent: Intent) -> None:
    """Refuse, at queue time, an intent of a durable channel that JSON cannot hold.

    :raises PayloadError: naming the intent's channel, its source and the fix.
    """
    try:
        json.dumps(intent.payload)
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"Channel {intent.channel!r} is durable, so its payload is stored as"
            f" JSON, and the payload from {intent.source} cannot be: {exc}. Render"
            " it to str, numbers, lists and dicts (or use 'durable': False)."
        ) from exc


def write_batch(
    session: Session, app: Flask, state: State, intents: list[Intent]
) -> None:
    """Insert the durable ones among ``intents``, in the committing transaction.

    :raises OutboxError: the table is missing (the commit then fails: the data
        never commits without its notifications).
    """
    if not _durable(state, intents):
        return
    if state.captures and not all(capture.dispatch for capture in state.captures):
        return  # capture(dispatch=False) records at commit and delivers nothing
    # Flush first, as the commit would: an intent queued by a flush hook is
    # then in the batch too.
    session.flush()
    durable = _durable(state, intents)
    connection = session.connection()
    store.check_database(connection)
    moment = now()
    until = moment + timedelta(seconds=state.outbox_lease)
    owner = _owner
    commit_id = durable[0].id
    rows = [
        {
            "intent_id": intent.id,
            "commit_id": commit_id,
            "position": position,
            "channel": intent.channel,
            "intent": json.dumps(intent.to_dict()),
            "state": LEASED,
            "attempts": 1,
            "next_attempt_at": until,
            "lease_owner": owner,
            "lease_expires_at": until,
            "created_at": moment,
        }
        for position, intent in enumerate(durable)
    ]
    store.write(connection, rows)
    # When the lease ends, by this process's clock: read before delivering
    # (a background task may start late), and the mark that the row exists.
    deadline = time.monotonic() + state.outbox_lease
    for intent in durable:
        intent.__dict__[_LEASED_UNTIL] = deadline


_LEASED_UNTIL = "_outbox_leased_until"


Send = t.Callable[["Flask", "State", "list[Intent]", "BatchResult"], None]


def dispatch(
    app: Flask,
    state: State,
    intents: list[Intent],
    result: BatchResult,
    *,
    send: Send = dispatch_batch,
) -> None:
    """Dispatch committed ``intents``; settle the durable ones in the outbox.

    Every delivery mode calls this, in whichever thread it delivers in,
    inside an app context of ``app``.

    :param send: what dispatching means for the mode: calling the channels,
        or publishing to a broker (an intent in ``result.dispatched`` is then
        done, as far as the outbox is concerned).
    """
    durable = _durable(state, intents) if state.durable else []
    if durable:
        durable, intents = _held(app, state, durable, intents, result)
    if not durable:
        send(app, state, intents, result)
        return
    crash = _crash_points.get(app)
    if crash == "after_commit":
        _crash(app)
        other = [intent for intent in intents if intent.channel not in state.durable]
        send(app, state, other, result)
        result.pending.extend(durable)
        return
    if crash == "mid_send":
        first = durable[0]
        sent = [i for i in intents if i.channel not in state.durable or i is first]
        send(app, state, sent, result)
        _crash(app)
        result.pending.extend(durable[1:])
        return
    send(app, state, intents, result)
    if crash == "before_ack":
        _crash(app)
        return
    engine = store.engine_of(state)
    settle_result(app, state, engine, _owner, [(i, 1) for i in durable], result)


def _held(
    app: Flask,
    state: State,
    durable: list[Intent],
    intents: list[Intent],
    result: BatchResult,
) -> tuple[list[Intent], list[Intent]]:
    """The durable intents this process still holds a lease on, and what to send.

    An intent queued after its commit wrote the outbox (by a ``before_commit``
    or ``after_commit`` listener) has no row: it is sent, without the outbox.
    A lease that has run more than half its course (a background task that
    waited in a long queue) is renewed first; what was taken over meanwhile
    is left to the drainer that took it.
    """
    written = [i for i in durable if _LEASED_UNTIL in i.__dict__]
    if len(written) < len(durable):
        late = [i.id for i in durable if _LEASED_UNTIL not in i.__dict__]
        logger.warning(
            "%d durable notification(s) of app %r were queued after their commit"
            " wrote the outbox (by a before_commit or after_commit listener), so"
            " they have no outbox row and are delivered without it: %s.",
            len(late),
            app.name,
            ", ".join(late),
        )
    if not written:
        return written, intents
    deadline = min(i.__dict__[_LEASED_UNTIL] for i in written)
    if time.monotonic() < deadline - state.outbox_lease / 2:
        return written, intents
    lease = state.outbox_lease
    try:
        held = store.renew(
            store.engine_of(state),
            _owner,
            [(i.id, 1) for i in written],
            until=now() + timedelta(seconds=lease),
        )
    except Exception:
        logger.exception(
            "Renewing the outbox lease of %d notification(s) of app %r failed;"
            " they are left to the drainer.",
            len(written),
            app.name,
        )
        held = set()
    renewed = time.monotonic() + lease
    lost = [i for i in written if i.id not in held]
    for intent in written:
        if intent.id in held:
            intent.__dict__[_LEASED_UNTIL] = renewed
    if lost:
        logger.warning(
            "The outbox lease of %d notification(s) of app %r lapsed before"
            " their delivery started (NOTIFYQUEUE_OUTBOX_LEASE=%g s); a drainer"
            " delivers them instead: %s.",
            len(lost),
            app.name,
            lease,
            ", ".join(i.id for i in lost),
        )
        result.pending.extend(lost)
        gone = {i.id for i in lost}
        intents = [i for i in intents if i.id not in gone]
    return [i for i in written if i.id in held], intents


def _durable(state: State, intents: list[Intent]) -> list[Intent]:
    durable = state.durable
    return [intent for intent in intents if intent.channel in durable]


# -- crash points, for tests -----------------------------------------------------

_crash_points: weakref.WeakKeyDictionary[Flask, str] = weakref.WeakKeyDictionary()
_kill: weakref.WeakKeyDictionary[Flask, bool] = weakref.WeakKeyDictionary()


def set_crash_point(app: Flask, point: str | None, *, kill: bool = False) -> None:
    """Arm (or, with ``None``, disarm) a crash point of ``app``'s durable fast path."""
    if point is None:
        _crash_points.pop(app, None)
        _kill.pop(app, None)
        return
    if point not in CRASH_POINTS:
        raise ValueError(
            f"Unknown crash point {point!r}; use one of"
            f" {', '.join(map(repr, CRASH_POINTS))}."
        )
    _crash_points[app] = point
    _kill[app] = kill


def _crash(app: Flask) -> None:
    if _kill.get(app):
        # A real crash: no finally, no atexit, no flush of anything.
        os.kill(os.getpid(), signal.SIGKILL)
