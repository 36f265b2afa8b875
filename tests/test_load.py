"""The sample app under a threaded HTTP server, on PostgreSQL and a real SMTP server.

See :mod:`tests.load` for how requests are planned and checked; run it as a
script for a larger load.
"""

from __future__ import annotations

import logging
import re
import threading
import typing as t
from dataclasses import dataclass, field

import pytest
from flask import Flask

from notifyqueue import Intent, enqueue, signals
from sample_app.extensions import db

from .celery_support import require_redis
from .conftest import SMTPServer, require_postgres
from .load import broker_outage, commits_of, loaded_app, run, smtp_outage

CLIENTS = 8


@pytest.mark.parametrize(
    ("delivery", "requests"),
    # Background and durable mail at fewer requests: the pool's four threads
    # share the two cores with the server's, and the suite should stay fast.
    # Celery mail fewer still: a worker process takes the second core.
    [
        ("inline", 5000),
        ("background-mail", 2000),
        ("durable-mail", 1000),
        ("celery-mail", 600),
    ],
)
def test_every_committed_request_notifies_exactly_its_own_changes_once(
    make_smtp_server: t.Callable[..., SMTPServer], delivery: str, requests: int
) -> None:
    # A slow DATA keeps the pool's threads busy at once, their tasks
    # overlapping one another and the requests' commits.
    smtp_server = make_smtp_server()
    background = "background" in delivery
    smtp_server.data_delay = 0.01 if background else 0.0
    database_url = require_postgres()
    # Celery: one real worker (solo pool) of the sample app sends the emails.
    redis_url = require_redis() if delivery.startswith("celery") else None
    with loaded_app(database_url, smtp_server, delivery, redis_url=redis_url) as (
        app,
        records,
    ):
        report = run(app, smtp_server, records, requests, CLIENTS)

    assert report.problems == []
    assert (report.committed, report.rolled_back) == (
        requests * 9 // 10,
        requests // 10,
    )
    # One committed request in nine changes two colours.
    assert report.emails == report.log_lines == requests
    stats = report.stats
    handed_off = requests if background else 0
    assert (stats.handed_off, stats.delivered) == (handed_off, handed_off)
    assert (stats.failed, stats.pending, stats.inline_fallbacks) == (0, 0, 0)
    # Durable: the fast path settled every row (deleted it), so the drainer
    # found nothing to do.
    durable = report.durable
    assert (durable.before_drain, durable.drained.claimed) == ({}, 0)
    assert durable.after_drain == {}
    celery = report.celery
    if redis_url is None:
        assert celery is None
    else:
        # Among the problems: a task published twice, out of call order, or
        # for a rolled-back request; an email not sent by the worker once.
        assert celery is not None
        assert len(celery.published) == celery.expected == requests
        assert celery.guard == {"done": requests}
        assert sorted(smtp_server.intent_ids()) == sorted(celery.published)


def test_emails_published_while_the_broker_was_down_are_each_sent_once(
    smtp_server: SMTPServer,
) -> None:
    # Durable Celery mail; the app reaches Redis through a proxy that is down
    # until half the requests are answered, then back on the same port. The
    # fast path's publishes fail (each request fails fast and answers its
    # email failed), the rows wait in the outbox, and the drainer publishes
    # them; the worker reaches Redis directly throughout.
    requests = 200
    database_url, redis_url = require_postgres(), require_redis()
    with (
        broker_outage(redis_url) as outage,
        loaded_app(
            database_url,
            smtp_server,
            "celery-durable-mail",
            redis_url=redis_url,
            broker_url=outage.url,
        ) as (app, records),
    ):
        report = run(app, smtp_server, records, requests, CLIENTS, outage=outage)
    arrived = smtp_server.intent_ids()

    # Among the problems: an email missing or twice, a task published twice,
    # a row left in the outbox.
    assert report.problems == []
    assert len(arrived) == len(set(arrived)) == report.emails == requests
    durable = report.durable
    failed = len(durable.failed)
    assert requests // 4 <= failed <= requests * 3 // 4
    assert set(durable.failed.values()) == {"mail"}
    assert durable.before_drain == {"pending": failed}
    assert (durable.drained.claimed, durable.drained.delivered) == (failed, failed)
    assert (durable.dead, durable.after_drain) == ([], {})
    celery = report.celery
    assert celery is not None
    assert sorted(celery.published) == sorted(arrived)
    assert celery.guard == {"done": requests}


@pytest.mark.parametrize("delivery", ["durable-mail", "durable-background-mail"])
def test_emails_failed_while_smtp_was_down_are_each_delivered_once_by_the_drainer(
    delivery: str,
) -> None:
    # The SMTP server is down until half the requests are answered, then
    # comes back on the same port; the drainer runs after the requests.
    requests = 400
    with (
        smtp_outage() as smtp,
        loaded_app(require_postgres(), smtp, delivery) as (app, records),
    ):
        report = run(app, smtp, records, requests, CLIENTS)
        arrived = smtp.server.intent_ids() if smtp.server is not None else []

    # Among the problems: an email missing, twice, or in the outbox at the end.
    assert report.problems == []
    assert len(arrived) == len(set(arrived)) == report.emails == requests
    durable = report.durable
    # About the first half's emails failed (and retried) on the fast path;
    # background tasks may still have been running when the server came back.
    failed = len(durable.failed)
    assert requests // 4 <= failed <= requests * 3 // 4
    assert set(durable.failed.values()) == {"mail"}
    assert durable.before_drain == {"pending": failed}
    assert (durable.drained.claimed, durable.drained.delivered) == (failed, failed)
    assert (durable.dead, durable.after_drain) == ([], {})


# -- channel handlers that misbehave, under threads ---------------------------

COLOUR = re.compile(r"new value: c(\d+)$")


def number(intent: Intent) -> int | None:
    """The request number a colour-change log intent names, else None.

    Only a request's first colour change: a pair's second (``c{n}b``) is not.
    """
    match = COLOUR.search(intent.payload) if intent.channel == "log" else None
    return int(match.group(1)) if match else None


@dataclass
class Misbehaviour:
    """What the misbehaving handlers saw: each ``batch_discarded`` as
    ``(reason, payloads)``, and the ids of the intents that failed."""

    discards: list[tuple[str, list[t.Any]]] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)


@pytest.fixture
def misbehaving_handlers() -> t.Iterator[Misbehaviour]:
    """Handlers keyed on the request number n of a colour change's log intent.

    n % 4 == 1: a ``dispatch`` receiver of the log channel raises;
    n % 4 == 2: an ``intent_dispatched`` receiver queues "follow-up n" and
    does not commit; n % 4 == 3: it queues "audit n" and commits.
    """
    seen = Misbehaviour()
    lock = threading.Lock()

    def raise_for_some(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        for intent in intents:
            n = number(intent)
            if n is not None and n % 4 == 1:
                raise RuntimeError(f"handler failed for c{n}")

    def queue_or_commit(sender: Flask, *, intent: Intent) -> None:
        n = number(intent)
        if n is None:
            return
        if n % 4 == 2:
            enqueue("log", "follow-up {n}", n=n)
        elif n % 4 == 3:
            enqueue("log", "audit {n}", n=n)
            db.session.commit()

    def discarded(sender: Flask, *, intents: list[Intent], reason: str) -> None:
        with lock:
            seen.discards.append((reason, [i.payload for i in intents]))

    def failed(sender: Flask, *, intent: Intent, exception: BaseException) -> None:
        with lock:
            seen.failed.add(intent.id)

    signals.dispatch.connect(raise_for_some, sender="log")
    signals.intent_dispatched.connect(queue_or_commit)
    signals.batch_discarded.connect(discarded)
    signals.intent_failed.connect(failed)
    try:
        yield seen
    finally:
        signals.dispatch.disconnect(raise_for_some, sender="log")
        signals.intent_dispatched.disconnect(queue_or_commit)
        signals.batch_discarded.disconnect(discarded)
        signals.intent_failed.disconnect(failed)


# "background": every channel, so the handlers run in the pool's threads,
# each task in an app context (and a session) of its own.
@pytest.mark.parametrize("delivery", ["inline", "background"])
def test_handlers_that_raise_queue_or_commit_keep_to_their_own_request(
    smtp_server: SMTPServer,
    misbehaving_handlers: Misbehaviour,
    caplog: pytest.LogCaptureFixture,
    delivery: str,
) -> None:
    requests = 400
    with loaded_app(require_postgres(), smtp_server, delivery) as (app, records):
        report = run(app, smtp_server, records, requests, CLIENTS)

    committed = [r for r in report.plans if r.committed]
    assert len(committed) == 360
    mine, mixed = commits_of(report.plans, report.commits)
    assert mixed == []
    background = {name for name, mode in report.delivery.items() if mode != "inline"}
    logged = [message for message, _ in records.messages()]
    emailed = [m.get_content().strip() for m in smtp_server.messages]
    all_failed: set[str] = set()
    for request in committed:
        n = request.number
        [intents] = mine[n]
        # The raising receiver fails the log intents of its own request only;
        # the log channel, another receiver, still wrote the lines.
        failed = {i.id for i in intents} & misbehaving_handlers.failed
        assert failed == {i.id for i in intents if i.channel == "log" and n % 4 == 1}
        all_failed |= failed
        # The answer reports the inline channels' outcomes.
        notifications = request.body["notifications"]
        inline = {i.id for i in intents if i.channel not in background}
        assert {item["id"] for item in notifications["failed"]} == inline & failed
        assert {item["id"] for item in notifications["dispatched"]} == inline - failed
        expected = request.expected()
        for line, body in zip(expected["log"], expected["mail"], strict=True):
            assert logged.count(line) == 1
            assert emailed.count(body) == 1
        # A handler's commit dispatches its audit once; a follow-up queued
        # without a commit is dropped when its request (or task) ends, never
        # joining another request's commit.
        assert logged.count(f"audit {n}") == (1 if n % 4 == 3 else 0)
        assert logged.count(f"follow-up {n}") == 0
    assert len(emailed) == sum(len(r.colours) for r in committed)
    assert misbehaving_handlers.failed == all_failed
    # Not the WARNING records of follow-ups discarded at teardown.
    errors = [
        r
        for r in caplog.records
        if r.name == "notifyqueue" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == len(all_failed)
    follow_ups = [
        discard
        for discard in misbehaving_handlers.discards
        if discard[0] == "teardown" or "follow-up" in str(discard[1])
    ]
    assert sorted(follow_ups) == sorted(
        ("teardown", [f"follow-up {r.number}"]) for r in committed if r.number % 4 == 2
    )
    stats = report.stats
    assert (stats.pending, stats.abandoned, stats.inline_fallbacks) == (0, 0, 0)
    assert stats.failed == (len(all_failed) if background else 0)
    assert stats.delivered + stats.failed == stats.handed_off
