"""The README's Usage code as a complete app: run ``python examples/quickstart.py``.

From a fresh checkout::

    python3 -m venv .venv && .venv/bin/python -m pip install -q -e ".[sample]"
    .venv/bin/python examples/quickstart.py

``examples/test_quickstart.py`` tests it the way the README's "Testing your
app" shows.
"""

from __future__ import annotations

import logging
import sys
import typing as t

from flask import Blueprint, Flask, request
from flask_mail import Mail, Message, email_dispatched
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from notifyqueue import BatchResult, NotifyQueue, deferred_notify, finalise


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(metadata=Base.metadata)
mail = Mail()
notify = NotifyQueue()
bp = Blueprint("froggies", __name__)


class Froggy(Base):
    __tablename__ = "froggy"

    id: Mapped[int] = mapped_column(primary_key=True)
    colour: Mapped[str] = mapped_column(default="green")
    is_jumping: Mapped[bool] = mapped_column(default=False)
    jump_height: Mapped[str | None]


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://",  # in memory: a fresh database per app
        MAIL_DEFAULT_SENDER="api@example.com",
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log"},  # the app's logger, at INFO
            "mail": {"type": "mail", "recipients": ["admins@example.com"]},
        },
    )
    app.config.from_prefixed_env()  # FLASK_MAIL_SERVER=host FLASK_MAIL_PORT=25 ...
    app.config.update(config or {})
    # No mail server configured: Flask-Mail builds each email and sends none.
    app.config.setdefault("MAIL_SUPPRESS_SEND", "MAIL_SERVER" not in app.config)
    db.init_app(app)
    mail.init_app(app)
    notify.init_app(app)  # after db and mail: it follows db.session
    app.register_blueprint(bp)
    with app.app_context():
        db.create_all()
    return app


@deferred_notify(
    log="Made froggy jump: {froggy.id}; jump height: {jump_height}",
    mail={
        "subject": "Made froggy jump",
        "body": "Froggy: {froggy.id}; jump height: {jump_height}",
    },
)
def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
    froggy.jump_height = jump_height
    froggy.is_jumping = True


@deferred_notify(
    log="Froggy colour updated: {froggy.id}; new value: {colour}",
    mail={
        "subject": "Froggy colour updated",
        "body": "Froggy: {froggy.id}; new colour: {colour}",
    },
)
def update_froggy_colour(froggy: Froggy, colour: str) -> None:
    froggy.colour = colour


def make_froggy_brightpink_and_highjump(froggy: Froggy) -> BatchResult:
    update_froggy_colour(froggy, "bright_pink", notify=["log"])
    make_froggy_jump(froggy, "50 metres")
    return finalise(commit=True)  # commit; then the two log lines, then the email


@bp.post("/froggies/<int:froggy_id>/jump")
def jump(froggy_id: int) -> dict[str, t.Any]:
    froggy = db.get_or_404(Froggy, froggy_id)
    make_froggy_jump(froggy, str(request.get_json()["jump_height"]))
    result = finalise(commit=True)  # commit, then the log line and the email
    return {"id": froggy.id, "notified": len(result.dispatched)}


@email_dispatched.connect
def log_email(app: Flask, message: Message) -> None:
    how = "not sent (MAIL_SUPPRESS_SEND)" if app.extensions["mail"].suppress else "sent"
    app.logger.info("Email %s: %s", how, message.subject)


def main() -> None:
    # Flask's logger shows only warnings until told otherwise: show INFO, on
    # stdout, so that the log lines and the prints below come out in order.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout
    )
    app = create_app()
    with app.app_context():
        froggy = Froggy(id=123)
        db.session.add(froggy)
        db.session.commit()  # nothing was queued: prints nothing

        result = make_froggy_brightpink_and_highjump(froggy)
        # INFO Froggy colour updated: 123; new value: bright_pink
        # INFO Made froggy jump: 123; jump height: 50 metres
        # INFO Email not sent (MAIL_SUPPRESS_SEND): Made froggy jump
        dispatched, failed = len(result.dispatched), len(result.failed)
        print(f"Committed: {dispatched} dispatched, {failed} failed.")
        # Committed: 3 dispatched, 0 failed.

        make_froggy_jump(froggy, "1 metre")
        finalise(commit=False)  # roll back: no log line, no email
        print(f"Rolled back: froggy 123 still jumps {froggy.jump_height}.")
        # Rolled back: froggy 123 still jumps 50 metres.


if __name__ == "__main__":
    main()
