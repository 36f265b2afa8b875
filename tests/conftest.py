from __future__ import annotations

import asyncio
import os
import socket
import typing as t
from dataclasses import dataclass, field
from email import message_from_bytes, policy

import pytest
from flask import Flask
from flask_mail import Mail

from notifyqueue import NotifyQueue

from .helpers import RecordingChannel, db

POSTGRES_URL = os.environ.get(
    "NOTIFYQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("NOTIFYQUEUE_REQUIRE_SERVICES") == "1"

_postgres_error: list[str | None] = []


def _postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None; checked once per run."""
    if not _postgres_error:
        import sqlalchemy as sa

        try:
            engine = sa.create_engine(POSTGRES_URL)
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            engine.dispose()
            _postgres_error.append(None)
        except Exception as exc:  # any failure means: not usable here
            _postgres_error.append(f"PostgreSQL at {POSTGRES_URL} unreachable: {exc}")
    return _postgres_error[0]


def require_postgres() -> str:
    """The URL of this run's own schema on PostgreSQL, or skip (or fail) the test.

    Each pytest process works in a schema of its own, so concurrent runs on
    one server do not drop each other's tables.
    """
    reason = _postgres_unreachable()
    if reason is not None:
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (NOTIFYQUEUE_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return f"{POSTGRES_URL}?options=-csearch_path%3D{_SCHEMA}"


_SCHEMA = f"notifyqueue_test_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _postgres_schema() -> t.Iterator[None]:
    """Create this run's PostgreSQL schema if the server is there; drop it after."""
    if _postgres_unreachable() is not None:
        yield
        return
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {_SCHEMA} CASCADE"))
        connection.execute(sa.text(f"CREATE SCHEMA {_SCHEMA}"))
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {_SCHEMA} CASCADE"))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    """A fresh database: a SQLite file, or the machine's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return require_postgres()


@pytest.fixture
def make_app(database_url: str) -> t.Iterator[t.Callable[..., Flask]]:
    """Build an app with Flask-SQLAlchemy, Flask-Mail and NotifyQueue.

    Keyword arguments become config; the default channels are ``log`` and a
    :class:`RecordingChannel` named ``rec``.
    """
    apps: list[Flask] = []

    def factory(init: bool = True, **config: t.Any) -> Flask:
        app = Flask(f"test_app_{len(apps)}")
        app.config.update(
            TESTING=True,
            SQLALCHEMY_DATABASE_URI=database_url,
            MAIL_DEFAULT_SENDER="notify@example.com",
            NOTIFYQUEUE_CHANNELS={
                "log": {"type": "log"},
                "rec": {"type": "tests.helpers:RecordingChannel"},
            },
        )
        app.config.update(config)
        db.init_app(app)
        Mail(app)
        if init:
            NotifyQueue(app)
        with app.app_context():
            db.drop_all()
            db.create_all()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def app(make_app: t.Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def rec(app: Flask) -> RecordingChannel:
    """The app's recording channel."""
    channel = app.extensions["notifyqueue"].channels["rec"]
    assert isinstance(channel, RecordingChannel)
    return channel


@pytest.fixture
def ctx(app: Flask) -> t.Iterator[None]:
    with app.app_context():
        yield


@dataclass
class SMTPServer:
    """A real SMTP server (aiosmtpd) on a free loopback port.

    ``messages`` holds each message received, parsed; ``envelopes`` the
    recipients each was accepted for; ``connections`` counts SMTP sessions;
    addresses in ``refuse`` are answered 550.

    ``faults`` injects a failure at the Nth MAIL command the server receives
    (counted from 1 in ``mail_commands``, across connections):

    - ``"550"``: refuse the sender; the connection goes on;
    - ``"421"``: answer "service closing" and close the connection;
    - ``"drop"``: drop the connection without an answer;
    - ``"stall"``: answer only after ``stall_seconds``, past a client's timeout.
    """

    host: str
    port: int
    messages: list[t.Any] = field(default_factory=list)
    envelopes: list[list[str]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    connections: int = 0
    faults: dict[int, str] = field(default_factory=dict)
    mail_commands: int = 0
    stall_seconds: float = 2.0

    def config(self) -> dict[str, t.Any]:
        return {
            "MAIL_SERVER": self.host,
            "MAIL_PORT": self.port,
            "MAIL_SUPPRESS_SEND": False,
        }

    def intent_ids(self) -> list[str]:
        """The X-Notifyqueue-Intent header of each message received, in order."""
        return [message["X-Notifyqueue-Intent"] for message in self.messages]


class _Handler:
    def __init__(self, server: SMTPServer) -> None:
        self.server = server

    # Every SMTP session smtplib opens starts with EHLO (or HELO as fallback).
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.server.connections += 1
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):  # type: ignore[no-untyped-def]
        self.server.connections += 1
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        self.server.mail_commands += 1
        fault = self.server.faults.get(self.server.mail_commands)
        if fault == "550":
            return "550 5.7.1 sender refused"
        if fault in ("421", "drop"):
            if fault == "421":
                await server.push("421 4.3.2 service shutting down")
            server.transport.abort()
            return "250 OK"  # never reaches the client: the connection is gone
        if fault == "stall":
            await asyncio.sleep(self.server.stall_seconds)
        elif fault is not None:
            raise ValueError(f"unknown SMTP fault {fault!r}")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        if address in self.server.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.server.envelopes.append(list(envelope.rcpt_tos))
        self.server.messages.append(
            message_from_bytes(envelope.content, policy=policy.default)
        )
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def make_smtp_server() -> t.Iterator[t.Callable[..., SMTPServer]]:
    """Start SMTP servers; keyword arguments go to aiosmtpd's ``Controller``."""
    from aiosmtpd.controller import Controller

    controllers: list[t.Any] = []

    def start(**options: t.Any) -> SMTPServer:
        server = SMTPServer("127.0.0.1", free_port())
        controller = Controller(
            _Handler(server),
            hostname=server.host,
            port=server.port,
            loop=asyncio.new_event_loop(),
            **options,
        )
        controller.start()
        controllers.append(controller)
        return server

    yield start
    for controller in controllers:
        controller.stop()
        controller.loop.close()


@pytest.fixture
def smtp_server(make_smtp_server: t.Callable[..., SMTPServer]) -> SMTPServer:
    return make_smtp_server()
