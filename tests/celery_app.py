"""The Flask app of the Celery tests, in the test process and in a real worker.

A test builds its config as a JSON-able dict, makes its app with
:func:`create_app` and starts a worker with that same dict in
``NOTIFYQUEUE_TEST_CELERY_CONFIG``; the worker imports this module
(``celery -A tests.celery_app:celery_app worker``), which builds the same app:
the same channels, the same mail server, the same database.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

from celery import Celery
from flask import Flask
from flask_mail import Mail

from notifyqueue import (
    Channel,
    NotifyQueue,
    PermanentFailure,
    TransientFailure,
    signals,
)
from sample_app.celery_app import celery_init_app

from .helpers import db

if t.TYPE_CHECKING:
    from notifyqueue import Intent

CONFIG_ENV = "NOTIFYQUEUE_TEST_CELERY_CONFIG"


def create_app(config: dict[str, t.Any]) -> Flask:
    """The app of ``config``.

    Two test-only keys: ``TEST_SIGNAL_LOG``, a file each notifyqueue signal
    about an intent appends ``<signal> <intent id>`` to (in whichever process
    sends it); ``TEST_BARE_CELERY``, a Celery app made without the guide's
    ``FlaskTask`` (its tasks run with no app context pushed).
    """
    app = Flask("celery_test_app")
    app.config.update(TESTING=True, MAIL_DEFAULT_SENDER="notify@example.com")
    app.config.update(config)
    db.init_app(app)
    Mail(app)
    if app.config.get("TEST_BARE_CELERY"):
        bare = Celery(app.name)
        bare.config_from_object(app.config["CELERY"])
        app.extensions["celery"] = bare
    else:
        celery_init_app(app)
    NotifyQueue(app)
    if app.config.get("TEST_SIGNAL_LOG"):
        _log_signals(app, app.config["TEST_SIGNAL_LOG"])
    return app


def _log_signals(app: Flask, path: str) -> None:
    def receiver(name: str) -> t.Callable[..., None]:
        def record(sender: Flask, *, intent: Intent, **kwargs: t.Any) -> None:
            with open(path, "a", encoding="utf-8") as file:
                file.write(f"{name} {intent.id}\n")

        return record

    for name in (
        "intent_dispatched",
        "intent_failed",
        "intent_retrying",
        "intent_dead",
    ):
        # Strongly held: the receivers live as long as the app.
        getattr(signals, name).connect(receiver(name), sender=app, weak=False)


class FileChannel(Channel):
    """Appends ``<intent id> <payload>`` lines to a file, one write each.

    A payload starting with ``transient:<n>`` fails transiently the first
    ``n`` times its intent is sent (counted in ``<path>.tries``); one starting
    with ``permanent`` always fails permanently; ``sleep:<s>`` appends
    ``<intent id> <pid>`` to ``<path>.started``, then sleeps ``s`` seconds
    before writing (a task to kill in the middle).
    """

    def __init__(self, name: str, *, path: str) -> None:
        super().__init__(name)
        self.path = path

    def send(self, intents: list[Intent]) -> None:
        for intent in intents:
            text = str(intent.payload)
            if text.startswith("sleep:"):
                with open(f"{self.path}.started", "a", encoding="utf-8") as file:
                    file.write(f"{intent.id} {os.getpid()}\n")
                time.sleep(float(text.split(":")[1].split()[0]))
            if text.startswith("permanent"):
                raise PermanentFailure(f"{intent.id} refused for good")
            if text.startswith("transient:"):
                wanted = int(text.split(":")[1].split()[0])
                if self._tries(intent.id) <= wanted:
                    raise TransientFailure(f"{intent.id} not this time")
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(f"{intent.id} {text}\n")

    def _tries(self, intent_id: str) -> int:
        with open(f"{self.path}.tries", "a", encoding="utf-8") as file:
            file.write(f"{intent_id}\n")
        with open(f"{self.path}.tries", encoding="utf-8") as file:
            return sum(1 for line in file if line.strip() == intent_id)


def sent_lines(path: str) -> list[str]:
    """The lines a FileChannel wrote, in order."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\n") for line in file]


# The worker's app: built when the worker imports this module.
if CONFIG_ENV in os.environ:
    flask_app = create_app(json.loads(os.environ[CONFIG_ENV]))
    celery_app = flask_app.extensions["celery"]
