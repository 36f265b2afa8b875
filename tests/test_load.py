"""The sample app under a threaded HTTP server, on PostgreSQL and a real SMTP server.

See :mod:`tests.load` for how requests are planned and checked; run it as a
script for a larger load.
"""

from __future__ import annotations

import logging
import re
import threading
import typing as t

import pytest
from flask import Flask

from notifyqueue import Intent, enqueue, signals
from sample_app.extensions import db

from .conftest import SMTPServer, require_postgres
from .load import loaded_app, run

REQUESTS = 5000
CLIENTS = 8


def test_every_committed_request_notifies_exactly_its_own_changes_once(
    smtp_server: SMTPServer,
) -> None:
    with loaded_app(require_postgres(), smtp_server) as (app, records):
        report = run(app, smtp_server, records, REQUESTS, CLIENTS)

    assert report.problems == []
    assert (report.committed, report.rolled_back) == (4500, 500)
    assert report.emails == report.log_lines == 4500


# -- channel handlers that misbehave, under threads ---------------------------

COLOUR = re.compile(r"new value: c(\d+)$")


def number(intent: Intent) -> int | None:
    """The request number a colour-change log intent names, else None."""
    match = COLOUR.search(intent.payload) if intent.channel == "log" else None
    return int(match.group(1)) if match else None


@pytest.fixture
def misbehaving_handlers() -> t.Iterator[list[tuple[str, list[t.Any]]]]:
    """Handlers keyed on the request number n of a colour change's log intent.

    n % 4 == 1: a ``dispatch`` receiver of the log channel raises;
    n % 4 == 2: an ``intent_dispatched`` receiver queues "follow-up n" and
    does not commit; n % 4 == 3: it queues "audit n" and commits.
    Yields every ``batch_discarded`` as ``(reason, payloads)``.
    """
    discards: list[tuple[str, list[t.Any]]] = []
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
            discards.append((reason, [i.payload for i in intents]))

    signals.dispatch.connect(raise_for_some, sender="log")
    signals.intent_dispatched.connect(queue_or_commit)
    signals.batch_discarded.connect(discarded)
    try:
        yield discards
    finally:
        signals.dispatch.disconnect(raise_for_some, sender="log")
        signals.intent_dispatched.disconnect(queue_or_commit)
        signals.batch_discarded.disconnect(discarded)


def test_handlers_that_raise_queue_or_commit_keep_to_their_own_request(
    smtp_server: SMTPServer,
    misbehaving_handlers: list[tuple[str, list[t.Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = 400
    with loaded_app(require_postgres(), smtp_server) as (app, records):
        report = run(app, smtp_server, records, requests, CLIENTS)

    committed = [r for r in report.plans if r.kind == "commit"]
    assert len(committed) == 360
    logged = [message for message, _ in records.messages()]
    emailed = [m.get_content().strip() for m in smtp_server.messages]
    for request in committed:
        n = request.number
        notifications = request.body["notifications"]
        channels = {
            outcome: [item["channel"] for item in notifications[outcome]]
            for outcome in ("dispatched", "failed")
        }
        # The raising receiver fails the log intent of its own request only;
        # the log channel, another receiver, still wrote the line.
        if n % 4 == 1:
            assert channels == {"dispatched": ["mail"], "failed": ["log"]}
        else:
            assert channels == {"dispatched": ["log", "mail"], "failed": []}
        line = f"Froggy colour updated: {request.froggy_id}; new value: c{n}"
        assert logged.count(line) == 1
        assert emailed.count(f"Froggy: {request.froggy_id}; new colour: c{n}") == 1
        # A handler's commit dispatches its audit once; a follow-up queued
        # without a commit is dropped when its request ends, never joining
        # another request's commit.
        assert logged.count(f"audit {n}") == (1 if n % 4 == 3 else 0)
        assert logged.count(f"follow-up {n}") == 0
    assert len(emailed) == len(committed)
    # Not the WARNING records of follow-ups discarded at teardown.
    errors = [
        r
        for r in caplog.records
        if r.name == "notifyqueue" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == sum(1 for r in committed if r.number % 4 == 1)
    follow_ups = [
        discard
        for discard in misbehaving_handlers
        if discard[0] == "teardown" or "follow-up" in str(discard[1])
    ]
    assert sorted(follow_ups) == sorted(
        ("teardown", [f"follow-up {r.number}"]) for r in committed if r.number % 4 == 2
    )
