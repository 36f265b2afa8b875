from __future__ import annotations

import os
import typing as t

import pytest
from flask import Flask
from flask_mail import Mail

from notifyqueue import NotifyQueue
from notifyqueue.testing import shutdown

from .helpers import RecordingChannel, db
from .smtp import SMTPServer, free_port, start_smtp_server

__all__ = ["SMTPServer", "free_port", "require_postgres"]

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
        if "notifyqueue" in app.extensions:
            # Ends the app's background threads, if a test started them.
            shutdown(app, timeout=10)
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


@pytest.fixture
def make_smtp_server() -> t.Iterator[t.Callable[..., SMTPServer]]:
    """Start SMTP servers; keyword arguments go to aiosmtpd's ``Controller``."""
    stops: list[t.Callable[[], None]] = []

    def start(**options: t.Any) -> SMTPServer:
        server, stop = start_smtp_server(**options)
        stops.append(stop)
        return server

    yield start
    for stop in stops:
        stop()


@pytest.fixture
def smtp_server(make_smtp_server: t.Callable[..., SMTPServer]) -> SMTPServer:
    return make_smtp_server()
