"""The app's log format, and the log lines it writes from notifyqueue's signals."""

from __future__ import annotations

import logging
import typing as t

from flask import Flask
from flask.logging import default_handler, wsgi_errors_stream

from notifyqueue import Intent, signals

LOG_FORMAT = "%(levelname)s [%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _AppLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (so it can replace it)."""


def configure_logging(app: Flask, stream: t.TextIO | None = None) -> None:
    """Log the app's records at INFO and above as ``LEVEL [time] message``.

    :param stream: where to write; by default the WSGI error stream
        (``sys.stderr`` outside a request), looked up at each record.
    """
    logger = app.logger
    logger.removeHandler(default_handler)
    # The logger is shared by every app of this name: keep only one of ours.
    for handler in [h for h in logger.handlers if isinstance(h, _AppLogHandler)]:
        logger.removeHandler(handler)
    handler = _AppLogHandler(stream if stream is not None else wsgi_errors_stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def log_through_celery(app: Flask) -> None:
    """In a Celery worker, leave the app's records to the worker's own log.

    The worker hands its standard streams to its logger and logs every record
    that reaches the root logger, so the handler :func:`configure_logging`
    installed would write each line twice. Without it the app's records
    propagate to the worker's handler, in Celery's format, once.
    """
    logger = app.logger
    for handler in [h for h in logger.handlers if isinstance(h, _AppLogHandler)]:
        logger.removeHandler(handler)


def connect_receivers(app: Flask) -> None:
    """Log each commit that carries notifications, and each email sent."""
    signals.batch_committed.connect(_log_commit, sender=app)
    signals.intent_dispatched.connect(_log_email, sender=app)


def _log_commit(app: Flask, **kwargs: t.Any) -> None:
    app.logger.info("Committed DB transaction")


def _log_email(app: Flask, *, intent: Intent, **kwargs: t.Any) -> None:
    if intent.channel != "mail":
        return
    if app.extensions["mail"].suppress:
        app.logger.info(
            "Email not sent (MAIL_SUPPRESS_SEND): %s", intent.payload["subject"]
        )
    else:
        app.logger.info("Sent email: %s", intent.payload["subject"])
