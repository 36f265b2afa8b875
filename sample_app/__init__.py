"""A small froggy API that shows how notifyqueue is meant to be used.

Run ``flask --app sample_app demo`` for the demo, ``flask --app sample_app run``
to serve the API.
"""

from __future__ import annotations

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
}


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Build the app.

    Configuration comes from :data:`DEFAULT_CONFIG`, then from ``FLASK_*``
    environment variables (``FLASK_SQLALCHEMY_DATABASE_URI``,
    ``FLASK_MAIL_SERVER``, ...), then from ``config``. Without a
    ``MAIL_SERVER`` emails are not sent (``MAIL_SUPPRESS_SEND``), and the log
    says so. The tables are created if missing, the outbox's too (for
    ``FLASK_NOTIFYQUEUE_DURABLE=true``).
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULT_CONFIG)
    app.config.from_prefixed_env()
    if config is not None:
        app.config.from_mapping(config)
    if not app.config.get("MAIL_SERVER"):
        app.config.setdefault("MAIL_SUPPRESS_SEND", True)

    configure_logging(app)
    db.init_app(app)
    mail.init_app(app)
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


__all__ = ["create_app", "db", "mail", "notify"]
