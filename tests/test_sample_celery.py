"""The sample app's mail through Celery, as the README's "Mail through Celery" says.

The one setting, ``FLASK_FROGGY_MAIL_DELIVERY=celery``, and test-only
settings (a SQLite file, this test's SMTP server, a Redis queue of the
test's own) are ``FLASK_*`` environment variables, the same in this process
(the web app, called through its test client) and in a real worker started
with the documented command, ``celery -A sample_app.make_celery worker``
(:class:`~tests.celery_support.Worker` adds ``--pool=solo``, ``-Q`` with the
queue the environment makes Celery's default, and a unique node name).
Emails are counted at the SMTP server; the Redis queue shows what was
published before any worker runs.
"""

from __future__ import annotations

import json
import re
import time
import typing as t
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from notifyqueue.celery.guard import attempts_key, state_key
from notifyqueue.testing import shutdown
from sample_app import create_app
from sample_app.extensions import db

from .celery_support import (
    MakeWorker,
    Worker,
    require_redis,
    transport_options,
    wait_until,
)
from .conftest import SMTPServer

pytest_plugins = ["tests.celery_support"]

TARGET = "sample_app.make_celery"
"""As the README's worker command names it (Celery finds ``celery_app`` in it)."""


@pytest.fixture
def broker_url() -> str:
    """The sample's documented broker is Redis (RabbitMQ needs a guard set too)."""
    return require_redis()


@pytest.fixture
def sample_env(
    broker_url: str, celery_queue: str, tmp_path: Path, smtp_server: SMTPServer
) -> dict[str, str]:
    """The environment of both shells: the one setting, and the test's own."""
    env = {
        # The one config change the README documents.
        "FLASK_FROGGY_MAIL_DELIVERY": "celery",
        # Test-only: this test's database, SMTP server, broker and queue.
        "FLASK_SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'froggies.db'}",
        "FLASK_MAIL_SERVER": smtp_server.host,
        "FLASK_MAIL_PORT": str(smtp_server.port),
        "FLASK_MAIL_SUPPRESS_SEND": "false",
        "FLASK_CELERY__broker_url": broker_url,
        "FLASK_CELERY__task_default_queue": celery_queue,
        "FLASK_CELERY__broker_connection_retry_on_startup": "true",
        "FLASK_CELERY__broker_transport_options": json.dumps(
            transport_options(broker_url, celery_queue)
        ),
    }
    return env


@pytest.fixture
def guard_keys(broker_url: str) -> t.Iterator[list[str]]:
    """Intent ids whose guard keys (in the broker's Redis) go after the test."""
    ids: list[str] = []
    yield ids
    if ids:
        client = redis.Redis.from_url(broker_url, socket_timeout=5)
        try:
            client.delete(*(key(i) for i in ids for key in (state_key, attempts_key)))
        finally:
            client.close()


@pytest.fixture
def froggy_app(
    sample_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> t.Iterator[Flask]:
    """``create_app()`` from the environment alone, as ``flask run`` builds it."""
    for key, value in sample_env.items():
        monkeypatch.setenv(key, value)
    app = create_app()
    try:
        yield app
    finally:
        shutdown(app)  # drops the app's broker connection
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def client(froggy_app: Flask) -> FlaskClient:
    return froggy_app.test_client()


def queued(broker_url: str, queue: str) -> int:
    """How many tasks wait in ``queue`` on the Redis broker."""
    client = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def create_kermit(client: FlaskClient) -> int:
    created = client.post("/froggies", json={"name": "Kermit"})
    assert created.status_code == 201, created.get_json()
    return int(created.get_json()["froggy"]["id"])


def pending_mail(response: t.Any) -> str:
    """The id of the one email a successful change handed to Celery."""
    assert response.status_code == 200, response.get_json()
    notifications = response.get_json()["notifications"]
    assert [n["channel"] for n in notifications["dispatched"]] == ["log"]
    assert notifications["failed"] == []
    [mail] = notifications["pending"]
    assert mail["channel"] == "mail"
    return str(mail["id"])


def received(worker: Worker) -> list[str]:
    """The ids of the tasks the worker received, in order."""
    return re.findall(r"Task notifyqueue\.deliver\[(\w+)\] received", worker.log_text())


def start_worker(make_worker: MakeWorker, env: dict[str, str], queue: str) -> Worker:
    return make_worker(TARGET, queue, env=env)


def test_a_committed_requests_email_is_sent_by_the_worker_exactly_once(
    broker_url: str,
    celery_queue: str,
    sample_env: dict[str, str],
    client: FlaskClient,
    smtp_server: SMTPServer,
    make_worker: MakeWorker,
    guard_keys: list[str],
) -> None:
    kermit = create_kermit(client)
    response = client.put(f"/froggies/{kermit}/colour", json={"colour": "red"})
    intent_id = pending_mail(response)
    guard_keys.append(intent_id)
    # Published after the commit; no email sent by the web process.
    assert queued(broker_url, celery_queue) == 1
    time.sleep(0.5)
    assert smtp_server.messages == []

    worker = start_worker(make_worker, sample_env, celery_queue)
    wait_until(lambda: smtp_server.messages, 20, worker.log_tail)
    worker.wait_for_log(rf"notifyqueue\.deliver\[{intent_id}\] succeeded.*'delivered'")
    # The worker sent it: its log has the sample's "Sent email" line.
    assert "Sent email: Froggy colour updated" in worker.log_text()
    time.sleep(0.5)
    assert smtp_server.intent_ids() == [intent_id]
    [message] = smtp_server.messages
    assert message["Subject"] == "Froggy colour updated"
    assert "new colour: red" in message.get_body(("plain",)).get_content()
    assert smtp_server.envelopes == [["froggy-admins@example.com"]]
    assert received(worker) == [intent_id]
    assert queued(broker_url, celery_queue) == 0


def test_a_failed_request_sends_nothing(
    broker_url: str,
    celery_queue: str,
    sample_env: dict[str, str],
    client: FlaskClient,
    smtp_server: SMTPServer,
    make_worker: MakeWorker,
    guard_keys: list[str],
) -> None:
    kermit = create_kermit(client)
    # The README's failing batch: its first operation's email is never sent.
    failed = client.post(
        "/batch",
        json={
            "operations": [
                {"op": "colour", "id": kermit, "colour": "blue"},
                {"op": "jump", "id": 99, "jump_height": "1 metre"},
            ]
        },
    )
    assert failed.status_code == 404
    assert failed.get_json() == {"error": "operations[1]: no froggy with id 99."}
    assert queued(broker_url, celery_queue) == 0
    # A marker after it: once the worker has sent the marker's email, it has
    # run every task published before it (one worker, one at a time).
    marker = client.put(f"/froggies/{kermit}/colour", json={"colour": "purple"})
    marker_id = pending_mail(marker)
    guard_keys.append(marker_id)
    assert queued(broker_url, celery_queue) == 1
    time.sleep(0.5)
    assert smtp_server.messages == []

    worker = start_worker(make_worker, sample_env, celery_queue)
    wait_until(lambda: smtp_server.messages, 20, worker.log_tail)
    worker.wait_for_log(rf"notifyqueue\.deliver\[{marker_id}\] succeeded.*'delivered'")
    time.sleep(0.5)
    assert smtp_server.intent_ids() == [marker_id]
    body = smtp_server.messages[0].get_body(("plain",)).get_content()
    assert "new colour: purple" in body
    assert received(worker) == [marker_id]
    assert client.get(f"/froggies/{kermit}").get_json()["froggy"]["colour"] == (
        "purple"
    )
