"""``flask notifyqueue drain`` and ``flask notifyqueue outbox ...``, on both databases.

Rows are made by the real write path (a commit under ``crash_at``) where the
state it leaves is the one wanted, and inserted into
``notifyqueue.outbox.table`` directly where a test needs a state, an age or a
finish time that would otherwise take minutes to reach.
"""

from __future__ import annotations

import json
import re
import typing as t
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import Flask

from notifyqueue import Intent, OutboxError, enqueue, finalise, outbox, testing

from .helpers import Item, RecordingChannel, db

REC = "tests.helpers:RecordingChannel"


# -- helpers ----------------------------------------------------------------


@pytest.fixture
def make_durable_app(
    make_app: t.Callable[..., Flask],
) -> t.Iterator[t.Callable[..., Flask]]:
    """Build an app (``log`` and ``rec``, durable unless told) with no outbox table.

    PostgreSQL's test schema lives for the whole run, so the table another
    test created is dropped before and after.
    """
    apps: list[Flask] = []

    def factory(create: bool = True, **config: t.Any) -> Flask:
        config.setdefault(
            "NOTIFYQUEUE_CHANNELS",
            {
                "log": {"type": "log", "durable": True},
                "rec": {"type": REC, "durable": True},
            },
        )
        app = make_app(**config)
        with app.app_context():
            outbox.table.drop(db.engine, checkfirst=True)
            if create:
                outbox.create(db.engine)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            outbox.table.drop(db.engine, checkfirst=True)


def invoke(app: Flask, *args: str) -> t.Any:
    return app.test_cli_runner().invoke(args=["notifyqueue", *args])


def recording(app: Flask) -> RecordingChannel:
    channel = app.extensions["notifyqueue"].channels["rec"]
    assert isinstance(channel, RecordingChannel)
    return channel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def insert(
    app: Flask,
    state: str,
    *,
    channel: str = "rec",
    attempts: int = 1,
    age: timedelta = timedelta(0),
    due_in: timedelta = timedelta(0),
    finished_ago: timedelta | None = None,
    owner: str | None = None,
) -> str:
    """Insert one outbox row; return its intent id.

    :param age: how long ago it was created.
    :param due_in: ``next_attempt_at`` from now (for a leased row its lease
        expiry: negative for an expired lease).
    :param finished_ago: ``finished_at`` this long ago; default none.
    """
    moment = utcnow()
    intent = Intent.new(channel, f"{state} row", "enqueue")
    leased = state == "leased"
    row = {
        "intent_id": intent.id,
        "commit_id": intent.id,
        "position": 0,
        "channel": channel,
        "intent": json.dumps(intent.to_dict()),
        "state": state,
        "attempts": attempts,
        "next_attempt_at": moment + due_in,
        "lease_owner": (owner or "elsewhere:1:0") if leased else None,
        "lease_expires_at": moment + due_in if leased else None,
        "created_at": moment - age,
        "finished_at": None if finished_ago is None else moment - finished_ago,
        "last_error": None,
    }
    with app.app_context(), db.engine.begin() as connection:
        connection.execute(outbox.table.insert(), row)
    return intent.id


def rows(app: Flask) -> dict[str, dict[str, t.Any]]:
    """The outbox rows, intent id -> columns."""
    with app.app_context(), db.engine.connect() as connection:
        result = connection.execute(sa.select(outbox.table)).mappings().all()
    return {row["intent_id"]: dict(row) for row in result}


def commit_crashing_after_commit(app: Flask, *queued: tuple[str, str]) -> list[str]:
    """Commit ``(channel, text)`` intents as one batch; the fast path stops at
    once, as if the process had died right after the COMMIT: the rows stay
    leased to it."""
    with app.app_context(), testing.crash_at("after_commit", app):
        ids = []
        for channel, text in queued:
            intent = enqueue(channel, text)
            assert intent is not None
            ids.append(intent.id)
        finalise()
    return ids


def expire_leases(app: Flask) -> None:
    """Let every lease lapse, as it does a minute after its owner died."""
    past = utcnow() - timedelta(seconds=1)
    with app.app_context(), db.engine.begin() as connection:
        connection.execute(
            outbox.table.update()
            .where(outbox.table.c.state == "leased")
            .values(next_attempt_at=past, lease_expires_at=past)
        )


# -- the table ------------------------------------------------------------------


def test_outbox_create_creates_the_table_then_says_it_already_exists(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app(create=False)

    first = invoke(app, "outbox", "create")
    assert first.exit_code == 0, first.output
    assert first.output.startswith("Created notifyqueue_outbox in ")
    with app.app_context():
        assert sa.inspect(db.engine).has_table("notifyqueue_outbox")
        indexes = {
            i["name"] for i in sa.inspect(db.engine).get_indexes(outbox.TABLE_NAME)
        }
    assert indexes >= {
        "ix_notifyqueue_outbox_due",
        "ix_notifyqueue_outbox_state_channel",
    }

    second = invoke(app, "outbox", "create")
    assert second.exit_code == 0, second.output
    assert second.output.startswith("notifyqueue_outbox already exists in ")


def test_a_durable_commit_before_outbox_create_fails_and_names_the_command(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app(create=False)
    with app.app_context():
        enqueue("rec", "hello")
        db.session.add(Item(name="kept only with its notification"))
        with pytest.raises(OutboxError, match=r"`flask notifyqueue outbox create`"):
            db.session.commit()
        db.session.rollback()
        with db.engine.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).select_from(Item)) == 0
    assert recording(app).batches == []

    assert invoke(app, "outbox", "create").exit_code == 0
    with app.app_context():
        enqueue("rec", "hello again")
        db.session.add(Item(name="saved"))
        db.session.commit()
    assert recording(app).sent == ["hello again"]


def test_outbox_sql_prints_ddl_in_the_databases_types_that_creates_the_table(
    make_durable_app: t.Callable[..., Flask], database_url: str
) -> None:
    app = make_durable_app(create=False)

    result = invoke(app, "outbox", "sql")

    assert result.exit_code == 0, result.output
    sql = result.output
    assert "CREATE TABLE notifyqueue_outbox (" in sql
    assert "CREATE INDEX ix_notifyqueue_outbox_due ON notifyqueue_outbox" in sql
    assert (
        "CREATE INDEX ix_notifyqueue_outbox_state_channel ON notifyqueue_outbox" in sql
    )
    # The claim's index is partial: only what may be due.
    assert re.search(r"WHERE state IN \('pending', 'leased'\)", sql)
    timestamps = re.findall(r"^\s*next_attempt_at (.+?) NOT NULL", sql, re.M)
    if database_url.startswith("postgresql"):
        assert timestamps == ["TIMESTAMP WITH TIME ZONE"]
    else:
        assert timestamps == ["DATETIME"]
    with app.app_context(), db.engine.begin() as connection:
        for statement in sql.split(";\n"):
            if statement.strip():
                connection.exec_driver_sql(statement)
    with app.app_context():
        inspector = sa.inspect(db.engine)
        columns = {
            column["name"] for column in inspector.get_columns("notifyqueue_outbox")
        }
        indexes = {
            index["name"] for index in inspector.get_indexes("notifyqueue_outbox")
        }
    assert columns == set(outbox.table.columns.keys())
    assert indexes == {index.name for index in outbox.table.indexes}
    # A table made from the printed SQL is one the write path can use.
    with app.app_context():
        enqueue("rec", "through the printed table")
        finalise()
    assert recording(app).sent == ["through the printed table"]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["outbox", "status"], id="status"),
        pytest.param(["outbox", "retry", "--dead"], id="retry"),
        pytest.param(["outbox", "prune"], id="prune"),
        pytest.param(["drain", "--once"], id="drain"),
    ],
)
def test_an_outbox_command_before_outbox_create_says_to_run_it(
    make_durable_app: t.Callable[..., Flask], command: list[str]
) -> None:
    app = make_durable_app(create=False)

    result = invoke(app, *command)

    assert result.exit_code == 1
    assert "`flask notifyqueue outbox create`" in result.output
    assert not isinstance(result.exception, sa.exc.DBAPIError)


# -- status ---------------------------------------------------------------------


def test_outbox_status_says_so_when_the_outbox_is_empty(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    result = invoke(app, "outbox", "status")
    assert result.exit_code == 0, result.output
    assert result.output == "The outbox is empty.\n"


def test_outbox_status_counts_rows_per_channel_and_state(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    for _ in range(3):
        insert(app, "dead", channel="rec", finished_ago=timedelta(minutes=1))
    insert(app, "uncertain", channel="rec", finished_ago=timedelta(minutes=1))
    insert(app, "done", channel="log", finished_ago=timedelta(minutes=1))
    insert(app, "done", channel="log", finished_ago=timedelta(minutes=1))
    insert(app, "pending", channel="log", due_in=timedelta(hours=1))

    result = invoke(app, "outbox", "status")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "log done 2",
        "log pending 1",
        "rec dead 3",
        "rec uncertain 1",
    ]


def test_outbox_status_gives_the_age_of_the_oldest_due_pending_row(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    insert(app, "pending", age=timedelta(seconds=120), due_in=-timedelta(seconds=5))
    insert(app, "pending", age=timedelta(seconds=30), due_in=-timedelta(seconds=5))
    # Older, but not due yet: it is waiting for its backoff, not late.
    insert(app, "pending", age=timedelta(hours=2), due_in=timedelta(minutes=10))

    result = invoke(app, "outbox", "status")

    assert result.exit_code == 0, result.output
    [line] = result.output.splitlines()
    found = re.fullmatch(r"rec pending 3 oldest_due=(\d+)s", line)
    assert found, line
    assert 120 <= int(found.group(1)) <= 125


def test_outbox_status_counts_the_leases_that_have_expired(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    commit_crashing_after_commit(app, ("rec", "one"), ("rec", "two"), ("log", "three"))
    live = invoke(app, "outbox", "status")
    assert live.output.splitlines() == ["log leased 1", "rec leased 2"]

    expire_leases(app)
    insert(app, "leased", due_in=timedelta(minutes=1))  # another worker's, live
    result = invoke(app, "outbox", "status")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "log leased 1 expired_leases=1",
        "rec leased 3 expired_leases=2",
    ]


# -- retry ----------------------------------------------------------------------


def test_outbox_retry_makes_dead_uncertain_and_pending_rows_due_from_attempt_zero(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    ids = [
        insert(app, "dead", attempts=8, finished_ago=timedelta(hours=1)),
        insert(app, "uncertain", attempts=1, finished_ago=timedelta(hours=1)),
        insert(app, "pending", attempts=3, due_in=timedelta(hours=1)),
    ]
    before = utcnow()

    result = invoke(app, "outbox", "retry", *ids)

    assert result.exit_code == 0, result.output
    assert result.output == "3 row(s) due again.\n"
    after = utcnow()
    for row in rows(app).values():
        assert (row["state"], row["attempts"]) == ("pending", 0)
        assert before <= row["next_attempt_at"] <= after
        assert row["finished_at"] is None and row["lease_owner"] is None
    stats = testing.drain(app)
    assert (stats.claimed, stats.delivered) == (3, 3)
    assert sorted(recording(app).sent) == ["dead row", "pending row", "uncertain row"]


def test_outbox_retry_refuses_done_leased_and_unknown_ids_with_the_reason(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    done = insert(app, "done", finished_ago=timedelta(minutes=1))
    [leased] = commit_crashing_after_commit(app, ("rec", "in flight"))
    dead = insert(app, "dead", finished_ago=timedelta(minutes=1))
    unknown = "0" * 32
    before = rows(app)

    result = invoke(app, "outbox", "retry", done, leased, unknown, dead)

    assert result.exit_code == 1
    assert result.stdout == "1 row(s) due again.\n"
    assert result.stderr.splitlines() == [
        f"Not retried {done}: it is done.",
        f"Not retried {leased}: it is leased.",
        f"Not retried {unknown}: no such row.",
    ]
    after = rows(app)
    assert after[done] == before[done]
    assert after[leased] == before[leased]
    assert after[dead]["state"] == "pending"


def test_outbox_retry_dead_makes_every_dead_row_due_and_no_other(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    dead = {insert(app, "dead", finished_ago=timedelta(minutes=1)) for _ in range(2)}
    uncertain = insert(app, "uncertain", finished_ago=timedelta(minutes=1))

    result = invoke(app, "outbox", "retry", "--dead")

    assert result.exit_code == 0, result.output
    assert result.output == "2 row(s) due again.\n"
    states = {intent_id: row["state"] for intent_id, row in rows(app).items()}
    assert states == {**dict.fromkeys(dead, "pending"), uncertain: "uncertain"}


def test_outbox_retry_uncertain_makes_every_uncertain_row_due_and_no_other(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    dead = insert(app, "dead", finished_ago=timedelta(minutes=1))
    uncertain = {
        insert(app, "uncertain", finished_ago=timedelta(minutes=1)) for _ in range(2)
    }

    result = invoke(app, "outbox", "retry", "--uncertain")

    assert result.exit_code == 0, result.output
    assert result.output == "2 row(s) due again.\n"
    states = {intent_id: row["state"] for intent_id, row in rows(app).items()}
    assert states == {**dict.fromkeys(uncertain, "pending"), dead: "dead"}


def test_outbox_retry_without_ids_or_flags_is_a_usage_error(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    dead = insert(app, "dead", finished_ago=timedelta(minutes=1))

    result = invoke(app, "outbox", "retry")

    assert result.exit_code == 2
    assert "Name the rows to retry: IDs, --dead or --uncertain." in result.output
    assert rows(app)[dead]["state"] == "dead"


# -- prune ----------------------------------------------------------------------


@pytest.mark.parametrize("duration", ["1h", "60m", "3600", "3600s", "0.05d", " 1H "])
def test_outbox_prune_deletes_done_rows_finished_before_older_than_and_keeps_newer(
    make_durable_app: t.Callable[..., Flask], duration: str
) -> None:
    app = make_durable_app()
    old = insert(app, "done", finished_ago=timedelta(hours=2))
    new = insert(app, "done", finished_ago=timedelta(minutes=10))
    old_dead = insert(app, "dead", finished_ago=timedelta(hours=2))
    pending = insert(app, "pending", age=timedelta(days=3))

    result = invoke(app, "outbox", "prune", "--older-than", duration)

    assert result.exit_code == 0, result.output
    assert result.output == "Pruned 1 row(s).\n"
    assert set(rows(app)) == {new, old_dead, pending}
    assert old not in rows(app)


def test_outbox_prune_dead_also_deletes_old_dead_and_uncertain_rows(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    insert(app, "done", finished_ago=timedelta(days=8))
    insert(app, "dead", finished_ago=timedelta(days=8))
    insert(app, "uncertain", finished_ago=timedelta(days=8))
    recent_dead = insert(app, "dead", finished_ago=timedelta(days=6))
    pending = insert(app, "pending", age=timedelta(days=30))
    leased = insert(app, "leased", age=timedelta(days=30), due_in=-timedelta(days=1))

    result = invoke(app, "outbox", "prune", "--older-than", "7d", "--dead")

    assert result.exit_code == 0, result.output
    assert result.output == "Pruned 3 row(s).\n"
    assert set(rows(app)) == {recent_dead, pending, leased}


@pytest.mark.parametrize("duration", ["7x", "-1h", "soon", "nan", "inf", "d"])
def test_outbox_prune_refuses_a_bad_duration_naming_it(
    make_durable_app: t.Callable[..., Flask], duration: str
) -> None:
    app = make_durable_app()
    old = insert(app, "done", finished_ago=timedelta(days=30))

    result = invoke(app, "outbox", "prune", "--older-than", duration)

    assert result.exit_code == 2
    assert f"{duration!r} is not a duration" in result.output
    assert "--older-than" in result.output
    assert set(rows(app)) == {old}


def test_outbox_prune_defaults_to_notifyqueue_outbox_retain(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app(NOTIFYQUEUE_OUTBOX_RETAIN=3600)
    insert(app, "done", finished_ago=timedelta(hours=2))
    new = insert(app, "done", finished_ago=timedelta(minutes=10))

    result = invoke(app, "outbox", "prune")

    assert result.exit_code == 0, result.output
    assert result.output == "Pruned 1 row(s).\n"
    assert set(rows(app)) == {new}


# -- drain ----------------------------------------------------------------------


def test_drain_once_delivers_the_due_rows_and_prints_what_it_did(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    commit_crashing_after_commit(app, ("rec", "first"), ("rec", "second"))
    expire_leases(app)
    waiting = insert(app, "pending", due_in=timedelta(hours=1))
    assert recording(app).batches == []

    result = invoke(app, "drain", "--once")

    assert result.exit_code == 0, result.output
    assert result.output == (
        "Drained: 2 claimed, 2 delivered, 0 to retry, 0 dead, 0 uncertain,"
        " 2 taken over from expired leases, 0 handed back.\n"
    )
    # One commit, one send(), in call order.
    assert [[i.payload for i in batch] for batch in recording(app).batches] == [
        ["first", "second"]
    ]
    assert set(rows(app)) == {waiting}


def test_drain_once_with_nothing_due_claims_nothing(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    commit_crashing_after_commit(app, ("rec", "lease still held"))

    result = invoke(app, "drain", "--once")

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Drained: 0 claimed, 0 delivered,")
    assert recording(app).batches == []
    assert [row["state"] for row in rows(app).values()] == ["leased"]


def test_drain_refuses_an_unknown_channel(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    commit_crashing_after_commit(app, ("rec", "left alone"))
    expire_leases(app)

    result = invoke(app, "drain", "--once", "--channel", "nosuch")

    assert result.exit_code == 2
    assert "unknown channel 'nosuch'; configured: log, rec." in result.output
    assert recording(app).batches == []
    assert len(rows(app)) == 1


def test_drain_channel_delivers_that_channels_rows_and_leaves_the_others(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app()
    [to_log, to_rec] = commit_crashing_after_commit(
        app, ("log", "to the log"), ("rec", "to rec")
    )
    expire_leases(app)
    before = rows(app)[to_rec]

    result = invoke(app, "drain", "--once", "--channel", "log")

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Drained: 1 claimed, 1 delivered,")
    assert recording(app).batches == []
    assert rows(app) == {to_rec: before}
    assert to_log not in rows(app)


# -- channels -------------------------------------------------------------------


def test_channels_shows_durable_true_for_a_durable_channel_only(
    make_durable_app: t.Callable[..., Flask],
) -> None:
    app = make_durable_app(
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "durable": True},
            "rec": {"type": REC},
        }
    )

    result = invoke(app, "channels")

    assert result.exit_code == 0, result.output
    lines = {line.split(":", 1)[0]: line for line in result.output.splitlines()}
    assert lines["log"].startswith("log: type=log delivery=inline durable=True ")
    assert lines["rec"].startswith(f"rec: type={REC} delivery=inline options=")
    assert "durable" not in lines["rec"]
