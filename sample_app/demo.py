"""``flask --app sample_app demo``: notifyqueue at work, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import textwrap
import typing as t

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy.exc import IntegrityError

from notifyqueue import finalise

from .extensions import db
from .froggies import (
    apply,
    create_froggy,
    get_froggy,
    make_froggy_brightpink_and_highjump,
)
from .logs import configure_logging

FROGGY_ID = 123
FROGGY_NAME = "Freddie"


class _Inbox:
    """An aiosmtpd handler that keeps each message it receives, as text."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.messages: list[str] = []

    async def handle_DATA(self, server: t.Any, session: t.Any, envelope: t.Any) -> str:
        content = envelope.content
        if isinstance(content, bytes):
            content = content.decode("utf-8", "replace")
        self.messages.append(content.replace("\r\n", "\n"))
        return "250 Message accepted for delivery"


@contextlib.contextmanager
def _local_smtp_server() -> t.Iterator[_Inbox]:
    """A real SMTP server on a free loopback port, for the demo's run."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError as exc:
        raise click.ClickException(
            "The demo's local SMTP server needs aiosmtpd: run"
            ' pip install -e ".[sample]", or set FLASK_MAIL_SERVER to send'
            " through your own server."
        ) from exc
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    inbox = _Inbox("127.0.0.1", port)
    loop = asyncio.new_event_loop()
    controller = Controller(inbox, hostname=inbox.host, port=port, loop=loop)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()
        loop.close()


@click.command("demo")
@click.option(
    "--database-url",
    metavar="URL",
    help="Run on this SQLAlchemy database URL instead of a throwaway SQLite"
    f" file. It must not hold froggy {FROGGY_ID} or a froggy named"
    f" {FROGGY_NAME!r}.",
)
@with_appcontext
def demo_command(database_url: str | None) -> None:
    """Commit a batch and watch its notifications go out; then fail one.

    Without MAIL_SERVER the email goes to an SMTP server started on a free
    loopback port for the run, and the message it received is printed.
    """
    from . import create_app

    with contextlib.ExitStack() as stack:
        if database_url is None:
            directory = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="froggy-demo-")
            )
            database_url = f"sqlite:///{os.path.join(directory, 'demo.db')}"
        config: dict[str, t.Any] = {
            "SQLALCHEMY_DATABASE_URI": database_url,
            "MAIL_SUPPRESS_SEND": False,
        }
        inbox = None
        if not current_app.config.get("MAIL_SERVER"):
            inbox = stack.enter_context(_local_smtp_server())
            config.update(MAIL_SERVER=inbox.host, MAIL_PORT=inbox.port)
        app = create_app(config)
        configure_logging(app, sys.stdout)
        with app.app_context():
            try:
                _run(app, inbox)
            finally:
                db.session.remove()
                db.engine.dispose()


def _run(app: Flask, inbox: _Inbox | None) -> None:
    try:
        froggy = create_froggy(FROGGY_NAME, froggy_id=FROGGY_ID)
        finalise(commit=True)
    except IntegrityError:
        raise click.ClickException(
            f"The database already holds froggy {FROGGY_ID} or a froggy named"
            f" {FROGGY_NAME!r}: give --database-url an empty database, or leave"
            " it out to use a throwaway one."
        ) from None

    # One transaction: the commit, two log lines, then one email.
    result = make_froggy_brightpink_and_highjump(froggy)

    mail = app.extensions["mail"]
    if result.failed:
        # The data is committed; notifyqueue has logged the traceback.
        ((_, error),) = result.failed
        advice = (
            " Check FLASK_MAIL_SERVER and FLASK_MAIL_PORT, or unset them to use"
            " a local SMTP server."
            if inbox is None
            else ""
        )
        raise click.ClickException(
            "The email was not delivered through MAIL_SERVER"
            f" {mail.server}:{mail.port}: {error!r}.{advice}"
        )
    if inbox is None:
        click.echo(f"\nThe email went to the MAIL_SERVER {mail.server}:{mail.port}.")
    else:
        click.echo(
            f"\nThe SMTP server on {inbox.host}:{inbox.port} received"
            f" {len(inbox.messages)} message(s):"
        )
        for message in inbox.messages:
            click.echo(textwrap.indent(message.rstrip("\n"), "    "))
    received = len(inbox.messages) if inbox is not None else 0

    click.echo(
        f"\nA batch whose commit fails: froggy {FROGGY_ID} jumps 1 metre, and a"
        f" second froggy named {FROGGY_NAME!r} is created (names are unique)."
    )
    try:
        apply("jump", {"id": FROGGY_ID, "jump_height": "1 metre"})
        apply("create", {"name": FROGGY_NAME})
        finalise(commit=True)
    except IntegrityError as exc:
        reason = " ".join(str(exc.orig).split())
        app.logger.error("Commit failed, so nothing was notified: %s", reason)
    else:
        raise click.ClickException("The failing batch committed; this is a bug.")
    froggy = get_froggy(FROGGY_ID)
    click.echo(
        f"Froggy {FROGGY_ID} still jumps {froggy.jump_height}, and no notification"
        " was sent"
        + (
            f" (the SMTP server received {len(inbox.messages) - received} more"
            " messages)."
            if inbox is not None
            else "."
        )
    )
