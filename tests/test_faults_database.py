"""Database faults on the real PostgreSQL: commits that fail, connections that die.

In each case nothing queued in the failed transaction is dispatched, the
batch is gone, and the next transaction dispatches only its own intents.
"""

from __future__ import annotations

import threading
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask

from notifyqueue import enqueue, finalise, signals
from sample_app.extensions import db as sample_db

from .conftest import SMTPServer, require_postgres
from .helpers import Item, RecordingChannel, db
from .test_sample_app import add_froggies, make_froggy_app, table
from .test_transaction import discards

__all__ = ["discards", "make_froggy_app"]  # fixtures, imported for pytest


@pytest.fixture
def database_url() -> str:
    """PostgreSQL only: these constraints and isolation levels are its own."""
    return require_postgres()


@pytest.fixture
def deferred_unique(ctx: None) -> t.Iterator[None]:
    """A table whose unique constraint PostgreSQL checks only at COMMIT."""
    db.session.execute(
        sa.text(
            "CREATE TABLE tag (id INTEGER PRIMARY KEY, name TEXT,"
            " CONSTRAINT tag_name UNIQUE (name) DEFERRABLE INITIALLY DEFERRED)"
        )
    )
    db.session.commit()
    yield
    db.session.rollback()
    db.session.execute(sa.text("DROP TABLE tag"))
    db.session.commit()


def add_tag(tag_id: int, name: str) -> None:
    db.session.execute(
        sa.text("INSERT INTO tag VALUES (:id, :name)"), {"id": tag_id, "name": name}
    )
    enqueue("rec", "tag {name}", name=name)


@pytest.mark.parametrize("ending", ["finalise", "commit"])
def test_a_deferred_unique_constraint_failing_at_commit_dispatches_nothing(
    app: Flask,
    rec: RecordingChannel,
    deferred_unique: None,
    discards: list[tuple[str, list[str]]],
    ending: str,
) -> None:
    add_tag(1, "same")
    add_tag(2, "same")  # accepted: the constraint waits for COMMIT
    db.session.flush()
    with pytest.raises(sa.exc.IntegrityError, match="tag_name"):
        if ending == "finalise":
            finalise()
        else:
            db.session.commit()
    if ending == "commit":
        db.session.rollback()  # what a caller of a failed commit must do

    assert rec.sent == []
    assert discards == [("commit failed", ["tag same", "tag same"])]
    add_tag(3, "other")
    assert [intent.payload for intent in finalise().dispatched] == ["tag other"]
    assert rec.sent == ["tag other"]
    assert db.session.scalars(sa.text("SELECT name FROM tag")).all() == ["other"]


def test_a_serialization_failure_at_commit_dispatches_nothing(
    app: Flask,
    rec: RecordingChannel,
    ctx: None,
    discards: list[tuple[str, list[str]]],
) -> None:
    """Write skew under SERIALIZABLE: the second transaction fails at COMMIT.

    Each transaction reads the whole table and then inserts a row the other
    read would have seen, so no serial order explains both.
    """
    serializable = {"isolation_level": "SERIALIZABLE"}
    db.session.connection(execution_options=serializable)
    other = db.engine.connect().execution_options(**serializable)
    try:
        other.begin()
        db.session.scalars(sa.select(Item)).all()
        other.execute(sa.select(Item)).all()
        db.session.add(Item(name="ours"))
        db.session.flush()
        enqueue("rec", "ours")
        other.execute(sa.insert(Item).values(name="theirs"))
        other.commit()

        with pytest.raises(sa.exc.OperationalError, match="serialize"):
            finalise()
    finally:
        other.close()

    assert rec.sent == []
    assert discards == [("commit failed", ["ours"])]
    db.session.add(Item(name="retried"))
    enqueue("rec", "retried")
    assert [intent.payload for intent in finalise().dispatched] == ["retried"]
    assert rec.sent == ["retried"]
    assert db.session.scalars(sa.select(Item.name).order_by(Item.name)).all() == [
        "retried",
        "theirs",
    ]


def test_a_concurrent_update_under_repeatable_read_dispatches_nothing(
    app: Flask,
    rec: RecordingChannel,
    ctx: None,
    discards: list[tuple[str, list[str]]],
) -> None:
    """The UPDATE flushed by the commit meets a row changed since our snapshot."""
    db.session.add(Item(name="shared"))
    db.session.commit()
    db.session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    item = db.session.scalars(sa.select(Item)).one()  # the snapshot starts here
    with db.engine.begin() as other:
        other.execute(sa.update(Item).values(name="theirs"))
    item.name = "ours"
    enqueue("rec", "renamed")
    with pytest.raises(sa.exc.OperationalError, match="serialize"):
        finalise()

    assert rec.sent == []
    assert discards == [("commit failed", ["renamed"])]
    enqueue("rec", "next")
    assert [intent.payload for intent in finalise().dispatched] == ["next"]
    assert db.session.scalars(sa.select(Item.name)).all() == ["theirs"]


# -- a connection that dies mid-request ---------------------------------------


def terminate_backend(connection: sa.Connection) -> None:
    """Kill the PostgreSQL backend serving ``connection``, from another session."""
    pid = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    engine = sa.create_engine(connection.engine.url)
    try:
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        engine.dispose()


def test_a_connection_killed_mid_request_dispatches_nothing_and_the_app_recovers(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    smtp_server: SMTPServer,
    discards: list[tuple[str, list[str]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_froggy_app(
        {
            "SQLALCHEMY_DATABASE_URI": database_url,
            # Answer 500 as in production, instead of raising into the test.
            "PROPAGATE_EXCEPTIONS": False,
        }
        | smtp_server.config()
    )
    [kermit] = add_froggies(app, "kermit")
    killed = threading.Event()

    def kill_after_queueing(sender: Flask, **kwargs: t.Any) -> None:
        # The colour change is queued, not yet flushed, and the request's
        # transaction holds the connection that is about to die.
        if not killed.is_set():
            killed.set()
            terminate_backend(sample_db.session.connection())

    client = app.test_client()
    with signals.intent_queued.connected_to(kill_after_queueing, sender=app):
        response = client.put(f"/froggies/{kermit}/colour", json={"colour": "red"})

    assert killed.is_set()
    assert response.status_code == 500
    assert smtp_server.messages == []
    assert [reason for reason, _ in discards] == ["commit failed"]
    assert "Committed DB transaction" not in caplog.text

    # The pool noticed the dead connection: the next request gets a fresh one.
    response = client.put(f"/froggies/{kermit}/colour", json={"colour": "blue"})
    assert response.status_code == 200
    [mail] = [
        n["id"]
        for n in response.json["notifications"]["dispatched"]
        if n["channel"] == "mail"
    ]
    assert smtp_server.intent_ids() == [mail]
    assert [row["colour"] for row in table(app)] == ["blue"]
