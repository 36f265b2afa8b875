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
import os
import signal
import socket
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


def dispatch(
    app: Flask, state: State, intents: list[Intent], result: BatchResult
) -> None:
    """Dispatch committed ``intents``; settle the durable ones in the outbox.

    Every delivery mode calls this, in whichever thread it delivers in,
    inside an app context of ``app``.
    """
    durable = _durable(state, intents) if state.durable else []
    if not durable:
        dispatch_batch(app, state, intents, result)
        return
    crash = _crash_points.get(app)
    if crash == "after_commit":
        _crash(app)
        other = [intent for intent in intents if intent.channel not in state.durable]
        dispatch_batch(app, state, other, result)
        result.pending.extend(durable)
        return
    if crash == "mid_send":
        first = durable[0]
        sent = [i for i in intents if i.channel not in state.durable or i is first]
        dispatch_batch(app, state, sent, result)
        _crash(app)
        result.pending.extend(durable[1:])
        return
    dispatch_batch(app, state, intents, result)
    if crash == "before_ack":
        _crash(app)
        return
    engine = store.engine_of(state)
    settle_result(app, state, engine, _owner, [(i, 1) for i in durable], result)


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
