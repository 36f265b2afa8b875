"""A small froggy API that shows how notifyqueue is meant to be used.

Run ``flask --app sample_app demo`` for the demo, ``flask --app sample_app run``
to serve the API. With ``FLASK_FROGGY_MAIL_DELIVERY=celery`` its emails go
through Celery: ``celery -A sample_app.make_celery worker --loglevel INFO``
sends them.
"""

from __future__ import annotations

import copy
import typing as t

from flask import Flask

from notifyqueue import outbox

from .demo import demo_command
from .extensions import db, mail, notify
from .logs import configure_logging, connect_receivers
from .views import IdConverter, bp, register_error_handlers

DEFAULT_CONFIG: dict[str, t.Any] = {
    # Relative SQLite paths live in the app's instance folder.
    "SQLALCHEMY_DATABASE_URI": "sqlite:///froggies.db",
    "MAIL_DEFAULT_SENDER": "froggy-api@example.com",
    "MAX_CONTENT_LENGTH": 64 * 1024,
    "NOTIFYQUEUE_CHANNELS": {
        "log": {"type": "log"},
        "mail": {"type": "mail", "recipients": ["froggy-admins@example.com"]},
    },
    # The mail channel's "delivery": None keeps notifyqueue's default
    # (NOTIFYQUEUE_DELIVERY); "celery" hands the emails to a Celery worker.
    "FROGGY_MAIL_DELIVERY": None,
    # Celery's settings, as in Flask's Celery guide; read only when a channel
    # is delivered by Celery (FLASK_CELERY__broker_url=... to change one).
    "CELERY": {
        "broker_url": "redis://127.0.0.1:6379/0",
        "task_ignore_result": True,
    },
}


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Build the app.

    Configuration comes from :data:`DEFAULT_CONFIG`, then from ``FLASK_*``
    environment variables (``FLASK_SQLALCHEMY_DATABASE_URI``,
    ``FLASK_MAIL_SERVER``, ...), then from ``config``. Without a
    ``MAIL_SERVER`` emails are not sent (``MAIL_SUPPRESS_SEND``), and the log
    says so. ``FROGGY_MAIL_DELIVERY`` sets the mail channel's delivery mode;
    when a channel is ``"celery"``, the app's Celery app is made from
    ``CELERY`` as Flask's Celery guide does. The tables are created if
    missing, the outbox's too (for ``FLASK_NOTIFYQUEUE_DURABLE=true``).
    """
    app = Flask(__name__)
    # A copy: FLASK_CELERY__broker_url and the like set keys inside the dicts.
    app.config.from_mapping(copy.deepcopy(DEFAULT_CONFIG))
    app.config.from_prefixed_env()
    if config is not None:
        app.config.from_mapping(config)
    if not app.config.get("MAIL_SERVER"):
        app.config.setdefault("MAIL_SUPPRESS_SEND", True)
    _set_mail_delivery(app)

    configure_logging(app)
    db.init_app(app)
    mail.init_app(app)
    if _uses_celery(app):
        # Imported here: without a Celery channel the sample never imports it.
        from .celery_app import celery_init_app

        celery_init_app(app)  # before notify.init_app, which registers its task
    notify.init_app(app)  # after db and mail: it follows db.session and uses mail
    connect_receivers(app)
    app.url_map.converters["int"] = IdConverter
    app.register_blueprint(bp)
    register_error_handlers(app)
    app.cli.add_command(demo_command)

    with app.app_context():
        db.create_all()
        outbox.create(db.engine)
    return app


def _set_mail_delivery(app: Flask) -> None:
    """Put ``FROGGY_MAIL_DELIVERY``, if set, in the mail channel's options."""
    delivery = app.config["FROGGY_MAIL_DELIVERY"]
    if delivery is None:
        return
    channels = dict(app.config["NOTIFYQUEUE_CHANNELS"])
    channels["mail"] = {**channels["mail"], "delivery": delivery}
    app.config["NOTIFYQUEUE_CHANNELS"] = channels


def _uses_celery(app: Flask) -> bool:
    """Whether an enabled channel is delivered by Celery."""
    default = app.config.get("NOTIFYQUEUE_DELIVERY", "inline")
    return any(
        options.get("enabled", True) is not False
        and options.get("delivery", default) == "celery"
        for options in app.config["NOTIFYQUEUE_CHANNELS"].values()
    )


__all__ = ["create_app", "db", "mail", "notify"]
