"""A tiny Celery app for testing the test infrastructure itself (no notifyqueue).

A worker runs it as ``celery -A tests.celery_echo_app:celery_app worker ...``
with ``ECHO_BROKER_URL`` in its environment, and optionally
``ECHO_TRANSPORT_OPTIONS``, a JSON object of broker transport options. A test
publishes to the same broker with :func:`make_app`.

The one task, ``echo.append``, appends a line to a file; with ``hold`` it
first appends ``started <line>`` to ``<path>.started``, then sleeps, so a
test can kill the worker in the middle of it. It acknowledges late and is
rejected (requeued) when its worker is lost, like ``notifyqueue.deliver``.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

from celery import Celery

TASK = "echo.append"


def fast_fail_options(broker_url: str, timeout: float) -> dict[str, t.Any]:
    """Celery settings for a publisher that gives up on a dead broker quickly."""
    options: dict[str, t.Any] = {"max_retries": 0}  # one connection attempt
    if broker_url.startswith("redis"):
        options |= {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    else:
        options |= {"read_timeout": timeout, "write_timeout": timeout}
    return {
        "broker_connection_timeout": timeout,
        "broker_transport_options": options,
    }


def make_app(broker_url: str, **settings: t.Any) -> Celery:
    """A Celery app of the echo task on ``broker_url``; settings override.

    It is not the current app, so tests can have several.
    """
    app = Celery("celery_echo_app", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        # A worker of a test leaves no remote-control queue behind.
        worker_enable_remote_control=False,
    )
    app.conf.update(settings)

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, shared=False)
    def append(path: str, line: str, hold: float = 0.0) -> None:
        if hold:
            with open(f"{path}.started", "a") as started:
                started.write(f"started {line}\n")
            time.sleep(hold)
        with open(path, "a") as file:
            file.write(f"{line}\n")

    return app


def __getattr__(name: str) -> t.Any:
    # The worker's app is built on first access, from the environment, so the
    # test process can import this module without one.
    if name == "celery_app":
        options = json.loads(os.environ.get("ECHO_TRANSPORT_OPTIONS", "{}"))
        app = make_app(os.environ["ECHO_BROKER_URL"], broker_transport_options=options)
        globals()["celery_app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
