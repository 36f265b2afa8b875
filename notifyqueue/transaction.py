"""Following a session's transactions: which intents belong to which, and when they end.

A session's pending intents live in ``session.info`` as a :class:`_Batch`.
SQLAlchemy's events say what became of each transaction:

- ``after_commit`` fires for a root COMMIT *and* for a savepoint RELEASE, so it
  only records which transaction committed; nothing is dispatched there (the
  session is still in its "committed" state, where no SQL may run).
- ``after_transaction_end`` fires for every end, commit or not, including
  ``close()`` and ``scoped_session.remove()``, which fire no rollback event.
  A root end dispatches (if it committed) or discards the batch; a savepoint
  end that did not release drops the intents queued since it began.
- Flushes open inner subtransactions (neither root nor savepoint); they are
  ignored.
"""

from __future__ import annotations

import typing as t
import weakref

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, scoped_session, sessionmaker

from . import signals
from .dispatch import dispatch_committed, send_isolated
from .errors import ConfigurationError, LifecycleError
from .intent import BatchResult, Intent

if t.TYPE_CHECKING:
    from flask import Flask

_KEY = "notifyqueue.batch"


class _Batch:
    """The intents of one session's current (or next) root transaction."""

    __slots__ = (
        "app",
        "intents",
        "marks",
        "discarded",
        "committed",
        "committing",
        "rolled_back",
        "result",
    )

    def __init__(self, app: Flask | None) -> None:
        self.app = app
        self.intents: list[Intent] = []
        # Savepoint -> how many intents were queued when it began.
        self.marks: dict[SessionTransaction, int] = {}
        self.discarded: list[Intent] = []
        self.committed: SessionTransaction | None = None
        self.committing = False
        self.rolled_back = False
        self.result: BatchResult | None = None


def add_intents(session: Session, app: Flask, intents: list[Intent]) -> None:
    """Append rendered intents to the session's batch, creating it if needed.

    Like ``session.add()``, queueing begins the session's transaction if none
    is in progress (no connection is taken until SQL runs), so a rollback,
    ``close()`` or ``remove()`` that follows ends the batch with it. A session
    with ``autobegin=False`` is left alone: its intents wait for the
    transaction it begins next.
    """
    if session.autobegin and not session.in_transaction():
        session.begin()
    batch = session.info.get(_KEY)
    if batch is None:
        batch = session.info[_KEY] = _Batch(app)
    elif batch.app is not app:
        if batch.app is not None:
            raise LifecycleError(
                f"This session already holds notifications of app {batch.app.name!r};"
                f" app {app.name!r} cannot join its transaction. Give each app a"
                " session of its own."
            )
        batch.app = app
    batch.intents.extend(intents)


def current_batch(session: Session) -> _Batch | None:
    """Return the batch the session's current or next transaction carries."""
    return session.info.get(_KEY)


def discard_pending(session: Session, reason: str, app: Flask) -> BatchResult | None:
    """End the session's batch of ``app`` now, without dispatch.

    Whatever the session's transaction does next, these intents are gone.
    """
    batch: _Batch | None = session.info.get(_KEY)
    if batch is None or batch.app not in (None, app):
        return None
    del session.info[_KEY]
    if batch.marks:
        # The transaction goes on with savepoints still open: what is queued
        # next inside one of them must still go if that savepoint rolls back.
        successor = session.info[_KEY] = _Batch(None)
        successor.marks = dict.fromkeys(batch.marks, 0)
    _discard(batch, reason)
    return batch.result


def watch(session: scoped_session[t.Any]) -> None:
    """Listen to ``session``'s transaction events, once per session class."""
    cls = _session_class(session)
    if cls is None:
        raise ConfigurationError(
            f"Cannot follow the transactions of {session!r}: its session factory"
            " is neither a sessionmaker nor a Session subclass. Pass a"
            " scoped_session built on a sessionmaker or a Session subclass."
        )
    # Not event.contains(): SQLAlchemy keys it on id(target), and a new
    # sessionmaker's class often reuses the address of a collected one, which
    # would then look watched already.
    if cls in _watched:
        return
    for name, listener in _LISTENERS:
        event.listen(cls, name, listener)
    _watched.add(cls)


def _session_class(session: scoped_session[t.Any]) -> type[Session] | None:
    factory: object = session.session_factory
    if isinstance(factory, sessionmaker):
        factory = factory.class_
    if isinstance(factory, type) and issubclass(factory, Session):
        return factory
    return None


_watched: weakref.WeakSet[type[Session]] = weakref.WeakSet()


def _on_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        batch = session.info.get(_KEY)
        if batch is None:
            batch = session.info[_KEY] = _Batch(None)
        batch.marks[transaction] = len(batch.intents)


def _on_before_commit(session: Session) -> None:
    batch = session.info.get(_KEY)
    if batch is not None and not session.in_nested_transaction():
        batch.committing = True


def _on_after_commit(session: Session) -> None:
    batch = session.info.get(_KEY)
    if batch is not None:
        # A savepoint release fires this too: record which transaction it was.
        batch.committed = session.get_nested_transaction() or session.get_transaction()


def _on_after_rollback(session: Session) -> None:
    batch = session.info.get(_KEY)
    if batch is not None and not session.in_nested_transaction():
        batch.rolled_back = True


def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        _end_savepoint(session, transaction)
        return
    if transaction.parent is not None:
        return  # a flush's subtransaction
    batch = session.info.pop(_KEY, None)
    if batch is None:
        return
    if transaction is batch.committed:
        batch.result = dispatch_committed(batch.app, batch.intents, batch.discarded)
    else:
        if batch.committing:
            reason = "commit failed"
        elif batch.rolled_back:
            reason = "rollback"
        else:
            reason = "close"
        _discard(batch, reason)


def _end_savepoint(session: Session, transaction: SessionTransaction) -> None:
    batch = session.info.get(_KEY)
    if batch is None:
        return
    mark = batch.marks.pop(transaction, None)
    if mark is None or transaction is batch.committed:
        return  # released: its intents wait for the root commit
    dropped = batch.intents[mark:]
    if dropped:
        del batch.intents[mark:]
        batch.discarded.extend(dropped)
        if batch.app is not None:
            send_isolated(
                signals.batch_discarded,
                batch.app,
                intents=dropped,
                reason="savepoint rollback",
            )


def _discard(batch: _Batch, reason: str) -> None:
    batch.result = BatchResult(
        committed=False, discarded=batch.discarded + batch.intents
    )
    if batch.intents and batch.app is not None:
        send_isolated(
            signals.batch_discarded,
            batch.app,
            intents=list(batch.intents),
            reason=reason,
        )


_LISTENERS: tuple[tuple[str, t.Callable[..., None]], ...] = (
    ("after_transaction_create", _on_transaction_create),
    ("before_commit", _on_before_commit),
    ("after_commit", _on_after_commit),
    ("after_rollback", _on_after_rollback),
    ("after_transaction_end", _on_transaction_end),
)
