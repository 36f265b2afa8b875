"""Celery delivery's start-up checks: what init_app refuses, and what it sets up.

No broker is contacted here: init_app connects to nothing.
"""

from __future__ import annotations

import sys
import typing as t

import pytest
from celery import Celery
from flask import Flask

from notifyqueue import ConfigurationError, NotifyQueue, TemplateError, deferred_notify
from notifyqueue.celery import TASK_NAME, register
from notifyqueue.delivery.celery import CeleryDelivery

from .celery_app import celery_init_app
from .helpers import db

REDIS = "redis://127.0.0.1:6379/5"


def _app(celery: bool = True, broker: str = REDIS, **config: t.Any) -> Flask:
    app = Flask("celery_config_app")
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI="sqlite://",
        CELERY={"broker_url": broker},
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "delivery": "celery", "celery_queue": "mail"},
        },
    )
    app.config.update(config)
    db.init_app(app)
    if celery:
        celery_init_app(app)
    return app


def test_a_celery_channel_without_a_celery_app_names_flasks_guide() -> None:
    app = _app(celery=False)
    with pytest.raises(ConfigurationError, match=r"celery_init_app\(app\)") as info:
        NotifyQueue(app)
    assert "patterns/celery" in str(info.value)
    assert "notifyqueue" not in app.extensions


def test_init_app_registers_the_deliver_task_with_late_acks() -> None:
    app = _app()
    NotifyQueue(app)
    celery_app = app.extensions["celery"]
    task = celery_app.tasks[TASK_NAME]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.ignore_result is True
    assert register(celery_app) is task  # a second registration is the same task


def test_the_guard_defaults_to_the_redis_broker() -> None:
    app = _app()
    NotifyQueue(app)
    mode = app.extensions["notifyqueue"].modes["celery"]
    assert isinstance(mode, CeleryDelivery)
    assert mode.guard.url == REDIS


def test_the_guard_defaults_to_a_redis_result_backend_behind_rabbitmq() -> None:
    app = _app(broker="amqp://guest:guest@127.0.0.1:5672//")
    app.extensions["celery"].conf.result_backend = "redis://127.0.0.1:6379/7"
    NotifyQueue(app)
    assert app.extensions["notifyqueue"].modes["celery"].guard.url == (
        "redis://127.0.0.1:6379/7"
    )


def test_no_redis_to_guard_with_is_a_start_up_error() -> None:
    app = _app(broker="amqp://guest:guest@127.0.0.1:5672//")
    with pytest.raises(ConfigurationError, match="NOTIFYQUEUE_CELERY_GUARD"):
        NotifyQueue(app)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("NOTIFYQUEUE_CELERY_GUARD", "amqp://x", "redis://"),
        ("NOTIFYQUEUE_CELERY_GUARD", 6379, "redis://"),
        ("NOTIFYQUEUE_CELERY_LEASE", 0, "above 0"),
        ("NOTIFYQUEUE_CELERY_RETAIN", -1, "above 0"),
        ("NOTIFYQUEUE_CELERY_PUBLISH_TIMEOUT", "1", "above 0"),
        ("NOTIFYQUEUE_CELERY_PUBLISH_TIMEOUT", float("inf"), "above 0"),
    ],
)
def test_bad_celery_settings_are_start_up_errors(
    key: str, value: t.Any, match: str
) -> None:
    app = _app(**{key: value})
    with pytest.raises(ConfigurationError, match=match) as info:
        NotifyQueue(app)
    assert key in str(info.value)


def test_the_celery_settings_are_checked_even_without_a_celery_channel() -> None:
    app = _app(
        NOTIFYQUEUE_CHANNELS={"log": {"type": "log"}}, NOTIFYQUEUE_CELERY_LEASE=0
    )
    with pytest.raises(ConfigurationError, match="NOTIFYQUEUE_CELERY_LEASE"):
        NotifyQueue(app)


def test_celery_queue_on_a_channel_not_delivered_by_celery_is_refused() -> None:
    app = _app(NOTIFYQUEUE_CHANNELS={"log": {"type": "log", "celery_queue": "mail"}})
    with pytest.raises(ConfigurationError, match="'delivery': 'celery'"):
        NotifyQueue(app)


@pytest.mark.parametrize("queue", ["", "  ", 5, None])
def test_celery_queue_must_name_a_queue(queue: t.Any) -> None:
    app = _app(
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "delivery": "celery", "celery_queue": queue}
        }
    )
    with pytest.raises(ConfigurationError, match="name of a Celery queue"):
        NotifyQueue(app)


def test_a_celery_channels_retry_options_are_checked() -> None:
    app = _app(
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "delivery": "celery", "max_attempts": 0}
        }
    )
    with pytest.raises(ConfigurationError, match="max_attempts"):
        NotifyQueue(app)


def test_celery_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app()
    monkeypatch.setitem(sys.modules, "celery", None)  # import celery -> ImportError
    with pytest.raises(ConfigurationError, match=r"notifyqueue\[celery\]"):
        NotifyQueue(app)


def test_strict_mode_is_refused_with_a_celery_channel() -> None:
    app = _app(NOTIFYQUEUE_STRICT=True)
    with pytest.raises(ConfigurationError, match="NOTIFYQUEUE_STRICT"):
        NotifyQueue(app)


def test_channels_shows_the_celery_queue() -> None:
    app = _app(
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log", "delivery": "celery", "celery_queue": "mail"},
            "audit": {"type": "log", "delivery": "celery", "durable": True},
            "plain": {"type": "log"},
        }
    )
    NotifyQueue(app)
    output = app.test_cli_runner().invoke(args=["notifyqueue", "channels"]).output
    lines = output.splitlines()
    assert lines[0] == "log: type=log delivery=celery queue=mail options={}"
    assert (
        lines[1]
        == "audit: type=log delivery=celery queue=celery durable=True options={}"
    )
    assert lines[2] == "plain: type=log delivery=inline options={}"


def test_the_task_is_registered_on_the_apps_celery_app_only() -> None:
    app = _app()
    NotifyQueue(app)
    other = Celery("another", broker=REDIS)
    other.finalize()
    assert TASK_NAME in app.extensions["celery"].tasks
    assert TASK_NAME not in other.tasks


def test_a_refused_init_app_registers_no_task_on_the_celery_app() -> None:
    app = _app(
        NOTIFYQUEUE_CHANNELS={
            "strict": {"type": "tests.helpers:StrictChannel", "delivery": "celery"}
        }
    )

    # Refused by the channel when init_app checks the decorated functions,
    # after the delivery modes were built.
    @deferred_notify(strict={"txt": "wrong key"})
    def refused() -> None: ...

    with pytest.raises(TemplateError, match="unknown key 'txt'"):
        NotifyQueue(app)
    assert TASK_NAME not in app.extensions["celery"].tasks
