"""The outbox where a reviewer broke it: one test per fix, on real databases.

SQLite under the pysqlite savepoint recipe; background tasks that wait past
half their lease; a drainer whose claim outlasts its lease; PostgreSQL
engines at REPEATABLE READ and SERIALIZABLE; a channel whose
``failure_kind()`` raises; durable intents queued after the outbox write; a
login the SMTP server refuses; ``outbox prune --dead`` without an age; and
SIGTERM to an idle drainer with a shutdown timeout of 0.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import threading
import time
import typing as t
import warnings
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

import notifyqueue.outbox
from notifyqueue import Channel, Intent, enqueue, testing
from notifyqueue.outbox import DrainStats, table

from .conftest import SMTPServer
from .helpers import Item, db
from .outbox_child import TEMPLATE, create_app, reset_tables
from .test_outbox import FLAKY, FlakyChannel, _drop_outbox, outbox_rows, payload
from .test_outbox_concurrency import claim_at_once
from .test_outbox_crash import drain_argv, environment

ROBUST = "tests.test_outbox_robustness"
JOIN_TIMEOUT = 30.0


# -- helpers --------------------------------------------------------------------


@pytest.fixture
def make_outbox_app(
    make_app: t.Callable[..., Flask],
) -> t.Iterator[t.Callable[..., Flask]]:
    """Build an app (keyword arguments are config) with a fresh outbox table.

    The PostgreSQL schema lasts the whole run: the table is dropped before and
    after each test.
    """
    engines: list[sa.Engine] = []

    def factory(**config: t.Any) -> Flask:
        app = make_app(**config)
        with app.app_context():
            engine = db.engine
        engines.append(engine)
        _drop_outbox(engine)
        notifyqueue.outbox.create(engine)
        return app

    yield factory
    for engine in engines:
        _drop_outbox(engine)


def engine_of(app: Flask) -> sa.Engine:
    with app.app_context():
        return db.engine


def flaky(app: Flask, name: str) -> FlakyChannel:
    found = app.extensions["notifyqueue"].channels[name]
    assert isinstance(found, FlakyChannel)
    return found


def delivered_ids(*channels: FlakyChannel) -> Counter[str]:
    """How many times each intent id was delivered, over ``channels``."""
    return Counter(
        intent.id
        for channel in channels
        for batch in channel.batches
        for intent in batch
    )


def clock() -> datetime:
    return datetime.now(timezone.utc)


def insert_due(engine: sa.Engine, channel: str, count: int) -> list[str]:
    """Insert ``count`` pending rows, due already, one per commit; their ids."""
    moment = clock()
    rows: list[dict[str, t.Any]] = []
    for number in range(count):
        intent = Intent.new(channel, f"row {number}", "tests.outbox_robustness")
        due = moment - timedelta(milliseconds=count - number)
        rows.append(
            {
                "intent_id": intent.id,
                "commit_id": intent.id,
                "position": 0,
                "channel": channel,
                "intent": json.dumps(intent.to_dict()),
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": due,
                "created_at": due,
            }
        )
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    return [row["intent_id"] for row in rows]


def messages(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> list[str]:
    """The notifyqueue log messages at ``level`` containing every one of ``words``."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "notifyqueue"
        and record.levelno == level
        and all(word in record.getMessage() for word in words)
    ]


SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
POSTGRESQL_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


# -- 1. SQLite under the pysqlite savepoint recipe --------------------------------


def savepoint_recipe(engine: sa.Engine) -> None:
    """SQLAlchemy's recipe for SAVEPOINT on pysqlite: the driver starts no
    transaction itself; SQLAlchemy's "begin" emits a deferred BEGIN."""

    def on_connect(dbapi_connection: t.Any, record: t.Any) -> None:
        dbapi_connection.isolation_level = None

    def on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    engine.dispose()  # the pooled connections predate the recipe


@pytest.fixture
def recipe_app(make_outbox_app: t.Callable[..., Flask]) -> Flask:
    app = make_outbox_app(
        NOTIFYQUEUE_CHANNELS={"rec": {"type": FLAKY, "durable": True}}
    )
    savepoint_recipe(engine_of(app))
    return app


@SQLITE_ONLY
def test_savepoint_recipe_a_durable_commit_is_delivered_and_its_row_deleted(
    recipe_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with recipe_app.app_context(), caplog.at_level(logging.WARNING, "notifyqueue"):
        db.session.add(Item(name="a"))
        enqueue("rec", "hello")
        db.session.commit()
        # The recipe really is in force: a savepoint works.
        with db.session.begin_nested():
            db.session.add(Item(name="b"))
        db.session.commit()
        assert db.session.query(Item).count() == 2
        rows = outbox_rows(db.engine)
    assert flaky(recipe_app, "rec").sent == ["hello"]
    assert rows == []
    assert messages(caplog, logging.ERROR) == []


@SQLITE_ONLY
def test_savepoint_recipe_a_crashed_commit_is_drained(recipe_app: Flask) -> None:
    with recipe_app.app_context():
        with testing.crash_at("after_commit", recipe_app):
            enqueue("rec", "crashed")
            db.session.commit()
        assert [row["state"] for row in outbox_rows(db.engine)] == ["leased"]
        stats = testing.drain(recipe_app, expire_leases=True)
        rows = outbox_rows(db.engine)
    assert stats == DrainStats(claimed=1, delivered=1, reclaimed=1)
    assert flaky(recipe_app, "rec").sent == ["crashed"]
    assert rows == []


@SQLITE_ONLY
def test_savepoint_recipe_claims_at_once_take_disjoint_rows_without_lock_errors(
    recipe_app: Flask,
) -> None:
    engine = engine_of(recipe_app)
    ids = insert_due(engine, "rec", 40)
    for _ in range(2):  # warm the pool: no claim waits to connect
        with engine.connect():
            pass
    seen: list[str] = []
    for _ in range(2):  # two rounds of 10 rows each: 40 rows claimed once
        owners = ("claimer-a", "claimer-b")
        claims = claim_at_once(engine, owners, batch=10, now=clock())
        first, second = (claims[owner] for owner in owners)
        assert (len(first), len(second)) == (10, 10)
        assert not set(first) & set(second)
        seen += first + second
    assert len(seen) == len(set(seen)) == 40
    assert set(seen) == set(ids)


# -- 2. Background tasks that start past half their lease --------------------------

LEASE = 1.0
HELD = 0.7  # seconds past the last commit the gate stays closed: > LEASE / 2


def background_app(make_outbox_app: t.Callable[..., Flask], **config: t.Any) -> Flask:
    """One background thread; ``gate`` (its sends wait for the test) and ``rec``,
    both durable; NOTIFYQUEUE_OUTBOX_LEASE=1."""
    background = {"type": FLAKY, "durable": True, "delivery": "background"}
    return make_outbox_app(
        NOTIFYQUEUE_CHANNELS={"gate": dict(background), "rec": dict(background)},
        NOTIFYQUEUE_BACKGROUND_THREADS=1,
        NOTIFYQUEUE_OUTBOX_LEASE=LEASE,
        **config,
    )


def hold(channel: FlakyChannel) -> threading.Event:
    """Make every send of ``channel`` wait (10 s at most) for the returned gate."""
    gate = threading.Event()

    def wait(intents: t.Sequence[Intent]) -> None:
        if not gate.wait(timeout=10):
            raise TimeoutError("the test never opened the gate")

    channel.during_send = wait
    return gate


def commit_behind_the_gate(app: Flask) -> tuple[list[str], float]:
    """Commit ``gate: held`` (its task blocks), then ``rec: second`` and
    ``rec: third`` (their tasks wait behind it); their ids, and when the last
    commit returned (monotonic)."""
    ids = []
    with app.app_context():
        for name, text in (("gate", "held"), ("rec", "second"), ("rec", "third")):
            intent = enqueue(name, text)
            assert intent is not None
            ids.append(intent.id)
            db.session.commit()
    return ids, time.monotonic()


def open_late(gate: threading.Event, committed: float) -> None:
    """Open ``gate`` once HELD seconds have passed since ``committed``."""
    time.sleep(max(0.0, committed + HELD - time.monotonic()))
    gate.set()


def test_background_tasks_waiting_past_half_the_lease_deliver_once_and_settle(
    make_outbox_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = background_app(make_outbox_app)
    gate = hold(flaky(app, "gate"))
    with caplog.at_level(logging.WARNING, "notifyqueue"):
        ids, committed = commit_behind_the_gate(app)
        open_late(gate, committed)
        with app.app_context():
            testing.wait(app, timeout=20)
            rows = outbox_rows(db.engine)
    assert delivered_ids(flaky(app, "gate"), flaky(app, "rec")) == Counter(ids)
    assert rows == []
    assert messages(caplog, logging.WARNING) == []
    assert messages(caplog, logging.ERROR) == []


def test_a_background_task_past_half_its_lease_renews_it_before_sending(
    make_outbox_app: t.Callable[..., Flask],
) -> None:
    app = background_app(make_outbox_app)
    gate = hold(flaky(app, "gate"))
    engine = engine_of(app)
    seen: list[dict[str, t.Any]] = []
    sending: list[float] = []

    def look(intents: t.Sequence[Intent]) -> None:
        sending.append(time.monotonic())
        ids = {intent.id for intent in intents}
        seen.extend(row for row in outbox_rows(engine) if row["intent_id"] in ids)

    flaky(app, "rec").during_send = look
    ids, committed = commit_behind_the_gate(app)
    opened = clock()
    open_late(gate, committed)
    with app.app_context():
        testing.wait(app, timeout=20)
    assert sorted(row["intent_id"] for row in seen) == sorted(ids[1:])
    for row in seen:
        # Still this process's first attempt, its lease running a full
        # NOTIFYQUEUE_OUTBOX_LEASE from when its task began, not from its
        # commit (which was more than half a lease before).
        assert (row["state"], row["attempts"]) == ("leased", 1)
        assert row["lease_expires_at"] > row["created_at"] + timedelta(seconds=LEASE)
        assert row["lease_expires_at"] >= opened + timedelta(seconds=LEASE)


def test_a_background_task_leaves_rows_a_drainer_took_meanwhile(
    make_outbox_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = background_app(make_outbox_app)
    gate = hold(flaky(app, "gate"))
    with caplog.at_level(logging.WARNING, "notifyqueue"):
        ids, committed = commit_behind_the_gate(app)
        with app.app_context():
            # As a drainer does once their lease has lapsed: it takes and
            # delivers the waiting commits' rows while their tasks wait.
            stats = testing.drain(app, channels=["rec"], expire_leases=True)
        open_late(gate, committed)
        with app.app_context():
            testing.wait(app, timeout=20)
            rows = outbox_rows(db.engine)
    assert stats == DrainStats(claimed=2, delivered=2, reclaimed=2)
    assert delivered_ids(flaky(app, "gate"), flaky(app, "rec")) == Counter(ids)
    assert rows == []
    # One WARNING per task, naming the intent it left.
    skipped = messages(caplog, logging.WARNING, "lapsed before their delivery started")
    assert len(skipped) == 2, skipped
    assert [ids[1] in skipped[0], ids[2] in skipped[1]] == [True, True]
    assert not [message for message in skipped if ids[0] in message]


# -- 3. A claim that outlasts its lease ---------------------------------------------


def test_a_claim_longer_than_its_lease_renews_it_and_no_other_drainer_repeats_it(
    make_outbox_app: t.Callable[..., Flask],
) -> None:
    app = make_outbox_app(
        NOTIFYQUEUE_CHANNELS={"rec": {"type": FLAKY, "durable": True}}
    )
    rec = flaky(app, "rec")
    first_send = threading.Event()

    def slow(intents: t.Sequence[Intent]) -> None:
        first_send.set()
        time.sleep(0.3)

    rec.during_send = slow
    ids = insert_due(engine_of(app), "rec", 10)
    results: dict[str, DrainStats | BaseException] = {}
    stop = threading.Event()

    def run(name: str, **options: t.Any) -> None:
        try:
            results[name] = notifyqueue.outbox.drain(
                app, once=True, stop=stop, **options
            )
        except BaseException as exc:  # reported by the assert below
            results[name] = exc

    # 10 commits of 0.3 s each: the claim takes about 3 s, its lease 1 s.
    first = threading.Thread(
        target=run, args=("first",), kwargs={"batch": 10, "lease": 1.0}
    )
    second = threading.Thread(target=run, args=("second",))
    try:
        first.start()
        assert first_send.wait(timeout=JOIN_TIMEOUT)
        time.sleep(1.3)  # past the first claim's original lease
        second.start()
        second.join(timeout=JOIN_TIMEOUT)
        first.join(timeout=JOIN_TIMEOUT)
        assert not first.is_alive() and not second.is_alive()
    finally:
        stop.set()
        first.join(timeout=JOIN_TIMEOUT)
        if second.ident is not None:
            second.join(timeout=JOIN_TIMEOUT)
    assert delivered_ids(rec) == Counter(ids)
    assert outbox_rows(engine_of(app)) == []
    assert results["first"] == DrainStats(claimed=10, delivered=10)
    assert results["second"] == DrainStats()


# -- 4. PostgreSQL engines above READ COMMITTED ----------------------------------


@POSTGRESQL_ONLY
@pytest.mark.parametrize("isolation", ["SERIALIZABLE", "REPEATABLE READ"])
def test_drainers_on_an_engine_above_read_committed_deliver_each_row_once(
    make_outbox_app: t.Callable[..., Flask], isolation: str
) -> None:
    app = make_outbox_app(
        SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": isolation, "pool_size": 8},
        NOTIFYQUEUE_CHANNELS={"rec": {"type": FLAKY, "durable": True}},
    )
    engine = engine_of(app)
    with engine.connect() as connection:
        assert connection.get_isolation_level() == isolation
    ids = insert_due(engine, "rec", 1000)
    count = 4
    barrier = threading.Barrier(count, timeout=JOIN_TIMEOUT)
    stop = threading.Event()
    results: dict[int, DrainStats | BaseException] = {}

    def run(number: int) -> None:
        try:
            barrier.wait()
            results[number] = notifyqueue.outbox.drain(
                app, once=True, batch=25, stop=stop
            )
        except BaseException as exc:  # reported by the assert below
            results[number] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not [thread.name for thread in threads if thread.is_alive()]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT)
    failed = {n: repr(r) for n, r in results.items() if isinstance(r, BaseException)}
    assert failed == {}
    assert delivered_ids(flaky(app, "rec")) == Counter(ids)
    assert outbox_rows(engine) == []


# -- 5. A channel whose failure_kind() raises ------------------------------------


class MisjudgingChannel(Channel):
    """Every send fails; classifying the failure raises (a classifier's bug)."""

    def send(self, intents: t.Sequence[Intent]) -> None:
        raise RuntimeError("the service is down")

    def failure_kind(self, exc: BaseException) -> str:
        raise KeyError(f"no kind for {exc!r}")


def test_a_failure_kind_that_raises_is_logged_and_taken_as_transient(
    make_outbox_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_outbox_app(
        NOTIFYQUEUE_CHANNELS={
            "bad": {"type": f"{ROBUST}:MisjudgingChannel", "durable": True}
        }
    )
    with app.app_context(), caplog.at_level(logging.WARNING, "notifyqueue"):
        db.session.add(Item(name="kept"))
        intent = enqueue("bad", "x")
        db.session.commit()  # does not raise
        db.session.remove()
        with db.engine.connect() as connection:
            names = connection.execute(sa.select(Item.name)).scalars().all()
        rows = outbox_rows(db.engine)
    assert intent is not None
    assert names == ["kept"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["intent_id"], row["state"], row["attempts"]) == (
        intent.id,
        "pending",
        1,
    )
    assert row["lease_owner"] is None
    assert row["last_error"] == "RuntimeError: the service is down"
    assert row["next_attempt_at"] > clock()
    errors = messages(caplog, logging.ERROR, "failure_kind()", intent.id)
    assert len(errors) == 1
    assert "transient" in errors[0]


# -- 6. Durable intents queued after the outbox write -----------------------------


@pytest.mark.parametrize("event_name", ["after_commit", "before_commit"])
def test_a_durable_intent_queued_after_the_outbox_write_is_delivered_with_a_warning(
    make_outbox_app: t.Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
    event_name: str,
) -> None:
    app = make_outbox_app(
        NOTIFYQUEUE_CHANNELS={"rec": {"type": FLAKY, "durable": True}},
        NOTIFYQUEUE_OUTBOX_RETAIN=3600,  # a delivered row stays, done
    )
    late: list[Intent] = []

    def queue_late(session: t.Any) -> None:
        if not late:
            intent = enqueue("rec", f"late from {event_name}")
            assert intent is not None
            late.append(intent)

    with app.app_context(), caplog.at_level(logging.WARNING, "notifyqueue"):
        # Registered after notifyqueue's own listeners (init_app ran first).
        session_class = type(db.session())
        sa.event.listen(session_class, event_name, queue_late)
        try:
            db.session.add(Item(name="x"))
            enqueue("rec", "normal")
            db.session.commit()
        finally:
            sa.event.remove(session_class, event_name, queue_late)
        rows = outbox_rows(db.engine)
    assert len(late) == 1
    assert flaky(app, "rec").sent == ["normal", f"late from {event_name}"]
    assert [(payload(row), row["state"]) for row in rows] == [("normal", "done")]
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "queued after their commit wrote the outbox" in warnings[0]
    assert late[0].id in warnings[0]
    assert messages(caplog, logging.WARNING, "no longer leased") == []


# -- 7. A login the SMTP server refuses ------------------------------------------


def refuse_login(
    server: t.Any, session: t.Any, envelope: t.Any, mechanism: str, auth_data: t.Any
) -> t.Any:
    from aiosmtpd.smtp import AuthResult

    return AuthResult(success=False, handled=False)


def refused_login_app(
    make_outbox_app: t.Callable[..., Flask],
    make_smtp_server: t.Callable[..., SMTPServer],
) -> tuple[Flask, SMTPServer]:
    """A durable mail channel whose server refuses every login (535)."""
    server = make_smtp_server(authenticator=refuse_login, auth_require_tls=False)
    app = make_outbox_app(
        **server.config(),
        MAIL_USERNAME="notifier",
        MAIL_PASSWORD="wrong",
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "durable": True,
                "recipients": ["admin@example.com"],
            }
        },
    )
    return app, server


def commit_email(app: Flask) -> Intent:
    """Commit one durable email, then let go of everything that refers to its
    failure, and collect: the refused connection's socket is freed here.

    Log records would keep the exception (and through its traceback the
    connection) past the test, so the notifyqueue logger is off meanwhile.
    """
    logger = logging.getLogger("notifyqueue")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with app.app_context():
            intent = enqueue("mail", {"subject": "Hello", "body": "Body"})
            assert intent is not None
            db.session.commit()
            db.session.remove()
    finally:
        logger.disabled = disabled
    gc.collect()
    return intent


@SQLITE_ONLY
def test_a_refused_smtp_login_leaves_durable_mail_pending_naming_mail_username(
    make_outbox_app: t.Callable[..., Flask],
    make_smtp_server: t.Callable[..., SMTPServer],
) -> None:
    app, server = refused_login_app(make_outbox_app, make_smtp_server)
    intent = commit_email(app)
    rows = outbox_rows(engine_of(app))
    assert server.messages == []
    assert len(rows) == 1
    row = rows[0]
    assert (row["intent_id"], row["state"], row["attempts"]) == (
        intent.id,
        "pending",
        1,
    )
    assert "refused the login of MAIL_USERNAME='notifier'" in row["last_error"]


@SQLITE_ONLY
def test_a_refused_smtp_login_closes_its_connection(
    make_outbox_app: t.Callable[..., Flask],
    make_smtp_server: t.Callable[..., SMTPServer],
) -> None:
    app, _ = refused_login_app(make_outbox_app, make_smtp_server)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        commit_email(app)
    unclosed = [
        str(warning.message)
        for warning in caught
        if issubclass(warning.category, ResourceWarning)
        and "socket" in str(warning.message)
    ]
    assert unclosed == []


# -- 8. outbox prune --dead without --older-than -----------------------------------


def test_outbox_prune_dead_without_older_than_is_a_usage_error_deleting_nothing(
    make_outbox_app: t.Callable[..., Flask],
) -> None:
    app = make_outbox_app(
        NOTIFYQUEUE_CHANNELS={"rec": {"type": FLAKY, "durable": True}}
    )
    engine = engine_of(app)
    moment = clock()
    rows = []
    for state in ("dead", "uncertain", "done"):
        intent = Intent.new("rec", f"{state} row", "tests.outbox_robustness")
        rows.append(
            {
                "intent_id": intent.id,
                "commit_id": intent.id,
                "position": 0,
                "channel": "rec",
                "intent": json.dumps(intent.to_dict()),
                "state": state,
                "attempts": 1,
                "next_attempt_at": moment - timedelta(days=60),
                "created_at": moment - timedelta(days=60),
                "finished_at": moment - timedelta(days=60),
            }
        )
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)

    result = app.test_cli_runner().invoke(
        args=["notifyqueue", "outbox", "prune", "--dead"]
    )

    assert result.exit_code == 2, result.output
    assert "--older-than" in result.output
    left = sorted(row["state"] for row in outbox_rows(engine))
    assert left == ["dead", "done", "uncertain"]


# -- 9. SIGTERM to an idle drainer with NOTIFYQUEUE_SHUTDOWN_TIMEOUT=0 -------------

ROOT = Path(__file__).resolve().parent.parent


@SQLITE_ONLY
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX signals")
def test_sigterm_to_an_idle_drainer_with_a_shutdown_timeout_of_0_exits_0(
    tmp_path: Path,
    database_url: str,
    smtp_server: SMTPServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environ = environment(database_url, smtp_server, shutdown_timeout=0)
    for key in ("OUTBOX_CHILD_DATABASE_URL", "OUTBOX_CHILD_SMTP_PORT"):
        monkeypatch.setenv(key, environ[key])
    # One email left to a drainer: once it has arrived and its row is gone,
    # the drainer has nothing left to do and waits out its poll.
    seeder = create_app()
    reset_tables(seeder)
    with seeder.app_context():
        with testing.crash_at("after_commit", seeder):
            db.session.add(Item(name="seed"))
            enqueue("mail", TEMPLATE, name="seed", part=1)
            db.session.commit()
        engine = db.engine
    with engine.begin() as connection:
        connection.execute(
            sa.update(table).values(next_attempt_at=clock() - timedelta(seconds=1))
        )
    try:
        with (
            open(tmp_path / "stdout", "wb") as stdout,
            open(tmp_path / "stderr", "wb") as stderr,
        ):
            process = subprocess.Popen(
                drain_argv("--poll", "5"),
                cwd=ROOT,
                env=environ,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 30
            while smtp_server.messages == [] or outbox_rows(engine) != []:
                assert process.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the seeded email never went out"
                time.sleep(0.02)
            time.sleep(0.5)  # past the empty claim that follows: idle in its poll
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=10)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it has exited
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        out = (tmp_path / "stdout").read_text()
        err = (tmp_path / "stderr").read_text()
        assert code == 0, err
        assert out.startswith("Drained: 1 claimed, 1 delivered,"), out
        assert "Stopped before" not in err
    finally:
        engine.dispose()
