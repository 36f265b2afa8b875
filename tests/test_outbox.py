"""The durable outbox's rules, in-process, on SQLite and PostgreSQL.

The write path inside the COMMIT, the transaction rules for durable
channels, retries and their backoff, the drainer's claims and grouping, the
fencing of every settle statement, the crash points, and durable background
delivery. Crash tests with real processes live elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import typing as t
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import Flask

import notifyqueue.outbox
from notifyqueue import (
    ConfigurationError,
    DeliveryError,
    DeliveryFailure,
    Intent,
    NotifyQueue,
    OutboxError,
    PayloadError,
    PermanentFailure,
    TransientFailure,
    UncertainFailure,
    enqueue,
    signals,
    testing,
)
from notifyqueue.outbox import TABLE_NAME, DrainStats, fast_path, store, table

from .helpers import Item, RecordingChannel, db

FLAKY = "tests.test_outbox:FlakyChannel"
MARGIN = timedelta(milliseconds=100)
"""Slack for the clock readings around a call, never for the rule itself."""


class FlakyChannel(RecordingChannel):
    """A recording channel that fails the payloads it is told to, by kind.

    :attr faults: payload -> the :class:`DeliveryFailure` subclass it fails
        with (reported in a :class:`DeliveryError`, so the rest deliver).
    :attr calls: each ``send()`` call's payloads.
    :attr journal: ``(channel name, payloads)`` per ``send()``; share one list
        between channels to see the order across them.
    :attr during_send: called with the batch inside ``send()``, first.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.faults: dict[t.Any, type[DeliveryFailure]] = {}
        self.calls: list[list[t.Any]] = []
        self.journal: list[tuple[str, list[t.Any]]] = []
        self.during_send: t.Callable[[t.Sequence[Intent]], None] | None = None

    def send(self, intents: t.Sequence[Intent]) -> None:
        payloads = [intent.payload for intent in intents]
        self.calls.append(payloads)
        self.journal.append((self.name, payloads))
        if self.during_send is not None:
            self.during_send(intents)
        failures: dict[str, BaseException] = {
            intent.id: self.faults[intent.payload](
                f"{self.name} refused {intent.payload!r}"
            )
            for intent in intents
            if intent.payload in self.faults
        }
        self.batches.append([i for i in intents if i.id not in failures])
        if failures:
            raise DeliveryError(failures)


class ObjectChannel(FlakyChannel):
    """Renders a payload that JSON cannot hold."""

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> t.Any:
        return {"text": str(template), "handle": object()}


def channels(**rec_options: t.Any) -> dict[str, dict[str, t.Any]]:
    """``rec`` and ``other`` durable, ``plain`` not; ``rec_options`` go to rec."""
    return {
        "rec": {"type": FLAKY, "durable": True, **rec_options},
        "other": {"type": FLAKY, "durable": True},
        "plain": {"type": FLAKY},
    }


def _drop_outbox(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # A connection left in a transaction by a failed test must not
            # hang the run.
            connection.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
        notifyqueue.outbox.metadata.drop_all(connection)


@pytest.fixture
def make_durable(
    make_app: t.Callable[..., Flask],
) -> t.Iterator[t.Callable[..., Flask]]:
    """Build an app (default channels: :func:`channels`) with a fresh outbox.

    ``table=False`` leaves the outbox table out. The PostgreSQL schema lives
    for the whole run, so the table is dropped before and after each test.
    """
    engines: list[sa.Engine] = []

    def factory(*, table: bool = True, **config: t.Any) -> Flask:
        config.setdefault("NOTIFYQUEUE_CHANNELS", channels())
        app = make_app(**config)
        with app.app_context():
            engine = db.engine
        engines.append(engine)
        _drop_outbox(engine)
        if table:
            notifyqueue.outbox.create(engine)
        return app

    yield factory
    for engine in engines:
        _drop_outbox(engine)


def channel(app: Flask, name: str = "rec") -> FlakyChannel:
    found = app.extensions["notifyqueue"].channels[name]
    assert isinstance(found, FlakyChannel)
    return found


def clock() -> datetime:
    return datetime.now(timezone.utc)


def outbox_rows(engine: sa.Engine) -> list[dict[str, t.Any]]:
    """Every outbox row, read on a connection of its own, in commit order."""
    with engine.connect() as connection:
        return [
            dict(row._mapping)
            for row in connection.execute(
                sa.select(table).order_by(table.c.created_at, table.c.position)
            )
        ]


def payload(row: dict[str, t.Any]) -> t.Any:
    return json.loads(row["intent"])["payload"]


def only_row(engine: sa.Engine) -> dict[str, t.Any]:
    rows = outbox_rows(engine)
    assert len(rows) == 1, rows
    return rows[0]


def update_rows(engine: sa.Engine, *where: t.Any, **values: t.Any) -> None:
    with engine.begin() as connection:
        connection.execute(sa.update(table).where(*where).values(**values))


_OUTBOX_INSERT = re.compile(rf'\s*INSERT\s+INTO\s+"?{TABLE_NAME}\b', re.IGNORECASE)


@contextlib.contextmanager
def outbox_inserts(engine: sa.Engine) -> t.Iterator[list[str]]:
    """Each INSERT statement into the outbox that ``engine`` executes.

    ``before_cursor_execute`` fires once per ``execute()`` or
    ``executemany()`` call on the DBAPI cursor.
    """
    seen: list[str] = []

    def listener(
        connection: sa.Connection,
        cursor: t.Any,
        statement: str,
        parameters: t.Any,
        context: t.Any,
        executemany: bool,
    ) -> None:
        if _OUTBOX_INSERT.match(statement):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)


@contextlib.contextmanager
def recorded(signal: t.Any) -> t.Iterator[list[dict[str, t.Any]]]:
    """The keyword arguments of each sending of ``signal``."""
    seen: list[dict[str, t.Any]] = []

    def receiver(sender: Flask, **kwargs: t.Any) -> None:
        seen.append(kwargs)

    with signal.connected_to(receiver):
        yield seen


def expired(app: Flask) -> datetime:
    """A moment at which every lease taken until now has expired."""
    lease = app.extensions["notifyqueue"].outbox_lease
    return clock() + timedelta(seconds=lease + 1)


# 1. The write path


def test_one_insert_per_committing_root_transaction_whatever_the_intents(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with app.app_context(), outbox_inserts(db.engine) as inserts:
        db.session.add(Item(name="a"))
        for number in range(5):
            enqueue("rec", f"r{number}")
        savepoint = db.session.begin_nested()
        for number in range(3):
            enqueue("other", f"o{number}")
        savepoint.commit()
        enqueue("plain", "not durable")
        db.session.commit()
        assert len(inserts) == 1
        assert channel(app).sent == [f"r{n}" for n in range(5)]
        assert channel(app, "other").sent == ["o0", "o1", "o2"]
        db.session.add(Item(name="b"))
        enqueue("rec", "second commit")
        db.session.commit()
        assert len(inserts) == 2


def test_a_commit_without_durable_intents_inserts_nothing(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with app.app_context(), outbox_inserts(db.engine) as inserts:
        db.session.add(Item(name="a"))
        enqueue("plain", "not durable")
        db.session.commit()
        db.session.add(Item(name="b"))
        db.session.commit()
        assert channel(app, "plain").sent == ["not durable"]
        assert inserts == []
        assert outbox_rows(db.engine) == []


def test_rows_are_leased_to_this_process_while_the_fast_path_sends(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_LEASE=45)
    seen: list[dict[str, t.Any]] = []
    rec = channel(app)
    with app.app_context():
        rec.during_send = lambda intents: seen.extend(outbox_rows(db.engine))
        first = enqueue("rec", "one")
        second = enqueue("rec", "two")
        before = clock()
        db.session.commit()
        after = clock()
    assert first is not None and second is not None
    assert [row["intent_id"] for row in seen] == [first.id, second.id]
    assert [json.loads(row["intent"]) for row in seen] == [
        first.to_dict(),
        second.to_dict(),
    ]
    assert [row["position"] for row in seen] == [0, 1]
    assert len({row["commit_id"] for row in seen}) == 1
    for row in seen:
        assert row["channel"] == "rec"
        assert row["state"] == "leased"
        assert row["lease_owner"] == fast_path.process_owner()
        assert row["attempts"] == 1
        assert before <= row["created_at"] <= after
        assert row["lease_expires_at"] == row["created_at"] + timedelta(seconds=45)
        assert row["next_attempt_at"] == row["lease_expires_at"]
        assert row["finished_at"] is None and row["last_error"] is None


def test_delivered_rows_are_deleted_when_nothing_is_retained(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=0)
    seen: list[int] = []
    with app.app_context():
        channel(app).during_send = lambda intents: seen.append(
            len(outbox_rows(db.engine))
        )
        enqueue("rec", "one")
        enqueue("rec", "two")
        db.session.commit()
        assert seen == [2]
        assert channel(app).sent == ["one", "two"]
        assert outbox_rows(db.engine) == []


def test_delivered_rows_are_kept_done_when_retained(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context():
        enqueue("rec", "one")
        enqueue("rec", "two")
        before = clock()
        db.session.commit()
        after = clock()
        rows = outbox_rows(db.engine)
    assert [payload(row) for row in rows] == ["one", "two"]
    for row in rows:
        assert row["state"] == "done"
        assert before <= row["finished_at"] <= after
        assert row["attempts"] == 1
        assert row["lease_owner"] is None and row["lease_expires_at"] is None
        assert row["last_error"] is None


# 2. Transaction rules: no row for anything that did not commit
# (RETAIN keeps delivered rows, so a missing row is a row never written).


def test_a_rolled_back_transaction_writes_no_row(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context(), outbox_inserts(db.engine) as inserts:
        db.session.add(Item(name="a"))
        enqueue("rec", "rolled back")
        db.session.rollback()
        db.session.commit()
        assert inserts == []
        assert outbox_rows(db.engine) == []
        assert channel(app).calls == []


def test_a_rolled_back_savepoint_writes_no_row_a_released_one_does(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context():
        enqueue("rec", "kept")
        savepoint = db.session.begin_nested()
        db.session.add(Item(name="dropped"))
        enqueue("rec", "dropped")
        savepoint.rollback()
        savepoint = db.session.begin_nested()
        enqueue("rec", "released")
        savepoint.commit()
        db.session.commit()
        rows = outbox_rows(db.engine)
    assert [payload(row) for row in rows] == ["kept", "released"]
    assert [row["state"] for row in rows] == ["done", "done"]
    assert [row["position"] for row in rows] == [0, 1]
    assert channel(app).sent == ["kept", "released"]


def test_a_commit_failing_at_flush_writes_no_row(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context():
        db.session.add(Item(name="a"))
        db.session.commit()
        enqueue("rec", "doomed")
        db.session.add(Item(name="a"))  # the unique constraint fails at flush
        with pytest.raises(sa.exc.IntegrityError):
            db.session.commit()
        db.session.rollback()
        assert outbox_rows(db.engine) == []
        enqueue("rec", "next")
        db.session.commit()
        assert [payload(row) for row in outbox_rows(db.engine)] == ["next"]
        assert channel(app).sent == ["next"]


def test_a_commit_failing_at_commit_itself_takes_its_rows_with_it(
    make_durable: t.Callable[..., Flask],
) -> None:
    # A deferred foreign key is checked by COMMIT itself, after the outbox
    # INSERT has run: the rows must go with the failed transaction.
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context():
        for statement in (
            "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER"
            " REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
        ):
            db.session.execute(sa.text(statement))
        db.session.commit()
        try:
            if db.engine.dialect.name == "sqlite":
                db.session.execute(sa.text("PRAGMA foreign_keys = ON"))
            db.session.execute(sa.text("INSERT INTO child VALUES (1, 42)"))
            enqueue("rec", "orphan")
            with outbox_inserts(db.engine) as inserts:
                with pytest.raises(sa.exc.IntegrityError):
                    db.session.commit()
            db.session.rollback()
            assert len(inserts) == 1  # written, then rolled back by the COMMIT
            assert outbox_rows(db.engine) == []
            assert channel(app).calls == []
        finally:
            db.session.rollback()
            db.session.execute(sa.text("DROP TABLE child"))
            db.session.execute(sa.text("DROP TABLE parent"))
            db.session.commit()


def test_a_teardown_without_commit_writes_no_row(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("rec", "forgotten")
    with app.app_context():
        db.session.commit()
        assert outbox_rows(db.engine) == []
        assert db.session.scalars(sa.select(Item)).all() == []
    assert channel(app).calls == []


def test_capture_without_dispatch_writes_no_row(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    with app.app_context(), outbox_inserts(db.engine) as inserts:
        with testing.capture(app, dispatch=False) as captured:
            enqueue("rec", "quiet")
            db.session.commit()
        assert [intent.payload for intent in captured] == ["quiet"]
        assert inserts == []
        assert outbox_rows(db.engine) == []
        assert channel(app).calls == []


# 3. What cannot be kept is refused


def test_a_missing_table_fails_the_commit_naming_the_command(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(table=False)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("rec", "nowhere to go")
        with pytest.raises(OutboxError, match="flask notifyqueue outbox create"):
            db.session.commit()
        db.session.rollback()
        assert db.session.scalars(sa.select(Item)).all() == []
        assert not sa.inspect(db.engine).has_table(TABLE_NAME)
        assert channel(app).calls == []
        # Once created, the same app commits durable intents.
        notifyqueue.outbox.create(db.engine)
        db.session.add(Item(name="a"))
        enqueue("rec", "kept")
        db.session.commit()
        assert channel(app).sent == ["kept"]


def test_a_payload_json_cannot_hold_is_refused_at_queue_time(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(
        NOTIFYQUEUE_CHANNELS={
            "odd": {"type": "tests.test_outbox:ObjectChannel", "durable": True}
        }
    )
    odd = channel(app, "odd")
    with app.app_context(), outbox_inserts(db.engine) as inserts:
        with pytest.raises(
            PayloadError, match="'odd' is durable, so its payload is stored as JSON"
        ):
            enqueue("odd", "hello")
        db.session.commit()
        assert inserts == []
        assert outbox_rows(db.engine) == []
        assert odd.calls == []


# 4. Configuration


@pytest.mark.parametrize(
    ("options", "config", "match"),
    [
        ({"durable": "yes"}, {}, r"\['rec'\]\['durable'\] is 'yes'"),
        ({"max_attempts": 0}, {}, r"\['rec'\]\['max_attempts'\] is 0;"),
        ({"max_attempts": True}, {}, r"\['rec'\]\['max_attempts'\] is True;"),
        ({"retry_backoff": -1}, {}, r"\['rec'\]\['retry_backoff'\] is -1;"),
        (
            {"retry_backoff": 60, "retry_backoff_max": 10},
            {},
            r"\['rec'\]\['retry_backoff_max'\] \(10\) is less than",
        ),
        ({}, {"NOTIFYQUEUE_OUTBOX_LEASE": 0}, "NOTIFYQUEUE_OUTBOX_LEASE is 0;"),
        ({}, {"NOTIFYQUEUE_OUTBOX_RETAIN": -1}, "NOTIFYQUEUE_OUTBOX_RETAIN is -1;"),
        ({}, {"NOTIFYQUEUE_DURABLE": 1}, "NOTIFYQUEUE_DURABLE is 1;"),
    ],
)
def test_bad_durable_settings_fail_init_app_naming_the_key(
    make_app: t.Callable[..., Flask],
    options: dict[str, t.Any],
    config: dict[str, t.Any],
    match: str,
) -> None:
    rec = {"type": FLAKY, "durable": True, **options}
    app = make_app(init=False, NOTIFYQUEUE_CHANNELS={"rec": rec}, **config)
    with pytest.raises(ConfigurationError, match=match):
        NotifyQueue(app)
    assert "notifyqueue" not in app.extensions


def test_notifyqueue_durable_makes_every_channel_durable_but_those_opting_out(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(
        NOTIFYQUEUE_DURABLE=True,
        NOTIFYQUEUE_OUTBOX_RETAIN=3600,
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": FLAKY},
            "other": {"type": FLAKY, "durable": False},
        },
    )
    assert app.extensions["notifyqueue"].durable == frozenset({"rec"})
    with app.app_context():
        enqueue("rec", "kept")
        enqueue("other", "not kept")
        db.session.commit()
        rows = outbox_rows(db.engine)
    assert [(row["channel"], payload(row)) for row in rows] == [("rec", "kept")]
    assert channel(app, "other").sent == ["not kept"]


# 5. Retries


def test_a_transient_failure_on_the_fast_path_schedules_a_retry_with_backoff(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_CHANNELS=channels(retry_backoff=10))
    channel(app).faults["flaky"] = TransientFailure
    with app.app_context(), recorded(signals.intent_retrying) as retrying:
        intent = enqueue("rec", "flaky")
        before = clock()
        db.session.commit()
        after = clock()
        row = only_row(db.engine)
    assert row["state"] == "pending"
    assert row["attempts"] == 1
    assert before + timedelta(seconds=5) - MARGIN <= row["next_attempt_at"]
    assert row["next_attempt_at"] <= after + timedelta(seconds=10) + MARGIN
    assert row["last_error"] == "TransientFailure: rec refused 'flaky'"
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    assert row["finished_at"] is None
    assert len(retrying) == 1
    assert retrying[0]["intent"] == intent
    assert retrying[0]["attempt"] == 1
    assert isinstance(retrying[0]["exception"], TransientFailure)
    assert retrying[0]["next_attempt_at"] == row["next_attempt_at"]


def test_commits_that_failed_together_are_retried_at_jittered_times(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_CHANNELS=channels(retry_backoff=10))
    names = [f"flaky{number}" for number in range(5)]
    for name in names:
        channel(app).faults[name] = TransientFailure
    with app.app_context():
        for name in names:
            enqueue("rec", name)
            db.session.commit()
        rows = outbox_rows(db.engine)
    assert len({row["next_attempt_at"] for row in rows}) == len(names)


def test_a_commits_rows_that_failed_together_come_due_together_in_call_order(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_CHANNELS=channels(retry_backoff=10))
    names = [f"flaky{number}" for number in range(5)]
    rec = channel(app)
    for name in names:
        rec.faults[name] = TransientFailure
    with app.app_context():
        for name in names:
            enqueue("rec", name)
        db.session.commit()
        rows = outbox_rows(db.engine)
        assert len({row["next_attempt_at"] for row in rows}) == 1
        rec.faults.clear()
        stats = testing.drain(app, batch=len(names), now=clock() + timedelta(hours=1))
    assert stats.delivered == len(names)
    assert rec.sent[-len(names) :] == names


def test_each_retry_doubles_the_backoff(
    make_durable: t.Callable[..., Flask],
) -> None:
    backoff = 10.0
    app = make_durable(
        NOTIFYQUEUE_CHANNELS=channels(
            max_attempts=8, retry_backoff=backoff, retry_backoff_max=1000
        )
    )
    rec = channel(app)
    rec.faults["flaky"] = TransientFailure
    with app.app_context(), recorded(signals.intent_retrying) as retrying:
        enqueue("rec", "flaky")
        db.session.commit()
        for attempt in (2, 3):
            # A drain's delays count from the now it is given.
            later = only_row(db.engine)["next_attempt_at"] + timedelta(seconds=1)
            stats = testing.drain(app, now=later)
            assert stats == DrainStats(claimed=1, retrying=1)
            row = only_row(db.engine)
            assert (row["state"], row["attempts"]) == ("pending", attempt)
            nominal = timedelta(seconds=backoff * 2 ** (attempt - 1))
            assert later + nominal / 2 <= row["next_attempt_at"] <= later + nominal
            assert retrying[-1]["attempt"] == attempt
            assert retrying[-1]["next_attempt_at"] == row["next_attempt_at"]
    assert len(rec.calls) == 3


def test_the_backoff_is_capped_by_retry_backoff_max(
    make_durable: t.Callable[..., Flask],
) -> None:
    # Attempt 6 of a 10 s backoff would wait 160-320 s uncapped; capped at
    # 25 s it waits 12.5-25 s.
    app = make_durable(
        NOTIFYQUEUE_CHANNELS=channels(
            max_attempts=8, retry_backoff=10, retry_backoff_max=25
        )
    )
    channel(app).faults["flaky"] = TransientFailure
    with app.app_context():
        enqueue("rec", "flaky")
        db.session.commit()
        # Five attempts have failed; the row is due now.
        update_rows(db.engine, attempts=5, next_attempt_at=clock())
        before = clock()
        stats = testing.drain(app)
        after = clock()
        row = only_row(db.engine)
    assert stats == DrainStats(claimed=1, retrying=1)
    assert (row["state"], row["attempts"]) == ("pending", 6)
    assert before + timedelta(seconds=12.5) - MARGIN <= row["next_attempt_at"]
    assert row["next_attempt_at"] <= after + timedelta(seconds=25) + MARGIN


def test_a_drain_tries_a_failing_row_once_even_at_a_much_later_now(
    make_durable: t.Callable[..., Flask],
) -> None:
    # Its retry (1-2 s after an hour from now) is due again before the drain's
    # now would be, were the delay counted from the real clock.
    app = make_durable(
        NOTIFYQUEUE_CHANNELS=channels(
            max_attempts=8, retry_backoff=1, retry_backoff_max=2
        )
    )
    rec = channel(app)
    rec.faults["flaky"] = TransientFailure
    with app.app_context():
        enqueue("rec", "flaky")
        db.session.commit()
        later = clock() + timedelta(hours=1)
        stats = testing.drain(app, now=later)
        row = only_row(db.engine)
    assert stats == DrainStats(claimed=1, retrying=1)
    assert (row["state"], row["attempts"]) == ("pending", 2)
    assert row["next_attempt_at"] > later
    assert len(rec.calls) == 2


def test_a_row_out_of_attempts_is_dead_and_intent_dead_is_sent_once(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_CHANNELS=channels(max_attempts=3, retry_backoff=10))
    rec = channel(app)
    rec.faults["flaky"] = TransientFailure
    with (
        app.app_context(),
        recorded(signals.intent_retrying) as retrying,
        recorded(signals.intent_dead) as dead,
    ):
        intent = enqueue("rec", "flaky")
        db.session.commit()
        for _ in range(2):
            testing.drain(app, now=only_row(db.engine)["next_attempt_at"])
        row = only_row(db.engine)
        assert testing.drain(app, now=clock() + timedelta(days=1)) == DrainStats()
    assert (row["state"], row["attempts"]) == ("dead", 3)
    assert row["finished_at"] is not None
    assert row["last_error"] == (
        "gave up after 3 attempt(s): TransientFailure: rec refused 'flaky'"
    )
    assert [kwargs["attempt"] for kwargs in retrying] == [1, 2]
    assert len(dead) == 1
    assert dead[0]["intent"] == intent
    assert isinstance(dead[0]["exception"], TransientFailure)
    assert len(rec.calls) == 3


def test_a_permanent_failure_is_dead_at_once(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    rec.faults["refused"] = PermanentFailure
    with (
        app.app_context(),
        recorded(signals.intent_retrying) as retrying,
        recorded(signals.intent_dead) as dead,
    ):
        intent = enqueue("rec", "refused")
        enqueue("rec", "fine")
        db.session.commit()
        row = only_row(db.engine)
        assert testing.drain(app, now=clock() + timedelta(days=1)) == DrainStats()
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert payload(row) == "refused"
    assert row["last_error"] == "PermanentFailure: rec refused 'refused'"
    assert row["finished_at"] is not None
    assert retrying == []
    assert [kwargs["intent"] for kwargs in dead] == [intent]
    assert isinstance(dead[0]["exception"], PermanentFailure)
    assert rec.calls == [["refused", "fine"]]


def test_an_uncertain_failure_is_kept_uncertain_and_never_retried(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    rec.faults["unknown"] = UncertainFailure
    with (
        app.app_context(),
        recorded(signals.intent_retrying) as retrying,
        recorded(signals.intent_dead) as dead,
    ):
        enqueue("rec", "unknown")
        db.session.commit()
        row = only_row(db.engine)
        later = testing.drain(app, now=clock() + timedelta(days=1))
        assert only_row(db.engine) == row
    assert (row["state"], row["attempts"]) == ("uncertain", 1)
    assert row["last_error"] == "UncertainFailure: rec refused 'unknown'"
    assert row["lease_owner"] is None
    assert later == DrainStats()
    assert retrying == [] and dead == []
    assert rec.calls == [["unknown"]]


def test_a_drain_with_nothing_due_claims_nothing(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    with app.app_context():
        assert testing.drain(app) == DrainStats()
        rec.faults["flaky"] = TransientFailure
        enqueue("rec", "flaky")
        db.session.commit()
        row = only_row(db.engine)
        assert testing.drain(app) == DrainStats()  # its retry is not due yet
        assert only_row(db.engine) == row
    assert rec.calls == [["flaky"]]


# 6. The drainer


def test_the_drainer_delivers_by_commit_one_send_per_channel_batch(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec, other = channel(app), channel(app, "other")
    other.journal = rec.journal
    commits = [
        [("rec", "a1"), ("other", "b1"), ("rec", "a2")],
        [("other", "b2"), ("rec", "a3"), ("other", "b3")],
        [("rec", "a4")],
    ]
    with app.app_context():
        with testing.crash_at("after_commit", app):
            for commit in commits:
                for name, text in commit:
                    enqueue(name, text)
                db.session.commit()
        assert rec.journal == []
        stats = testing.drain(app, expire_leases=True)
        assert outbox_rows(db.engine) == []
    assert stats == DrainStats(claimed=7, delivered=7, reclaimed=7)
    # NOTIFYQUEUE_ORDER "channel": each commit's rec batch, then its other one.
    assert rec.journal == [
        ("rec", ["a1", "a2"]),
        ("other", ["b1"]),
        ("rec", ["a3"]),
        ("other", ["b2", "b3"]),
        ("rec", ["a4"]),
    ]


def test_a_claim_takes_exactly_its_batch(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with app.app_context():
        engine = db.engine
        with testing.crash_at("after_commit", app):
            for number in range(25):
                enqueue("rec", f"n{number}")
            db.session.commit()
    later = expired(app)
    taken: list[set[str]] = []
    for _ in range(3):
        claimed = store.claim(engine, "claimer", batch=10, lease=30, now=later)
        taken.append({row.intent_id for row in claimed})
        leased = {
            row["intent_id"]
            for row in outbox_rows(engine)
            if row["lease_owner"] == "claimer"
        }
        assert leased == set().union(*taken)
    assert [len(ids) for ids in taken] == [10, 10, 5]
    rows = outbox_rows(engine)
    assert {(row["state"], row["attempts"]) for row in rows} == {("leased", 2)}
    assert store.claim(engine, "claimer", batch=10, lease=30, now=later) == []


def test_a_row_claimed_past_its_max_attempts_is_dead_untried(
    make_durable: t.Callable[..., Flask],
) -> None:
    # The fast path's attempt (1 of 1) never reported: its process died.
    app = make_durable(NOTIFYQUEUE_CHANNELS=channels(max_attempts=1))
    rec = channel(app)
    with app.app_context(), recorded(signals.intent_dead) as dead:
        with testing.crash_at("after_commit", app):
            intent = enqueue("rec", "cursed")
            db.session.commit()
        stats = testing.drain(app, expire_leases=True)
        row = only_row(db.engine)
    assert stats == DrainStats(claimed=1, dead=1, reclaimed=1)
    assert rec.calls == []
    assert (row["state"], row["attempts"]) == ("dead", 2)
    assert row["last_error"].startswith("gave up: 1 attempt(s) of 1 never reported")
    assert [kwargs["intent"] for kwargs in dead] == [intent]
    assert isinstance(dead[0]["exception"], OutboxError)


def test_a_row_whose_intent_cannot_be_read_is_dead(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    with app.app_context():
        with testing.crash_at("after_commit", app):
            enqueue("rec", "good")
            bad = enqueue("rec", "bad")
            db.session.commit()
        assert bad is not None
        update_rows(db.engine, table.c.intent_id == bad.id, intent="{not json")
        stats = testing.drain(app, expire_leases=True)
        row = only_row(db.engine)
    assert stats == DrainStats(claimed=2, delivered=1, dead=1, reclaimed=2)
    assert rec.sent == ["good"]
    assert (row["intent_id"], row["state"]) == (bad.id, "dead")
    assert "the stored intent cannot be read" in row["last_error"]


def test_a_drain_of_some_channels_leaves_the_others_rows_alone(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with app.app_context():
        with testing.crash_at("after_commit", app):
            enqueue("rec", "mine")
            enqueue("other", "not mine")
            db.session.commit()
        others = [r for r in outbox_rows(db.engine) if r["channel"] == "other"]
        stats = testing.drain(app, channels=["rec"], expire_leases=True)
        assert outbox_rows(db.engine) == others
    assert stats == DrainStats(claimed=1, delivered=1, reclaimed=1)
    assert channel(app).sent == ["mine"]
    assert channel(app, "other").calls == []
    assert others[0]["state"] == "leased"


def test_a_drain_of_an_unknown_channel_is_refused(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with pytest.raises(ConfigurationError, match="Unknown channel 'nope'"):
        testing.drain(app, channels=["nope"])


def test_expired_leases_are_reclaimed_and_delivered_once(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    with app.app_context():
        with testing.crash_at("after_commit", app):
            enqueue("rec", "x")
            enqueue("rec", "y")
            db.session.commit()
        first = testing.drain(app, expire_leases=True)
        second = testing.drain(app, expire_leases=True)
        assert outbox_rows(db.engine) == []
    assert first == DrainStats(claimed=2, delivered=2, reclaimed=2)
    assert second == DrainStats()
    assert rec.calls == [["x", "y"]]


def test_a_lease_not_yet_expired_is_not_taken(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    with app.app_context():
        with testing.crash_at("after_commit", app):
            enqueue("rec", "held")
            db.session.commit()
        row = only_row(db.engine)
        assert testing.drain(app) == DrainStats()
        assert only_row(db.engine) == row
    assert row["state"] == "leased"
    assert row["lease_owner"] == fast_path.process_owner()
    assert channel(app).calls == []


# 7. Fencing


def test_a_settle_with_a_lapsed_lease_changes_nothing(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    rec = channel(app)
    with app.app_context():
        engine = db.engine
        with testing.crash_at("before_ack", app):
            intent = enqueue("rec", "once or twice")
            db.session.commit()
        assert intent is not None
        stale = only_row(engine)
        assert (stale["state"], stale["attempts"]) == ("leased", 1)
        stats = testing.drain(app, expire_leases=True)
    assert stats == DrainStats(claimed=1, delivered=1, reclaimed=1)
    assert rec.sent == ["once or twice", "once or twice"]
    taken_over = only_row(engine)
    assert (taken_over["state"], taken_over["attempts"]) == ("done", 2)
    old_owner = fast_path.process_owner()
    for outcome in (
        store.Outcome(intent.id, 1, "dead", None, "late"),
        store.Outcome(intent.id, 1, "pending", clock(), "late"),
        store.Outcome(intent.id, 1, "done"),
    ):
        for retain in (0.0, 3600.0):
            matched = store.settle(
                engine, old_owner, [outcome], retain=retain, now=clock()
            )
            assert matched == set()
            assert only_row(engine) == taken_over


def test_the_fast_path_warns_when_its_lease_was_taken_over(
    make_durable: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_durable()
    rec = channel(app)

    def steal(intents: t.Sequence[Intent]) -> None:
        update_rows(db.engine, lease_owner="thief")

    rec.during_send = steal
    with (
        app.app_context(),
        caplog.at_level(logging.WARNING, logger="notifyqueue"),
    ):
        intent = enqueue("rec", "stolen")
        db.session.commit()
        row = only_row(db.engine)
    assert intent is not None
    assert (row["state"], row["lease_owner"], row["attempts"]) == (
        "leased",
        "thief",
        1,
    )
    warnings = [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING and "lapsed" in record.getMessage()
    ]
    assert len(warnings) == 1
    assert intent.id in warnings[0].getMessage()


# 8. Crash points


@pytest.mark.parametrize(
    ("point", "sent_before"),
    [
        ("after_commit", []),
        ("mid_send", ["a"]),
        ("before_ack", ["a", "b", "c"]),
    ],
)
def test_a_crash_point_leaves_the_rows_leased_for_a_drainer(
    make_durable: t.Callable[..., Flask], point: str, sent_before: list[str]
) -> None:
    app = make_durable()
    rec = channel(app)
    with app.app_context():
        with testing.crash_at(point, app):
            for text in ("a", "b", "c"):
                enqueue("rec", text)
            enqueue("plain", "not durable")
            db.session.commit()
        rows = outbox_rows(db.engine)
        assert rec.sent == sent_before
        assert channel(app, "plain").sent == ["not durable"]
        assert [payload(row) for row in rows] == ["a", "b", "c"]
        for row in rows:
            assert row["state"] == "leased"
            assert row["lease_owner"] == fast_path.process_owner()
            assert row["attempts"] == 1
        stats = testing.drain(app, expire_leases=True)
        assert outbox_rows(db.engine) == []
    assert stats == DrainStats(claimed=3, delivered=3, reclaimed=3)
    assert sorted(set(rec.sent)) == ["a", "b", "c"]
    duplicates = sorted(text for text in set(rec.sent) if rec.sent.count(text) > 1)
    assert duplicates == sent_before


# 9. Background delivery, and stopping a drain


def test_wait_returns_once_background_durable_rows_are_settled(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable(
        NOTIFYQUEUE_CHANNELS=channels(delivery="background"),
    )
    rec = channel(app)
    gate = threading.Event()

    def held(intents: t.Sequence[Intent]) -> None:
        if not gate.wait(timeout=10):
            raise TimeoutError("the test never opened the gate")

    def slow_receiver(sender: Flask, *, intent: Intent) -> None:
        # Between the send and the settle: a wait() that returned after the
        # send would see the row still leased.
        threading.Event().wait(0.2)

    rec.during_send = held
    with (
        app.app_context(),
        signals.intent_dispatched.connected_to(slow_receiver),
    ):
        enqueue("rec", "later")
        db.session.commit()
        row = only_row(db.engine)
        assert (row["state"], row["lease_owner"]) == (
            "leased",
            fast_path.process_owner(),
        )
        gate.set()
        testing.wait(app, timeout=10)
        assert outbox_rows(db.engine) == []
    assert rec.sent == ["later"]


def test_a_stopped_drain_finishes_its_commit_and_hands_the_rest_back(
    make_durable: t.Callable[..., Flask],
) -> None:
    app = make_durable()
    rec = channel(app)
    stop = threading.Event()
    rec.during_send = lambda intents: stop.set()
    with app.app_context():
        with testing.crash_at("after_commit", app):
            for number in range(3):
                enqueue("rec", f"c{number}a")
                enqueue("rec", f"c{number}b")
                db.session.commit()
        stats = notifyqueue.outbox.drain(app, once=True, stop=stop, now=expired(app))
        rows = outbox_rows(db.engine)
    assert stats == DrainStats(claimed=6, delivered=2, reclaimed=6, released=4)
    assert rec.calls == [["c0a", "c0b"]]
    assert [payload(row) for row in rows] == ["c1a", "c1b", "c2a", "c2b"]
    for row in rows:
        assert row["state"] == "pending"
        assert row["attempts"] == 1
        assert row["lease_owner"] is None and row["lease_expires_at"] is None
