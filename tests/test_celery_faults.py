"""Celery delivery when the broker is down or hung, and the durable hand-off.

The app reaches the real broker through a :class:`~tests.tcp_proxy.TCPProxy`
that the test stops (connections refused, open ones reset) or stalls
(connections accepted, nothing answered): the broker as the app sees it when
it is down, without stopping the machine's shared Redis and RabbitMQ. The
worker connects to the broker directly.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import typing as t
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from notifyqueue import (
    BatchResult,
    TransientFailure,
    enqueue,
    finalise,
    outbox,
    signals,
    testing,
)

from .celery_app import CONFIG_ENV, sent_lines
from .celery_support import MakeWorker, proxied_url, wait_until
from .helpers import Item, db
from .tcp_proxy import TCPProxy
from .test_celery import TARGET, app_for, commit_items, file_channel, make_config

pytest_plugins = ["tests.celery_support"]

TIMEOUT = 0.5
"""NOTIFYQUEUE_CELERY_PUBLISH_TIMEOUT here (the default)."""
NAMES = ("one", "two", "three", "four", "five", "six")
FAST = 2.0
"""The most a failed publish may hold a request here: a hung broker costs one
TIMEOUT (a timed-out try is not retried), a refused one milliseconds; the
rest is room for a slow machine. One timeout per intent would be 3 s."""


def proxied(
    broker_url: str,
    proxy: TCPProxy,
    queue: str,
    tmp_path: Path,
    channels: dict[str, t.Any],
) -> tuple[Flask, dict[str, t.Any]]:
    """The app, publishing through ``proxy``; the worker's config, direct."""
    config = make_config(broker_url, queue, tmp_path, channels)
    app_config = copy.deepcopy(config)
    app_config["CELERY"]["broker_url"] = proxied_url(broker_url, proxy)
    return app_for(app_config), config


def durable_app(
    broker_url: str,
    proxy: TCPProxy,
    queue: str,
    tmp_path: Path,
    **more: dict[str, t.Any],
) -> tuple[Flask, dict[str, t.Any], Path]:
    """:func:`proxied` with a durable ``file`` channel (and ``more`` channels)
    and the outbox table; the file too."""
    out = tmp_path / "sent.txt"
    channels = {"file": file_channel(out, durable=True), **more}
    app, config = proxied(broker_url, proxy, queue, tmp_path, channels)
    with app.app_context():
        outbox.create(db.engine)
    return app, config, out


def start(make_worker: MakeWorker, config: dict[str, t.Any], queue: str) -> t.Any:
    return make_worker(TARGET, queue, env={CONFIG_ENV: json.dumps(config)})


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_a_request_fails_fast_on_a_broker_that_is_down_and_reports_it(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    broker_proxy: TCPProxy,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    out = tmp_path / "sent.txt"
    app, _ = proxied(
        broker_url, broker_proxy, celery_queue, tmp_path, {"file": file_channel(out)}
    )
    # A healthy commit first: the app's broker connection is open when the
    # broker goes away, as in a server that has been up a while.
    assert len(commit_items(app, "before").pending) == 1
    if how == "stopped":
        broker_proxy.stop()
    else:
        broker_proxy.stall()
    failed: list[str] = []

    def record(sender: Flask, *, intent: t.Any, exception: BaseException) -> None:
        failed.append(intent.id)

    with signals.intent_failed.connected_to(record, sender=app):
        began = time.monotonic()
        # Six: one timeout per intent would hold it far past FAST.
        result = commit_items(app, *NAMES)
        took = time.monotonic() - began
    assert took < FAST, f"the commit waited {took:.2f} s for a broker that is {how}"
    assert result.committed and result.pending == []
    assert [intent.payload for intent, _ in result.failed] == list(NAMES)
    for _, exc in result.failed:
        assert isinstance(exc, TransientFailure)
        assert "Is the broker running?" in str(exc)
    assert failed == [intent.id for intent, _ in result.failed]
    errors = [
        r for r in caplog.records if r.name == "notifyqueue" and r.levelname == "ERROR"
    ]
    assert any("to the Celery broker" in r.getMessage() for r in errors)
    # The data committed all the same.
    with app.app_context():
        assert db.session.execute(sa.text("SELECT count(*) FROM item")).scalar() == 2

    # The broker back: the next commit publishes again, on a new connection.
    if how == "stopped":
        broker_proxy.start()
    else:
        broker_proxy.resume()
    assert len(commit_items(app, "after").pending) == 1


def test_durable_intents_survive_a_broker_outage_and_the_drainer_publishes_them(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    broker_proxy: TCPProxy,
    make_worker: MakeWorker,
) -> None:
    app, config, out = durable_app(broker_url, broker_proxy, celery_queue, tmp_path)
    worker = start(make_worker, config, celery_queue)

    broker_proxy.stop()
    down = [commit_items(app, f"down {n}", f"down {n} again") for n in range(3)]
    for result in down:
        assert len(result.failed) == 2  # reported, and kept in the outbox
    with app.app_context():
        assert _states(app) == {"pending": 6}
        # Still down: the drainer publishes nothing and loses nothing.
        stats = testing.drain(app, now=_later())
        assert (stats.delivered, stats.retrying) == (0, 6)
        assert _states(app) == {"pending": 6}

    broker_proxy.start()
    with app.app_context():
        stats = testing.drain(app, now=_later(hours=1))
        assert stats.delivered == 6
        assert _states(app) == {}  # published rows are done (deleted)
    wait_until(lambda: len(sent_lines(str(out))) >= 6, 30, worker.log_tail)
    time.sleep(0.5)
    sent = sent_lines(str(out))
    # Each once; each commit's in call order (commits retried apart may
    # overtake one another: each drew its own backoff).
    assert sorted(sent) == sorted(
        f"{intent.id} {intent.payload}"
        for result in down
        for intent, _ in result.failed
    )
    for result in down:
        first, second = (f"{i.id} {i.payload}" for i, _ in result.failed)
        assert sent.index(first) < sent.index(second)


def test_a_durable_intent_is_done_in_the_outbox_once_the_broker_has_it(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    broker_proxy: TCPProxy,
    make_worker: MakeWorker,
) -> None:
    app, config, out = durable_app(broker_url, broker_proxy, celery_queue, tmp_path)
    # No worker yet: the row is done as soon as the broker has the task.
    result = commit_items(app, "fast path")
    assert len(result.pending) == 1 and result.failed == []
    with app.app_context():
        assert _states(app) == {}
        assert testing.drain(app, expire_leases=True).claimed == 0
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 20, worker.log_tail)
    assert sent_lines(str(out)) == [f"{result.pending[0].id} fast path"]


def test_a_crash_between_commit_and_publish_is_published_by_the_drainer_once(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    broker_proxy: TCPProxy,
    make_worker: MakeWorker,
) -> None:
    app, config, out = durable_app(broker_url, broker_proxy, celery_queue, tmp_path)
    with testing.crash_at("after_commit", app):
        lost = commit_items(app, "crashed 1", "crashed 2")
    # Published both, then "died" before marking the rows: the drainer
    # publishes them again, and the worker's guard sends each once.
    with testing.crash_at("before_ack", app):
        twice = commit_items(app, "published twice")
    with app.app_context():
        assert _states(app) == {"leased": 3}
        assert testing.drain(app, expire_leases=True).delivered == 3
    worker = start(make_worker, config, celery_queue)
    intents = lost.pending + twice.pending
    wait_until(lambda: len(sent_lines(str(out))) >= 3, 20, worker.log_tail)
    wait_until(lambda: worker.log_text().count("succeeded") >= 4, 20, worker.log_tail)
    assert sorted(sent_lines(str(out))) == sorted(
        f"{intent.id} {intent.payload}" for intent in intents
    )
    assert "already delivered" in worker.log_text()


def _states(app: Flask) -> dict[str, int]:
    table = outbox.table
    with db.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.state, sa.func.count()).group_by(table.c.state)
        ).all()
    return {state: count for state, count in rows}


def _later(hours: float = 0.1) -> datetime:
    """A time past any retry's backoff, for the drainer's ``now``."""
    return datetime.now(timezone.utc) + timedelta(hours=hours)


def test_a_connection_the_broker_dropped_is_replaced_without_failing_a_publish(
    broker_url: str, celery_queue: str, tmp_path: Path, broker_proxy: TCPProxy
) -> None:
    out = tmp_path / "sent.txt"
    app, _ = proxied(
        broker_url, broker_proxy, celery_queue, tmp_path, {"file": file_channel(out)}
    )
    assert len(commit_items(app, "before").pending) == 1
    # A broker restart between two requests: the app's open connection is
    # reset, and it learns so only at its next publish.
    broker_proxy.stop()
    broker_proxy.start()
    result = commit_items(app, "after", "and after")
    assert result.failed == []
    assert [intent.payload for intent in result.pending] == ["after", "and after"]


def test_commits_in_short_lived_threads_reuse_the_kept_broker_connection(
    broker_url: str, celery_queue: str, tmp_path: Path, broker_proxy: TCPProxy
) -> None:
    out = tmp_path / "sent.txt"
    app, _ = proxied(
        broker_url, broker_proxy, celery_queue, tmp_path, {"file": file_channel(out)}
    )
    results: list[BatchResult] = []
    # One thread per request, as a threaded development server runs them.
    for number in range(10):
        thread = threading.Thread(
            target=lambda n=number: results.append(commit_items(app, f"n{n}"))
        )
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
    assert [len(result.pending) for result in results] == [1] * 10
    # One kombu connection: one socket on RabbitMQ, two on Redis (the
    # transport's client and its pool's); a connection per thread were 10+.
    assert broker_proxy.connections <= 2


def test_the_drainer_publishes_celery_rows_and_sends_the_others_itself(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    broker_proxy: TCPProxy,
    make_worker: MakeWorker,
) -> None:
    app, config, out = durable_app(
        broker_url,
        broker_proxy,
        celery_queue,
        tmp_path,
        rec={"type": "tests.helpers:RecordingChannel", "durable": True},
    )
    with app.app_context():
        with testing.crash_at("after_commit", app):
            db.session.add(Item(name="both"))
            published = enqueue("file", "to the worker")
            sent = enqueue("rec", "by the drainer")
            finalise(commit=True)
        recording = app.extensions["notifyqueue"].channels["rec"]
        assert recording.sent == []
        assert testing.drain(app, expire_leases=True).delivered == 2
    assert sent is not None and published is not None
    assert recording.sent == ["by the drainer"]
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 20, worker.log_tail)
    assert sent_lines(str(out)) == [f"{published.id} to the worker"]
