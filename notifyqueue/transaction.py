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

Each intent also belongs to the app context it was queued in: when that
context ends without committing, only its own intents are dropped, even if
the session (a thread-local ``scoped_session``) lives on.
"""

from __future__ import annotations

import logging
import typing as t
import weakref
from functools import partial

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, scoped_session, sessionmaker

from . import signals
from .context import current_context
from .delivery import before_commit, deliver_committed
from .dispatch import send_isolated
from .errors import ConfigurationError, LifecycleError
from .intent import BatchResult, Intent

if t.TYPE_CHECKING:
    from flask import Flask
    from flask.ctx import AppContext

BATCH_KEY = "notifyqueue.batch"
"""The key of a session's batch in ``session.info``."""

logger = logging.getLogger("notifyqueue")

# Endings that are almost always a forgotten commit, warned about: reason ->
# how the warning says it.
_FORGOTTEN = {
    "close": "by close() or remove()",
    "teardown": "at the end of its app context",
}


class _Batch:
    """The intents of one session's current (or next) root transaction."""

    __slots__ = (
        "app",
        "intents",
        "owners",
        "marks",
        "rolled_back_savepoints",
        "discarded",
        "committed",
        "committing",
        "rolled_back",
        "waiting",
        "result",
    )

    def __init__(self, app: Flask | None) -> None:
        self.app = app
        self.intents: list[Intent] = []
        # (app context, index of its first intent), one entry each time the
        # queueing context changes. Contexts nest, so what a context queued is
        # always the batch's tail when it ends.
        self.owners: list[tuple[AppContext | None, int]] = []
        # Savepoint -> how many intents were queued when it began.
        self.marks: dict[SessionTransaction, int] = {}
        self.rolled_back_savepoints: set[SessionTransaction] = set()
        self.discarded: list[Intent] = []
        self.committed: SessionTransaction | None = None
        self.committing = False
        self.rolled_back = False
        # Queued outside any transaction by a session without autobegin.
        self.waiting = False
        self.result: BatchResult | None = None


def add_intents(
    session: Session, app: Flask, intents: list[Intent], owner: AppContext | None
) -> None:
    """Append rendered intents to the session's batch, creating it if needed.

    Like ``session.add()``, queueing begins the session's transaction if none
    is in progress (no connection is taken until SQL runs), so a rollback,
    ``close()`` or ``remove()`` that follows ends the batch with it. A session
    with ``autobegin=False`` is left alone: its intents wait for the
    transaction it begins next, unless it is closed or rolled back first.

    :param owner: the app context they were queued in (:func:`current_context`).
    """
    batch = session.info.get(BATCH_KEY)
    # The usual call: the session already holds this app's batch, with an
    # open transaction (a batch exists only inside one, or while it waits
    # for one: ``waiting``), and this app context queued its last intents.
    # Nothing to begin, create or record but the intents themselves.
    if batch is not None and batch.app is app and not batch.waiting:
        owners = batch.owners
        if owners and owners[-1][0] is owner:
            batch.intents.extend(intents)
            return
    _add_intents(session, app, intents, owner)


def _add_intents(
    session: Session, app: Flask, intents: list[Intent], owner: AppContext | None
) -> None:
    waiting = not session.in_transaction()
    if waiting and session.autobegin:
        session.begin()
        waiting = False
    batch = session.info.get(BATCH_KEY)
    if batch is None:
        batch = session.info[BATCH_KEY] = _Batch(app)
    elif batch.app is not app:
        if batch.app is not None:
            raise LifecycleError(
                f"This session already holds notifications of app {batch.app.name!r};"
                f" app {app.name!r} cannot join its transaction. Give each app a"
                " session of its own."
            )
        batch.app = app
    owners = batch.owners
    if not owners or owners[-1][0] is not owner:
        owners.append((owner, len(batch.intents)))
    batch.intents.extend(intents)
    if waiting and not batch.waiting:
        _wait_for_a_transaction(session, batch)


def current_batch(session: Session) -> _Batch | None:
    """Return the batch the session's current or next transaction carries."""
    return session.info.get(BATCH_KEY)


# App contexts whose teardown has begun: a session closed meanwhile (by
# Flask-SQLAlchemy's own teardown, say) discards its batch as "teardown".
_ending: weakref.WeakSet[AppContext] = weakref.WeakSet()


def begin_teardown() -> None:
    """Note that the current app context has begun its teardown."""
    context = current_context()
    if context is not None:
        _ending.add(context)


def end_teardown(session: Session | None) -> None:
    """The current app context's teardown is over: drop what it queued.

    Only the intents queued while this context was current go (reason
    ``teardown``): an outer context of the same app keeps its own, and what
    the app's teardown functions committed was dispatched already.
    """
    context = current_context()
    try:
        if session is not None:
            _discard_owned(session, context, "teardown")
    finally:
        if context is not None:
            _ending.discard(context)


def _discard_owned(session: Session, owner: AppContext | None, reason: str) -> None:
    batch: _Batch | None = session.info.get(BATCH_KEY)
    if batch is None:
        return
    position = next(
        (i for i, (context, _) in enumerate(batch.owners) if context is owner), None
    )
    if position is None:
        return
    start = batch.owners[position][1]
    dropped = batch.intents[start:]
    del batch.intents[start:]
    del batch.owners[position:]
    # A savepoint begun inside the ending context may outlive it: it now
    # starts where the remaining intents end.
    for savepoint, mark in batch.marks.items():
        if mark > start:
            batch.marks[savepoint] = start
    if not batch.intents and not batch.marks:
        _pop_batch(session)
    _report_discarded(batch.app, dropped, reason)


def _pop_batch(session: Session) -> _Batch | None:
    batch: _Batch | None = session.info.pop(BATCH_KEY, None)
    if batch is not None and batch.waiting:
        _stop_waiting(session, batch)
    return batch


# SQLAlchemy fires no event when close() or rollback() find no transaction,
# so while a batch waits outside one, the session's own methods end it.
_ENDINGS = (
    ("close", "close"),
    ("reset", "close"),
    ("invalidate", "close"),
    ("rollback", "rollback"),
)


def _wait_for_a_transaction(session: Session, batch: _Batch) -> None:
    batch.waiting = True
    ref = weakref.ref(session)
    for name, reason in _ENDINGS:
        if hasattr(type(session), name):  # reset() is new in SQLAlchemy 2.0.22
            setattr(session, name, partial(_end_waiting, ref, name, reason))


def _stop_waiting(session: Session, batch: _Batch) -> None:
    batch.waiting = False
    for name, _ in _ENDINGS:
        vars(session).pop(name, None)


def _end_waiting(
    ref: weakref.ref[Session], name: str, reason: str, *args: t.Any, **kwargs: t.Any
) -> t.Any:
    session = ref()
    if session is None:  # pragma: no cover - a bound call keeps it alive
        return None
    batch = _pop_batch(session)
    if batch is not None:
        _discard(batch, reason)
    return getattr(session, name)(*args, **kwargs)


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
    if any(issubclass(cls, watched) for watched in _watched):
        return  # a class's listeners act on its subclasses' sessions too
    # Listen on the base alone, or a subclass's sessions would see every
    # event twice.
    for subclass in [watched for watched in _watched if issubclass(watched, cls)]:
        for name, listener in _LISTENERS:
            event.remove(subclass, name, listener)
        _watched.discard(subclass)
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
        batch = session.info.get(BATCH_KEY)
        if batch is None:
            batch = session.info[BATCH_KEY] = _Batch(None)
        batch.marks[transaction] = len(batch.intents)
    elif transaction.parent is None:
        batch = session.info.get(BATCH_KEY)
        if batch is not None and batch.waiting:
            _stop_waiting(session, batch)  # it has its transaction now


def _on_before_commit(session: Session) -> None:
    batch = session.info.get(BATCH_KEY)
    if batch is not None and not session.in_nested_transaction():
        batch.committing = True
        if batch.intents:
            before_commit(session, batch.app, batch.intents)


def _on_after_commit(session: Session) -> None:
    batch = session.info.get(BATCH_KEY)
    if batch is None:
        # Recorded even with nothing queued: another after_commit listener,
        # run after this one, may queue, and that joins this commit too.
        batch = session.info[BATCH_KEY] = _Batch(None)
    # A savepoint release fires this too: record which transaction it was.
    batch.committed = session.get_nested_transaction() or session.get_transaction()


def _on_after_rollback(session: Session) -> None:
    batch = session.info.get(BATCH_KEY)
    if batch is None:
        return
    savepoint = session.get_nested_transaction()
    if savepoint is None:
        batch.rolled_back = True
    else:
        batch.rolled_back_savepoints.add(savepoint)


def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        _end_savepoint(session, transaction)
        return
    if transaction.parent is not None:
        return  # a flush's subtransaction
    batch = _pop_batch(session)
    if batch is None:
        return
    if transaction is batch.committed:
        if batch.intents or batch.discarded:
            batch.result = deliver_committed(batch.app, batch.intents, batch.discarded)
    else:
        if batch.committing:
            reason = "commit failed"
        elif batch.rolled_back:
            reason = "rollback"
        elif current_context() in _ending:
            reason = "teardown"
        else:
            reason = "close"
        _discard(batch, reason)


def _end_savepoint(session: Session, transaction: SessionTransaction) -> None:
    batch = session.info.get(BATCH_KEY)
    if batch is None:
        return
    mark = batch.marks.pop(transaction, None)
    if mark is None or transaction is batch.committed:
        return  # released: its intents wait for the root commit
    if transaction not in batch.rolled_back_savepoints:
        # Ended with the whole session (close(), remove()) and never rolled
        # back on its own: the root's end discards its intents with the rest,
        # under that ending's reason.
        return
    batch.rolled_back_savepoints.discard(transaction)
    dropped = batch.intents[mark:]
    if dropped:
        del batch.intents[mark:]
        batch.discarded.extend(dropped)
        owners = batch.owners
        while owners and owners[-1][1] >= mark:
            owners.pop()
        _report_discarded(batch.app, dropped, "savepoint rollback")


def _discard(batch: _Batch, reason: str) -> None:
    batch.result = BatchResult(
        committed=False, discarded=batch.discarded + batch.intents
    )
    _report_discarded(batch.app, list(batch.intents), reason)


def _report_discarded(app: Flask | None, intents: list[Intent], reason: str) -> None:
    """Send ``batch_discarded`` for dropped intents, warning if it was no rollback."""
    if not intents:
        return
    _warn_forgotten(intents, reason)
    if app is not None:
        send_isolated(signals.batch_discarded, app, intents=intents, reason=reason)


def _warn_forgotten(intents: list[Intent], reason: str) -> None:
    """Log intents dropped by ``close()`` or teardown, naming who queued them.

    A rollback is deliberate; a batch that ends with its session or app
    context is almost always a commit the code forgot.
    """
    ending = _FORGOTTEN.get(reason)
    if ending is None:
        return
    counts: dict[tuple[str, str], int] = {}
    for intent in intents:
        source = intent.source
        caller = intent.__dict__.get("_caller")
        if caller is not None:
            source = f"{source} in {caller[0]}.{caller[1]}"
        key = (intent.channel, source)
        counts[key] = counts.get(key, 0) + 1
    queued_by = "; ".join(
        f"{channel} from {source}" + (f" ({count} intents)" if count > 1 else "")
        for (channel, source), count in counts.items()
    )
    logger.warning(
        "%d notification(s) discarded %s without a commit; did the code forget"
        " to commit? Queued by: %s.",
        len(intents),
        ending,
        queued_by,
    )


_LISTENERS: tuple[tuple[str, t.Callable[..., None]], ...] = (
    ("after_transaction_create", _on_transaction_create),
    ("before_commit", _on_before_commit),
    ("after_commit", _on_after_commit),
    ("after_rollback", _on_after_rollback),
    ("after_transaction_end", _on_transaction_end),
)
