"""Celery delivery against real brokers and a real worker process (never eager).

Each test builds one config, makes its app here with it and starts a worker
(``celery -A tests.celery_app:celery_app worker --pool=solo``) with the same
config, so the worker delivers through the same channels. Deliveries are
counted where they arrive: at the SMTP server, or in the file a
:class:`~tests.celery_app.FileChannel` writes.
"""

from __future__ import annotations

import json
import re
import time
import typing as t
from pathlib import Path

from flask import Flask

from notifyqueue import BatchResult, enqueue, finalise
from notifyqueue.delivery.celery import CeleryDelivery

from .celery_app import CONFIG_ENV, create_app, sent_lines
from .celery_support import (
    MakeWorker,
    redelivery_options,
    require_redis,
    transport_options,
    wait_until,
)
from .conftest import SMTPServer
from .helpers import Item, db

pytest_plugins = ["tests.celery_support"]

TARGET = "tests.celery_app:celery_app"
LEASE = 2.0
"""NOTIFYQUEUE_CELERY_LEASE here: how long a worker's claim holds."""


def guard_url() -> str:
    """The guard's Redis: the machine's, in a database the brokers do not use."""
    return re.sub(r"/\d+$", "/6", require_redis())


def make_config(
    broker_url: str,
    queue: str,
    tmp_path: Path,
    channels: dict[str, t.Any],
    **extra: t.Any,
) -> dict[str, t.Any]:
    return {
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.db'}",
        "CELERY": {
            "broker_url": broker_url,
            "task_default_queue": queue,
            "broker_connection_retry_on_startup": True,
            # Redis gives an unacknowledged task of a dead worker to the next
            # one only after its visibility timeout (an hour by default); the
            # test's own keys for them, so no other run's worker restores them.
            "broker_transport_options": {
                **transport_options(broker_url, queue),
                **redelivery_options(3),
            },
        },
        "NOTIFYQUEUE_CELERY_GUARD": guard_url(),
        "NOTIFYQUEUE_CELERY_LEASE": LEASE,
        # Long enough for any test; the guard's keys do not pile up.
        "NOTIFYQUEUE_CELERY_RETAIN": 600,
        "NOTIFYQUEUE_CHANNELS": channels,
        "TEST_SIGNAL_LOG": str(tmp_path / "signals.txt"),
        **extra,
    }


def file_channel(path: Path, **options: t.Any) -> dict[str, t.Any]:
    return {
        "type": "tests.celery_app:FileChannel",
        "path": str(path),
        "delivery": "celery",
        "retry_backoff": 1,
        **options,
    }


def start(make_worker: MakeWorker, config: dict[str, t.Any], queue: str) -> t.Any:
    return make_worker(TARGET, queue, env={CONFIG_ENV: json.dumps(config)})


def file_app(
    broker_url: str,
    queue: str,
    tmp_path: Path,
    config: t.Mapping[str, t.Any] | None = None,
    **options: t.Any,
) -> tuple[Flask, dict[str, t.Any], Path]:
    """The app of a ``file`` channel with ``options``, its config, its file."""
    out = tmp_path / "sent.txt"
    channels = {"file": file_channel(out, **options)}
    made = make_config(broker_url, queue, tmp_path, channels, **(config or {}))
    return app_for(made), made, out


def app_for(config: dict[str, t.Any]) -> Flask:
    app = create_app(config)
    with app.app_context():
        db.create_all()
    return app


def signals_of(tmp_path: Path, intent_id: str) -> list[str]:
    path = tmp_path / "signals.txt"
    if not path.exists():
        return []
    return [
        line.split()[0]
        for line in path.read_text().splitlines()
        if line.split()[1] == intent_id
    ]


def started(out: Path) -> list[str]:
    """``<intent id> <pid>`` of each ``sleep:`` send a FileChannel began."""
    return sent_lines(f"{out}.started")


def commit_items(app: Flask, *templates: str) -> BatchResult:
    """One transaction: an Item, then one intent per template to ``file``."""
    with app.app_context():
        db.session.add(Item(name=f"item-{time.monotonic_ns()}"))
        for template in templates:
            enqueue("file", template)
        return finalise(commit=True)


def test_a_committed_email_is_sent_by_the_worker_exactly_once(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    make_worker: MakeWorker,
    smtp_server: SMTPServer,
) -> None:
    config = make_config(
        broker_url,
        celery_queue,
        tmp_path,
        {
            "mail": {
                "type": "mail",
                "delivery": "celery",
                "recipients": ["admin@example.com"],
            }
        },
        **smtp_server.config(),
    )
    app = app_for(config)
    with app.app_context():
        db.session.add(Item(name="frog"))
        intent = enqueue("mail", {"subject": "Hello {name}", "body": "b"}, name="frog")
        result = finalise(commit=True)
    assert intent is not None
    assert result.pending == [intent]
    assert result.dispatched == [] and result.failed == []
    # Nothing reaches the SMTP server from this process: the task waits.
    time.sleep(0.5)
    assert smtp_server.messages == []

    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: smtp_server.messages, 20, worker.log_tail)
    worker.wait_for_log(rf"notifyqueue.deliver\[{intent.id}\] succeeded")
    time.sleep(0.5)
    assert smtp_server.intent_ids() == [intent.id]
    assert smtp_server.messages[0]["Subject"] == "Hello frog"
    assert signals_of(tmp_path, intent.id) == ["intent_dispatched"]


def test_a_rolled_back_transaction_publishes_nothing(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path)
    with app.app_context():
        db.session.add(Item(name="gone"))
        rolled_back = enqueue("file", "never")
        result = finalise(commit=False)
    assert result.discarded == [rolled_back]
    # A marker committed after it: once the marker is delivered, a published
    # rolled-back task (ahead of it in the queue) would have been too.
    marker = commit_items(app, "marker").pending[0]
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 20, worker.log_tail)
    worker.wait_for_log(rf"notifyqueue.deliver\[{marker.id}\] succeeded")
    assert sent_lines(str(out)) == [f"{marker.id} marker"]
    assert "never" not in worker.log_text()


def test_intents_of_one_commit_are_delivered_in_call_order(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path)
    first = commit_items(app, *(f"first {n}" for n in range(20)))
    second = commit_items(app, *(f"second {n}" for n in range(20)))
    expected = [
        f"{intent.id} {intent.payload}" for intent in first.pending + second.pending
    ]
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: len(sent_lines(str(out))) >= 40, 30, worker.log_tail)
    assert sent_lines(str(out)) == expected


def test_a_duplicate_publish_delivers_once(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path)
    intent = commit_items(app, "once").pending[0]
    mode = app.extensions["notifyqueue"].modes["celery"]
    assert isinstance(mode, CeleryDelivery)
    # The same task twice more, as a republish after a lost acknowledgement
    # would send it: one before the worker starts, one after it delivered.
    mode.publisher.publish(intent, celery_queue)
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 20, worker.log_tail)
    mode.publisher.publish(intent, celery_queue)
    wait_until(
        lambda: (
            worker.log_text().count(f"notifyqueue.deliver[{intent.id}] succeeded") == 3
        ),
        20,
        worker.log_tail,
    )
    assert sent_lines(str(out)) == [f"{intent.id} once"]
    assert worker.log_text().count("already delivered") == 2
    assert signals_of(tmp_path, intent.id) == ["intent_dispatched"]


def test_a_worker_killed_mid_task_redelivers_and_delivers_once(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    # A lease longer than Redis's visibility timeout here, so that on both
    # brokers the task comes back while the dead worker's claim still holds.
    app, config, out = file_app(
        broker_url, celery_queue, tmp_path, {"NOTIFYQUEUE_CELERY_LEASE": 6}
    )
    intent = commit_items(app, "sleep:1.5 slow").pending[0]
    first = start(make_worker, config, celery_queue)
    wait_until(lambda: started(out), 20, first.log_tail)
    assert first.kill() == -9  # in the middle of the task: nothing acknowledged
    assert sent_lines(str(out)) == []

    second = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 30, second.log_tail)
    second.wait_for_log(rf"notifyqueue.deliver\[{intent.id}\] succeeded.*'delivered'")
    # The redelivered task found the dead worker's claim and waited for its
    # lease rather than sending at once.
    assert "claimed by another execution" in second.log_text()
    time.sleep(1)
    assert sent_lines(str(out)) == [f"{intent.id} sleep:1.5 slow"]


def test_a_transient_failure_is_retried_with_backoff_then_delivered_once(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path)
    intent = commit_items(app, "transient:2 flaky").pending[0]
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 30, worker.log_tail)
    assert sent_lines(str(out)) == [f"{intent.id} transient:2 flaky"]
    assert (tmp_path / "sent.txt.tries").read_text().split() == [intent.id] * 3
    assert signals_of(tmp_path, intent.id) == [
        "intent_failed",
        "intent_retrying",
        "intent_failed",
        "intent_retrying",
        "intent_dispatched",
    ]
    assert worker.log_text().count(f"notifyqueue.deliver[{intent.id}] retry") == 2


def test_a_permanent_failure_is_not_retried(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path)
    intent = commit_items(app, "permanent refusal").pending[0]
    marker = commit_items(app, "marker").pending[0]
    worker = start(make_worker, config, celery_queue)
    worker.wait_for_log(rf"notifyqueue.deliver\[{marker.id}\] succeeded")
    assert sent_lines(str(out)) == [f"{marker.id} marker"]
    assert signals_of(tmp_path, intent.id) == ["intent_failed", "intent_dead"]
    assert f"notifyqueue.deliver[{intent.id}] retry" not in worker.log_text()
    mode = app.extensions["notifyqueue"].modes["celery"]
    assert mode.guard.outcome(intent.id) == "dead"


def test_transient_failures_stop_at_max_attempts(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(
        broker_url, celery_queue, tmp_path, max_attempts=3, retry_backoff=0
    )
    intent = commit_items(app, "transient:9 hopeless").pending[0]
    worker = start(make_worker, config, celery_queue)
    wait_until(
        lambda: "intent_dead" in signals_of(tmp_path, intent.id), 30, worker.log_tail
    )
    assert sent_lines(str(out)) == []
    assert (tmp_path / "sent.txt.tries").read_text().split() == [intent.id] * 3
    assert signals_of(tmp_path, intent.id) == [
        "intent_failed",
        "intent_retrying",
        "intent_failed",
        "intent_retrying",
        "intent_failed",
        "intent_dead",
    ]


def test_a_celery_app_without_flasks_task_class_delivers_in_its_app(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(
        broker_url, celery_queue, tmp_path, {"TEST_BARE_CELERY": True}
    )
    intent = commit_items(app, "bare").pending[0]
    worker = start(make_worker, config, celery_queue)
    wait_until(lambda: sent_lines(str(out)), 20, worker.log_tail)
    assert sent_lines(str(out)) == [f"{intent.id} bare"]


def test_send_test_goes_through_the_broker_and_a_worker(
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    make_worker: MakeWorker,
    smtp_server: SMTPServer,
) -> None:
    channels = {
        "mail": {"type": "mail", "delivery": "celery", "recipients": ["a@example.com"]}
    }
    config = make_config(
        broker_url, celery_queue, tmp_path, channels, **smtp_server.config()
    )
    app = app_for(config)
    runner = app.test_cli_runner()
    no_worker = runner.invoke(
        args=["notifyqueue", "send-test", "mail", "--timeout", "1"]
    )
    assert no_worker.exit_code == 1
    assert f"Is a worker consuming queue {celery_queue!r}" in no_worker.output
    # The first test mail is still queued: the worker sends both.
    worker = start(make_worker, config, celery_queue)
    result = runner.invoke(args=["notifyqueue", "send-test", "mail", "--timeout", "30"])
    assert result.exit_code == 0, result.output + worker.log_tail()
    assert "by a Celery worker" in result.output
    assert f"to Celery queue {celery_queue!r}" in result.output
    wait_until(lambda: len(smtp_server.messages) == 2, 10, worker.log_tail)
    assert len(set(smtp_server.intent_ids())) == 2


def test_an_intent_that_kills_its_worker_every_time_runs_out_of_attempts(
    broker_url: str, celery_queue: str, tmp_path: Path, make_worker: MakeWorker
) -> None:
    app, config, out = file_app(broker_url, celery_queue, tmp_path, max_attempts=2)
    intent = commit_items(app, "sleep:60 poison").pending[0]
    guard = app.extensions["notifyqueue"].modes["celery"].guard
    for attempt in (1, 2):  # each attempt claims it, then its worker dies
        worker = start(make_worker, config, celery_queue)
        wait_until(lambda n=attempt: len(started(out)) == n, 30, worker.log_tail)
        assert started(out)[-1] == f"{intent.id} {worker.pid}"
        assert worker.kill() == -9
    # Redelivered once more, it is not tried a third time: it is dead.
    last = start(make_worker, config, celery_queue)
    wait_until(lambda: guard.outcome(intent.id) == "dead", 30, last.log_tail)
    # The worker records the outcome, then logs, then sends intent_dead.
    wait_until(lambda: signals_of(tmp_path, intent.id), 10, last.log_tail)
    assert "gave up: 2 attempt(s) of 2 never reported an outcome" in last.log_text()
    assert signals_of(tmp_path, intent.id) == ["intent_dead"]
    assert sent_lines(str(out)) == []
