"""Memory: many transactions leave no queue behind, and nothing is kept alive.

A batch lives in ``session.info`` only until its root transaction ends, and an
app's state only in ``app.extensions``: once a transaction has ended nothing of
its batch may remain, and once an app is dropped nothing of it may remain.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import tracemalloc
import types
import typing as t
import weakref

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import scoped_session

from notifyqueue import (
    Channel,
    Intent,
    NotifyQueue,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)

from .helpers import Item, db

NULL = {"null": {"type": "tests.test_memory:NullChannel"}}
WARM_UP = 1_000
TRANSACTIONS = 10_000
GROWTH_LIMIT = 100 * 1024
TAKEN = "taken"
"""An Item name that exists, so that adding it again fails the commit."""

metadata = sa.MetaData()
counters = sa.Table(
    "notifyqueue_memory_counter",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)
# Built once: building a statement per call costs more than the rest of the
# transaction, and tracemalloc multiplies every such cost.
SET_COUNTER = (
    sa.update(counters)
    .where(counters.c.id == sa.bindparam("row"))
    .values(value=sa.bindparam("new_value"))
)

# Made once at import, as an app factory's module makes its extensions.
shared_notify = NotifyQueue()


class NullChannel(Channel):
    """Delivers nowhere and keeps nothing: what stays alive is not the channel's."""

    def send(self, intents: t.Sequence[Intent]) -> None:
        pass


@deferred_notify(null="counter {row} set to {value}")
def set_counter(session: scoped_session[t.Any], row: int, value: int) -> None:
    """Change one row, so each transaction is a real one, and queue an intent."""
    session.execute(SET_COUNTER, {"row": row, "new_value": value})


def create_counter(engine: sa.Engine) -> None:
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(counters).values(id=1, value=0))


def prepare(app: Flask) -> None:
    """Create the counter row, and the Item a failed commit adds again."""
    with app.app_context():
        create_counter(db.engine)
        with db.engine.begin() as connection:
            connection.execute(sa.insert(Item).values(name=TAKEN))


def no_fsync(dbapi_connection: t.Any, connection_record: t.Any) -> None:
    """Let SQLite's COMMIT return without waiting for the disk.

    fsync at each of 10,000 commits would take most of the test's time, and
    durability does not change what is measured here.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


@contextlib.contextmanager
def tracing(frames: int) -> t.Iterator[None]:
    """Trace only what is allocated from now on, ``frames`` frames deep.

    If tracemalloc was already running (``PYTHONTRACEMALLOC``), its traces so
    far are cleared and it keeps running.
    """
    if tracemalloc.is_tracing():
        tracemalloc.clear_traces()
        yield
        return
    tracemalloc.start(frames)
    try:
        yield
    finally:
        tracemalloc.stop()


# --- every way a batch ends --------------------------------------------------
# Each ends the batch that set_counter() and enqueue() began.


def end_by_commit() -> None:
    db.session.commit()


def end_by_finalise() -> None:
    finalise()


def end_by_rollback() -> None:
    db.session.rollback()


def end_by_finalise_rollback() -> None:
    finalise(commit=False)


def end_by_close() -> None:
    db.session.close()


def end_by_savepoints() -> None:
    """One savepoint rolled back and one released inside a committed batch."""
    savepoint = db.session.begin_nested()
    enqueue("null", "dropped with its savepoint")
    savepoint.rollback()
    savepoint = db.session.begin_nested()
    enqueue("null", "kept by its savepoint")
    savepoint.commit()
    db.session.commit()


def end_by_failed_commit() -> None:
    """The commit's flush fails: the exception's traceback holds the batch."""
    db.session.add(Item(name=TAKEN))
    with pytest.raises(sa.exc.IntegrityError):
        finalise()


def end_by_teardown() -> None:
    """Leave the batch pending: the app context's teardown discards it."""


ENDINGS = [
    end_by_commit,
    end_by_finalise,
    end_by_rollback,
    end_by_finalise_rollback,
    end_by_close,
    end_by_savepoints,
    end_by_failed_commit,
    end_by_teardown,
]


def queue_and_end(i: int, end: t.Callable[[], None]) -> None:
    """One real transaction: an UPDATE, two intents, then ``end``."""
    set_counter(db.session, 1, i)
    enqueue("null", "transaction {i}", i=i)
    end()


# --- retained memory ---------------------------------------------------------


def transaction(app: Flask, i: int) -> None:
    """Transaction ``i`` of a rotating mix of every ending."""
    end = ENDINGS[i % len(ENDINGS)]
    if end is end_by_teardown:
        # In an app context of its own, as a request would be: with a session
        # of its own, that teardown removes.
        with app.app_context():
            queue_and_end(i, end)
    else:
        queue_and_end(i, end)


# SQLite only: on PostgreSQL notifyqueue runs the same code (it follows the
# same session events) and retained no more when measured (about 20 KB), but
# the run took half as long again, past a 2-core machine's ~20 s budget. The
# weak reference tests below run on both databases.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ten_thousand_transactions_retain_no_memory(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """10,000 transactions after a warm-up leave under 100 KB allocated.

    tracemalloc starts after the warm-up, so what it still traces at the end
    is what the 10,000 transactions allocated and never freed. One frame per
    trace keeps it fast enough; on failure a short rerun with full tracebacks
    shows where the retained memory was allocated.
    """
    # The forgotten-commit warnings of the close and teardown endings would
    # pile up in pytest's log capture, which is not notifyqueue's memory.
    caplog.set_level(logging.ERROR, logger="notifyqueue")
    app = make_app(NOTIFYQUEUE_CHANNELS=NULL)
    with app.app_context():
        sa.event.listen(db.engine, "connect", no_fsync)
        db.engine.dispose()  # so that the pooled connection runs it too
    prepare(app)
    with app.app_context():
        for i in range(WARM_UP):
            transaction(app, i)
        gc.collect()
        with tracing(frames=1):
            for i in range(WARM_UP, WARM_UP + TRANSACTIONS):
                transaction(app, i)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0]
        print(f"{TRANSACTIONS} transactions retained {growth} bytes")
        if growth >= GROWTH_LIMIT:
            pytest.fail(
                f"{TRANSACTIONS} transactions left {growth} bytes allocated;"
                f" what 400 more leave, by traceback:\n{traced_growth(app)}"
            )
        assert db.session.info.get("notifyqueue.batch") is None


def traced_growth(app: Flask) -> str:
    """The tracebacks of what 400 more transactions leave allocated."""
    with tracing(frames=8):
        for i in range(400):
            transaction(app, i)
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    lines = []
    for stat in snapshot.statistics("traceback")[:5]:
        lines.append(f"{stat.size} B in {stat.count} blocks, allocated at:")
        lines.extend(stat.traceback.format(limit=8, most_recent_first=True))
    return "\n".join(lines)


# --- nothing kept alive ------------------------------------------------------


class QueuedIntents:
    """Weak references to every intent queued while it is connected."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Intent]] = []

    def __call__(self, sender: Flask, *, intent: Intent) -> None:
        self.refs.append(weakref.ref(intent))

    def count_alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


def holders(obj: object, depth: int = 5) -> str:
    """What keeps ``obj`` alive, referrer by referrer, to name the culprit.

    The walk stops at a module's globals: that module is the culprit.
    """
    modules = {id(vars(m)): name for name, m in list(sys.modules.items()) if m}
    lines: list[str] = []
    seen = {id(obj)}

    def walk(target: object, level: int) -> None:
        referrers = gc.get_referrers(target)
        seen.add(id(referrers))
        for referrer in referrers:
            if isinstance(referrer, types.FrameType) or id(referrer) in seen:
                continue
            seen.add(id(referrer))
            indent = "  " * (level + 1)
            if id(referrer) in modules:
                lines.append(f"{indent}the globals of module {modules[id(referrer)]}")
                continue
            text = repr(referrer)
            if len(text) > 120:
                text = text[:120] + "..."
            lines.append(f"{indent}{type(referrer).__qualname__}: {text}")
            if level < depth:
                walk(referrer, level + 1)

    walk(obj, 0)
    return "\n".join(lines)


def assert_dead(refs: dict[str, weakref.ref[t.Any]]) -> None:
    """After a full collection, every referent is gone; else say who holds it."""
    gc.collect()
    report = []
    for name, ref in refs.items():
        obj = ref()
        if obj is not None:
            report.append(f"{name} {obj!r} is held by:\n{holders(obj)}")
        del obj
    if report:
        pytest.fail("still alive after gc.collect():\n" + "\n".join(report))


@pytest.mark.parametrize(
    "end", ENDINGS, ids=lambda end: end.__name__.removeprefix("end_by_")
)
def test_no_intent_or_session_outlives_its_batch(
    make_app: t.Callable[..., Flask], end: t.Callable[[], None]
) -> None:
    """However a batch ends, its intents and its session can then be collected."""
    app = make_app(NOTIFYQUEUE_CHANNELS=NULL)
    prepare(app)
    queued = QueuedIntents()
    with signals.intent_queued.connected_to(queued, sender=app):
        with app.app_context():
            session = weakref.ref(db.session())
            set_counter(db.session, 1, 1)
            enqueue("null", "enqueued")
            gc.collect()
            # The batch holds them until it ends, so the weak refs can tell.
            assert queued.count_alive() == 2
            end()
        assert_dead(
            {
                "session": session,
                **{f"intent {i}": r for i, r in enumerate(queued.refs)},
            }
        )


def test_a_batch_result_holds_its_intents_until_the_caller_drops_it(
    make_app: t.Callable[..., Flask],
) -> None:
    """finalise() hands the intents to the caller; the caller alone keeps them."""
    app = make_app(NOTIFYQUEUE_CHANNELS=NULL)
    prepare(app)
    with app.app_context():
        set_counter(db.session, 1, 1)
        savepoint = db.session.begin_nested()
        enqueue("null", "dropped with its savepoint")
        savepoint.rollback()
        result = finalise()
        assert len(result.dispatched) == 1 and len(result.discarded) == 1
        refs = {
            "dispatched": weakref.ref(result.dispatched[0]),
            "discarded": weakref.ref(result.discarded[0]),
        }
        gc.collect()
        assert all(ref() is not None for ref in refs.values())
        del result
        assert_dead(refs)

        set_counter(db.session, 1, 2)
        result = finalise(commit=False)
        refs = {"rolled back": weakref.ref(result.discarded[0])}
        gc.collect()
        assert refs["rolled back"]() is not None
        del result
        assert_dead(refs)


def use_and_drop_an_app(
    url: str, sqlalchemy: SQLAlchemy, notify: NotifyQueue
) -> dict[str, weakref.ref[t.Any]]:
    """Make an app, queue, commit, dispatch and tear down; return weak refs only."""
    app = Flask("dropped_app")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        NOTIFYQUEUE_CHANNELS={**NULL, "log": {"type": "log"}},
    )
    sqlalchemy.init_app(app)
    notify.init_app(app)
    state = app.extensions["notifyqueue"]
    refs: dict[str, weakref.ref[t.Any]] = {
        "app": weakref.ref(app),
        "NotifyQueue state": weakref.ref(state),
        **{f"channel {name}": weakref.ref(c) for name, c in state.channels.items()},
    }
    del state
    queued = QueuedIntents()
    with signals.intent_queued.connected_to(queued, sender=app):
        with app.app_context():
            create_counter(sqlalchemy.engine)
            refs["session"] = weakref.ref(sqlalchemy.session())
            refs["session class"] = weakref.ref(type(sqlalchemy.session()))
            set_counter(sqlalchemy.session, 1, 1)
            enqueue("log", "committed")
            assert finalise().dispatched
            set_counter(sqlalchemy.session, 1, 2)
            enqueue("log", "rolled back")
            sqlalchemy.session.rollback()
            set_counter(sqlalchemy.session, 1, 3)
            enqueue("log", "discarded at teardown")
    with app.app_context():
        for engine in sqlalchemy.engines.values():
            engine.dispose()
    assert len(queued.refs) == 6
    refs.update((f"intent {i}", ref) for i, ref in enumerate(queued.refs))
    return refs


def test_a_dropped_app_leaves_nothing_alive(database_url: str) -> None:
    """An app made with its own extensions, then dropped, is collected whole."""
    refs = use_and_drop_an_app(database_url, SQLAlchemy(), NotifyQueue())
    assert_dead(refs)


def test_long_lived_extension_objects_keep_no_dropped_app_alive(
    database_url: str,
) -> None:
    """Module-level SQLAlchemy() and NotifyQueue() objects outlive many apps.

    The session class is left out: it belongs to the SQLAlchemy object, which
    lives on.
    """
    refs = use_and_drop_an_app(database_url, db, shared_notify)
    del refs["session class"]
    assert_dead(refs)


@contextlib.contextmanager
def _collector_off() -> t.Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_queueing_and_delivering_leave_no_reference_cycles(
    make_app: t.Callable[..., Flask],
) -> None:
    """What refcounting frees at once costs nothing later: a cycle (a frame
    kept in its own local variable, say) would hold a request's whole stack
    until the garbage collector found it."""
    app = make_app(
        MAIL_SUPPRESS_SEND=True,
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "logger": "tests.memory.cycles"},
            "mail": {"type": "mail", "recipients": ["a@example.com"]},
            "null": NULL["null"],
        },
    )
    logger = logging.getLogger("tests.memory.cycles")
    handler = logging.NullHandler()
    logger.addHandler(handler)

    @deferred_notify(log="saved {name}", mail={"subject": "Saved", "body": "{name}"})
    def save(name: str) -> None:
        pass

    @deferred_notify(null="saved {name}")
    def save_quietly(name: str) -> None:
        pass

    def transaction(number: int) -> None:
        save(f"a{number}")  # the usual call, two channels
        save_quietly(f"b{number}")  # the usual call, one channel
        save(f"c{number}", notify=True)  # the general path
        enqueue("null", "enqueued {n}", n=number)
        assert finalise().ok

    try:
        with app.app_context():
            transaction(0)  # first calls: what is made once
            with _collector_off():
                gc.collect()
                for number in range(1, 51):
                    transaction(number)
                unreachable = gc.collect()
    finally:
        logger.removeHandler(handler)
    assert unreachable == 0
