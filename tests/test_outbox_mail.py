"""A durable mail channel against a real SMTP server (aiosmtpd) with faults.

Each SMTP failure drives its outbox row to the state its class promises:
a 5xx to ``dead``, a 4xx or a connection failure before the message data to
``pending`` with a retry, a connection lost after the data to ``uncertain``.
Retries follow the backoff options, a resent email keeps its Message-ID and
``X-Notifyqueue-Intent`` header, and a server that is down for a while loses
nothing and doubles nothing once it is back.
"""

from __future__ import annotations

import collections
import typing as t
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import Flask

from notifyqueue import Intent, enqueue, finalise, outbox, signals, testing

from .conftest import SMTPServer
from .helpers import db
from .smtp import start_smtp_server

RECIPIENTS = ["admin@example.com"]
TEMPLATE = {"subject": "Saved {name}", "body": "Item {name} was saved."}
REFUSED = "refused@example.com"
FAR_FUTURE = timedelta(days=30)


# -- helpers ----------------------------------------------------------------


class Signals:
    """Every ``intent_retrying`` and ``intent_dead`` sent while it is connected."""

    def __init__(self) -> None:
        self.retrying: list[dict[str, t.Any]] = []
        self.dead: list[dict[str, t.Any]] = []

    def on_retrying(self, sender: Flask, **kwargs: t.Any) -> None:
        self.retrying.append(kwargs)

    def on_dead(self, sender: Flask, **kwargs: t.Any) -> None:
        self.dead.append(kwargs)


@pytest.fixture
def outcomes() -> t.Iterator[Signals]:
    seen = Signals()
    with (
        signals.intent_retrying.connected_to(seen.on_retrying),
        signals.intent_dead.connected_to(seen.on_dead),
    ):
        yield seen


def durable_mail_app(
    make_app: t.Callable[..., Flask], mail_config: dict[str, t.Any], **options: t.Any
) -> Flask:
    """An app whose only channel is a durable mail channel; the outbox created."""
    app = make_app(
        **mail_config,
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "durable": True,
                "recipients": list(RECIPIENTS),
                **options,
            }
        },
    )
    with app.app_context():
        # PostgreSQL's schema lives for the whole run: start from no table.
        outbox.table.drop(db.engine, checkfirst=True)
        outbox.create(db.engine)
    return app


def commit_emails(
    app: Flask,
    *names: str,
    refused: str | None = None,
    to: list[str] | None = None,
) -> list[Intent]:
    """Queue one email per name and commit them as one batch.

    The email named ``refused`` goes to ``to`` instead of the channel's
    recipients.
    """
    intents = []
    with app.app_context():
        for name in names:
            template: dict[str, t.Any] = dict(TEMPLATE)
            if name == refused:
                template["recipients"] = list(to or ())
            intent = enqueue("mail", template, name=name)
            assert intent is not None
            intents.append(intent)
        finalise()
    return intents


def rows(app: Flask) -> dict[str, dict[str, t.Any]]:
    """The outbox rows, intent id -> columns, read on a connection of their own."""
    with app.app_context(), db.engine.connect() as connection:
        result = connection.execute(sa.select(outbox.table)).mappings().all()
    return {row["intent_id"]: dict(row) for row in result}


def copies(server: SMTPServer) -> collections.Counter[str]:
    """How many copies of each intent the server received."""
    return collections.Counter(server.intent_ids())


def drain_later(app: Flask, later: timedelta = FAR_FUTURE) -> outbox.DrainStats:
    """Drain once, taking now as ``later`` from now: every retry is due."""
    return testing.drain(app, now=datetime.now(timezone.utc) + later)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- each fault drives its failure class to its state -----------------------------


def _assert_the_others_arrived_once(
    app: Flask, server: SMTPServer, intents: list[Intent], failed: Intent
) -> None:
    others = [intent.id for intent in intents if intent is not failed]
    received = copies(server)
    assert [received[intent_id] for intent_id in others] == [1, 1]
    # Delivered rows are deleted at once (NOTIFYQUEUE_OUTBOX_RETAIN = 0).
    assert set(rows(app)) == {failed.id}


def test_smtp_550_makes_the_email_dead_and_sends_intent_dead(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer, outcomes: Signals
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.faults[2] = "550"
    intents = commit_emails(app, "a", "b", "c")

    failed = intents[1]
    row = rows(app)[failed.id]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["finished_at"] is not None
    assert "550" in row["last_error"]
    assert [entry["intent"].id for entry in outcomes.dead] == [failed.id]
    assert outcomes.retrying == []
    _assert_the_others_arrived_once(app, smtp_server, intents, failed)
    # Dead is final: no drain, however late, tries it again.
    assert drain_later(app).claimed == 0


@pytest.mark.parametrize(
    "to",
    [
        pytest.param([REFUSED], id="its-only-recipient"),
        pytest.param(["ok@example.com", REFUSED], id="one-of-two"),
    ],
)
def test_a_refused_recipient_makes_the_email_dead(
    make_app: t.Callable[..., Flask],
    smtp_server: SMTPServer,
    outcomes: Signals,
    to: list[str],
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.refuse.add(REFUSED)
    intents = commit_emails(app, "a", "b", "c", refused="b", to=to)

    failed = intents[1]
    row = rows(app)[failed.id]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert REFUSED in row["last_error"]
    assert [entry["intent"].id for entry in outcomes.dead] == [failed.id]
    assert outcomes.retrying == []
    _assert_the_others_arrived_once(app, smtp_server, intents, failed)
    # The recipients who were not refused have it: a retry would double it.
    accepted = [address for address in to if address != REFUSED]
    assert copies(smtp_server)[failed.id] == (1 if accepted else 0)
    assert drain_later(app).claimed == 0


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("451", id="try-again-later-451"),
        pytest.param("421", id="service-closing-421"),
        pytest.param("drop", id="connection-dropped-before-data"),
        pytest.param("stall", id="stalled-at-mail-past-the-timeout"),
    ],
)
def test_a_transient_smtp_failure_leaves_the_email_pending_with_a_retry(
    make_app: t.Callable[..., Flask],
    smtp_server: SMTPServer,
    outcomes: Signals,
    fault: str,
) -> None:
    app = durable_mail_app(make_app, smtp_server.config(), timeout=0.5)
    smtp_server.stall_seconds = 2
    smtp_server.faults[2] = fault
    before = utcnow()
    intents = commit_emails(app, "a", "b", "c")

    failed = intents[1]
    row = rows(app)[failed.id]
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["lease_owner"] is None and row["finished_at"] is None
    assert row["next_attempt_at"] > before
    assert row["last_error"]
    [retrying] = outcomes.retrying
    assert retrying["intent"].id == failed.id
    assert retrying["attempt"] == 1
    assert retrying["next_attempt_at"] == row["next_attempt_at"]
    assert outcomes.dead == []
    assert failed.id not in copies(smtp_server)
    _assert_the_others_arrived_once(app, smtp_server, intents, failed)


def test_a_connection_lost_after_the_data_makes_the_email_uncertain(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer, outcomes: Signals
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.faults[2] = "drop-after-data"
    intents = commit_emails(app, "a", "b", "c")

    failed = intents[1]
    row = rows(app)[failed.id]
    assert (row["state"], row["attempts"]) == ("uncertain", 1)
    assert row["finished_at"] is not None
    # It did arrive; the client could not know.
    assert copies(smtp_server)[failed.id] == 1
    assert outcomes.retrying == [] and outcomes.dead == []
    received = copies(smtp_server)
    assert [received[intent.id] for intent in intents] == [1, 1, 1]
    assert set(rows(app)) == {failed.id}
    # Never retried automatically: a retry could deliver it twice.
    assert drain_later(app).claimed == 0
    assert len(smtp_server.messages) == 3


# -- retries ------------------------------------------------------------------


def test_a_retried_email_arrives_exactly_once(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.faults[1] = "451"
    [intent] = commit_emails(app, "a")
    assert rows(app)[intent.id]["state"] == "pending"
    assert smtp_server.messages == []

    stats = drain_later(app)

    assert (stats.claimed, stats.delivered) == (1, 1)
    assert copies(smtp_server) == {intent.id: 1}
    assert rows(app) == {}
    assert drain_later(app).claimed == 0
    assert copies(smtp_server) == {intent.id: 1}


def test_every_copy_of_a_resent_email_has_the_same_message_id_and_intent_header(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.faults[1] = "drop-after-data"
    [intent] = commit_emails(app, "a")
    assert rows(app)[intent.id]["state"] == "uncertain"

    result = app.test_cli_runner().invoke(
        args=["notifyqueue", "outbox", "retry", "--uncertain"]
    )
    assert result.exit_code == 0, result.output
    assert testing.drain(app).delivered == 1

    assert len(smtp_server.messages) == 2
    assert [m["X-Notifyqueue-Intent"] for m in smtp_server.messages] == [intent.id] * 2
    assert [m["Message-ID"] for m in smtp_server.messages] == [
        f"<{intent.id}@example.com>"
    ] * 2
    assert rows(app) == {}


def test_retry_delays_double_from_retry_backoff_up_to_its_max_then_the_row_is_dead(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer, outcomes: Signals
) -> None:
    app = durable_mail_app(
        make_app,
        smtp_server.config(),
        retry_backoff=10,
        retry_backoff_max=25,
        max_attempts=4,
    )
    for number in range(1, 5):
        smtp_server.faults[number] = "451"
    # Half to all of min(10 * 2 ** (attempt - 1), 25) seconds after the failure.
    windows = {1: (5.0, 10.0), 2: (10.0, 20.0), 3: (12.5, 25.0)}

    # Attempt 1 is the fast path's, at the commit: its failure is on the clock.
    earliest = utcnow()
    [intent] = commit_emails(app, "a")
    latest = utcnow()
    for attempt in (1, 2, 3):
        row = rows(app)[intent.id]
        assert (row["state"], row["attempts"]) == ("pending", attempt)
        low, high = windows[attempt]
        due = row["next_attempt_at"]
        assert (
            earliest + timedelta(seconds=low) <= due <= latest + timedelta(seconds=high)
        ), (attempt, due - earliest)
        assert testing.drain(app, now=due - timedelta(seconds=0.001)).claimed == 0
        # A drain at ``due``: its failure happens at that time.
        stats = testing.drain(app, now=due)
        assert stats.claimed == 1
        earliest = latest = due

    assert stats.dead == 1
    row = rows(app)[intent.id]
    assert (row["state"], row["attempts"]) == ("dead", 4)
    assert row["last_error"].startswith("gave up after 4 attempt(s)")
    assert [entry["attempt"] for entry in outcomes.retrying] == [1, 2, 3]
    assert [entry["intent"].id for entry in outcomes.dead] == [intent.id]
    assert smtp_server.mail_commands == 4 and smtp_server.messages == []


def test_a_dead_row_retried_from_the_cli_is_delivered_once(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = durable_mail_app(make_app, smtp_server.config())
    smtp_server.faults[1] = "550"
    [intent] = commit_emails(app, "a")
    assert rows(app)[intent.id]["state"] == "dead"

    result = app.test_cli_runner().invoke(
        args=["notifyqueue", "outbox", "retry", intent.id]
    )
    assert result.exit_code == 0, result.output
    assert "1 row(s) due again." in result.output
    stats = testing.drain(app)

    assert (stats.claimed, stats.delivered) == (1, 1)
    assert copies(smtp_server) == {intent.id: 1}
    assert rows(app) == {}


def test_a_server_down_for_the_first_half_loses_and_doubles_no_email(
    make_app: t.Callable[..., Flask], outcomes: Signals
) -> None:
    total = 40
    server, stop = start_smtp_server()
    stops = [stop]
    try:
        app = durable_mail_app(make_app, server.config())
        stop()
        stops.clear()
        down = [commit_emails(app, f"down{n}")[0] for n in range(total // 2)]
        assert {row["state"] for row in rows(app).values()} == {"pending"}
        assert len(rows(app)) == total // 2

        server, stop = start_smtp_server(port=server.port)
        stops.append(stop)
        up = [commit_emails(app, f"up{n}")[0] for n in range(total // 2)]
        for _ in range(10):
            if drain_later(app).claimed == 0:
                break

        assert copies(server) == {intent.id: 1 for intent in down + up}
        assert rows(app) == {}
        assert outcomes.dead == []
        assert len(outcomes.retrying) == total // 2
    finally:
        for stop in stops:
            stop()
