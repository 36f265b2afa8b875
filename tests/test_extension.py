"""The Flask extension: app-factory shape, session choice, config validation, order."""

from __future__ import annotations

import gc
import re
import threading
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from notifyqueue import (
    ChannelNotFound,
    ConfigurationError,
    Intent,
    LifecycleError,
    NotifyQueue,
    TemplateError,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)
from notifyqueue.testing import capture

from .conftest import require_postgres
from .helpers import Item, RecordingChannel, db

REC = {"type": "tests.helpers:RecordingChannel"}

both_databases = pytest.mark.parametrize(
    "database_url", ["sqlite", "postgresql"], indirect=True
)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    """SQLite unless a test asks for both databases with ``both_databases``.

    Most rules here do not depend on the database, so they run on SQLite only.
    """
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return require_postgres()


def channel(app: Flask, name: str) -> RecordingChannel:
    found = app.extensions["notifyqueue"].channels[name]
    assert isinstance(found, RecordingChannel)
    return found


def payloads(intents: t.Iterable[Intent]) -> list[t.Any]:
    return [intent.payload for intent in intents]


# --- app-factory shape -------------------------------------------------------


def test_init_app_stores_state_in_app_extensions(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(init=False)
    assert "notifyqueue" not in app.extensions
    NotifyQueue().init_app(app)
    state = app.extensions["notifyqueue"]
    assert list(state.channels) == ["log", "rec"]
    assert isinstance(state.channels["rec"], RecordingChannel)


def test_constructor_with_app_initialises_it(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(init=False)
    NotifyQueue(app)
    assert list(app.extensions["notifyqueue"].channels) == ["log", "rec"]


def test_one_extension_serves_two_apps_with_their_own_config(
    make_app: t.Callable[..., Flask],
) -> None:
    notify = NotifyQueue()
    first = make_app(
        init=False, NOTIFYQUEUE_CHANNELS={"rec": REC}, NOTIFYQUEUE_ORDER="call"
    )
    second = make_app(
        init=False, NOTIFYQUEUE_CHANNELS={"other": REC, "log": {"type": "log"}}
    )
    notify.init_app(first)
    notify.init_app(second)

    first_state = first.extensions["notifyqueue"]
    second_state = second.extensions["notifyqueue"]
    assert list(first_state.channels) == ["rec"]
    assert list(second_state.channels) == ["other", "log"]
    assert (first_state.order, second_state.order) == ("call", "channel")

    with first.app_context():
        enqueue("rec", "from first")
        finalise()
    with second.app_context():
        enqueue("other", "from second")
        finalise()
        with pytest.raises(ChannelNotFound):
            enqueue("rec", "the second app has no rec channel")
    assert channel(first, "rec").sent == ["from first"]
    assert channel(second, "other").sent == ["from second"]


def test_nothing_per_app_is_stored_on_the_extension_object(
    make_app: t.Callable[..., Flask],
) -> None:
    notify = NotifyQueue()
    attributes = dict(vars(notify))
    notify.init_app(make_app(init=False))
    notify.init_app(make_app(init=False, NOTIFYQUEUE_ORDER="call"))
    assert vars(notify) == attributes
    assert not any(isinstance(value, Flask) for value in vars(notify).values())


def test_config_defaults_are_visible_in_app_config(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(init=False)
    del app.config["NOTIFYQUEUE_CHANNELS"]
    NotifyQueue(app)
    assert app.config["NOTIFYQUEUE_CHANNELS"] == {"log": {"type": "log"}}
    assert app.config["NOTIFYQUEUE_ORDER"] == "channel"
    assert app.config["NOTIFYQUEUE_STRICT"] is False
    assert list(app.extensions["notifyqueue"].channels) == ["log"]


def test_config_defaults_do_not_override_given_values(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(init=False, NOTIFYQUEUE_ORDER="call", NOTIFYQUEUE_STRICT=True)
    NotifyQueue(app)
    assert app.config["NOTIFYQUEUE_ORDER"] == "call"
    assert app.config["NOTIFYQUEUE_STRICT"] is True
    assert app.config["NOTIFYQUEUE_CHANNELS"] == {"log": {"type": "log"}, "rec": REC}
    state = app.extensions["notifyqueue"]
    assert (state.order, state.strict) == ("call", True)


def test_init_app_twice_on_one_app_raises(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(init=False)
    notify = NotifyQueue(app)
    state = app.extensions["notifyqueue"]
    with pytest.raises(RuntimeError, match="already initialised") as excinfo:
        notify.init_app(app)
    assert isinstance(excinfo.value, LifecycleError)
    with pytest.raises(LifecycleError, match="already initialised"):
        NotifyQueue().init_app(app)
    assert app.extensions["notifyqueue"] is state


# --- the session -------------------------------------------------------------


def test_default_session_is_flask_sqlalchemy_db_session(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app()
    assert app.extensions["notifyqueue"].session is db.session


@both_databases
def test_default_session_commit_dispatches(app: Flask, rec: RecordingChannel) -> None:
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("rec", "made {name}", name="a")
        db.session.flush()
        assert rec.batches == []
        db.session.commit()
        assert rec.sent == ["made a"]
        assert db.session.scalars(sa.select(Item.name)).all() == ["a"]


@pytest.fixture
def plain_session(
    database_url: str,
) -> t.Iterator[tuple[scoped_session[Session], sa.Table]]:
    """A scoped_session outside Flask-SQLAlchemy, and a table of its own."""
    engine = sa.create_engine(database_url)
    metadata = sa.MetaData()
    notes = sa.Table(
        "notifyqueue_extension_note",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("text", sa.String(50), nullable=False),
    )
    metadata.drop_all(engine)
    metadata.create_all(engine)
    session = scoped_session(sessionmaker(bind=engine))
    try:
        yield session, notes
    finally:
        session.remove()
        metadata.drop_all(engine)
        engine.dispose()


def plain_app(session: scoped_session[t.Any], **config: t.Any) -> Flask:
    """An app without Flask-SQLAlchemy, following ``session``."""
    app = Flask("plain_session_app")
    app.config.update(NOTIFYQUEUE_CHANNELS={"rec": REC}, **config)
    NotifyQueue(app, session=session)
    return app


def stored_notes(session: scoped_session[t.Any], notes: sa.Table) -> list[str]:
    with session.get_bind().connect() as connection:
        return list(connection.execute(sa.select(notes.c.text)).scalars())


@both_databases
def test_explicit_scoped_session_dispatches_on_finalise(
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, notes = plain_session
    app = plain_app(session)
    assert app.extensions["notifyqueue"].session is session
    rec = channel(app, "rec")
    with app.app_context():
        session.execute(notes.insert().values(text="hello"))
        intent = enqueue("rec", "noted {text}", text="hello")
        assert rec.batches == []
        result = finalise()
    assert result.committed and result.ok
    assert result.dispatched == [intent]
    assert rec.sent == ["noted hello"]
    assert stored_notes(session, notes) == ["hello"]


@both_databases
def test_explicit_scoped_session_dispatches_on_plain_commit(
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, notes = plain_session
    app = plain_app(session)
    rec = channel(app, "rec")
    with app.app_context():
        enqueue("rec", "before the transaction began")
        session.execute(notes.insert().values(text="x"))
        enqueue("rec", "inside the transaction")
        assert rec.batches == []
        session.commit()
    assert rec.batches and payloads(rec.batches[0]) == [
        "before the transaction began",
        "inside the transaction",
    ]
    assert len(rec.batches) == 1


@both_databases
def test_explicit_scoped_session_rollback_dispatches_nothing(
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, notes = plain_session
    app = plain_app(session)
    rec = channel(app, "rec")
    with app.app_context():
        session.execute(notes.insert().values(text="rolled back"))
        enqueue("rec", "never")
        session.rollback()
        session.execute(notes.insert().values(text="kept"))
        enqueue("rec", "kept")
        session.commit()
    assert rec.sent == ["kept"]
    assert stored_notes(session, notes) == ["kept"]


def test_explicit_session_wins_over_flask_sqlalchemy(
    make_app: t.Callable[..., Flask],
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, _ = plain_session
    app = make_app(init=False)
    NotifyQueue(session=session).init_app(app)
    assert app.extensions["notifyqueue"].session is session


def test_init_app_session_wins_over_constructor_session(
    make_app: t.Callable[..., Flask],
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, _ = plain_session
    app = make_app(init=False)
    NotifyQueue(session=db.session).init_app(app, session=session)
    assert app.extensions["notifyqueue"].session is session


def test_no_session_and_no_flask_sqlalchemy_raises_runtime_error() -> None:
    app = Flask("no_sqlalchemy_app")
    with pytest.raises(RuntimeError) as excinfo:
        NotifyQueue(app)
    assert isinstance(excinfo.value, LifecycleError)
    message = str(excinfo.value)
    # The message says both ways out.
    assert "Flask-SQLAlchemy" in message
    assert "init_app(app, session=" in message
    assert "notifyqueue" not in app.extensions


def test_no_session_error_leaves_app_ready_for_a_session(
    plain_session: tuple[scoped_session[Session], sa.Table],
) -> None:
    session, _ = plain_session
    app = Flask("no_sqlalchemy_app")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    notify = NotifyQueue()
    with pytest.raises(RuntimeError):
        notify.init_app(app)
    notify.init_app(app, session=session)
    with app.app_context():
        enqueue("rec", "works")
        finalise()
    assert channel(app, "rec").sent == ["works"]


@pytest.mark.parametrize(
    "make_session",
    [
        pytest.param(lambda engine: sessionmaker(bind=engine)(), id="Session"),
        pytest.param(lambda engine: sessionmaker(bind=engine), id="sessionmaker"),
        pytest.param(lambda engine: engine, id="Engine"),
        pytest.param(lambda engine: "db.session", id="str"),
    ],
)
def test_session_that_is_not_a_scoped_session_raises_type_error(
    make_app: t.Callable[..., Flask],
    database_url: str,
    make_session: t.Callable[[sa.Engine], t.Any],
) -> None:
    engine = sa.create_engine(database_url)
    app = make_app(init=False)
    try:
        with pytest.raises(TypeError, match="scoped_session"):
            NotifyQueue(app, session=make_session(engine))
    finally:
        engine.dispose()
    assert "notifyqueue" not in app.extensions


def test_scoped_session_on_a_plain_factory_function_is_refused(
    make_app: t.Callable[..., Flask], database_url: str
) -> None:
    # Session events can only be followed per Session class.
    engine = sa.create_engine(database_url)
    app = make_app(init=False)
    config_before = dict(app.config)
    try:
        with pytest.raises(ConfigurationError, match="sessionmaker or a Session"):
            NotifyQueue(app, session=scoped_session(lambda: Session(bind=engine)))
    finally:
        engine.dispose()
    assert "notifyqueue" not in app.extensions
    assert dict(app.config) == config_before


def test_every_new_sessionmaker_is_followed(database_url: str) -> None:
    # Each sessionmaker makes a Session subclass of its own; once one is
    # collected, the next is often built at the same address. A check keyed on
    # id() (as event.contains is) then takes it for followed already.
    engine = sa.create_engine(database_url)
    missed = []
    try:
        for attempt in range(20):
            session = scoped_session(sessionmaker(bind=engine))
            app = Flask(f"app{attempt}")
            NotifyQueue(app, session=session)
            with app.app_context(), capture(dispatch=False) as sent:
                enqueue("log", "x")
                session.commit()
            if not sent:
                missed.append(attempt)
            session.remove()
            del session, app
            gc.collect()
    finally:
        engine.dispose()
    assert missed == []


# --- config validation -------------------------------------------------------

BAD_CONFIGS = [
    pytest.param(
        {"NOTIFYQUEUE_ORDER": "random"},
        r"NOTIFYQUEUE_ORDER.*'random'.*'channel' or 'call'",
        id="order-unknown",
    ),
    pytest.param({"NOTIFYQUEUE_ORDER": None}, r"NOTIFYQUEUE_ORDER", id="order-none"),
    pytest.param(
        {"NOTIFYQUEUE_STRICT": "yes"},
        r"NOTIFYQUEUE_STRICT.*'yes'.*True or False",
        id="strict-str",
    ),
    pytest.param({"NOTIFYQUEUE_STRICT": 1}, r"NOTIFYQUEUE_STRICT", id="strict-int"),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": [("log", {"type": "log"})]},
        r"NOTIFYQUEUE_CHANNELS must be a non-empty dict",
        id="channels-list",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {}},
        r"NOTIFYQUEUE_CHANNELS must be a non-empty dict",
        id="channels-empty",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {"level": "INFO"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x'] must be a dict with a 'type'"),
        id="options-without-type",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": "log"}},
        re.escape("NOTIFYQUEUE_CHANNELS['x'] must be a dict with a 'type'"),
        id="options-not-a-dict",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"notify": {"type": "log"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['notify']") + ".*identifier",
        id="name-notify",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"when": {"type": "log"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['when']") + ".*'notify' and 'when'",
        id="name-when",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {"type": "log", "enabled": "no"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x']['enabled'] is 'no'; use True or False"),
        id="enabled-str",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {"type": "log", "enabled": 0}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x']['enabled'] is 0"),
        id="enabled-int",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"not-an-identifier": {"type": "log"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['not-an-identifier']") + ".*identifier",
        id="name-not-identifier",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {3: {"type": "log"}}},
        re.escape("NOTIFYQUEUE_CHANNELS[3]"),
        id="name-not-str",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANELS": {"log": {"type": "log"}}},
        r"NOTIFYQUEUE_CHANELS.*spelling",
        id="unknown-key-typo",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {"type": "log", "colour": "red"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x']") + r".*'colour'.*logger, level",
        id="unknown-option-log",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {**REC, "fail_onn": "typo"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x']") + r".*'fail_onn'.*fail_on, crash",
        id="unknown-option-custom",
    ),
    pytest.param(
        {"NOTIFYQUEUE_CHANNELS": {"x": {"type": "log", "level": "LOUD"}}},
        re.escape("NOTIFYQUEUE_CHANNELS['x']") + r".*'LOUD'",
        id="bad-option-value",
    ),
]


@pytest.mark.parametrize(("config", "pattern"), BAD_CONFIGS)
def test_bad_config_fails_at_init_app_naming_the_key(
    make_app: t.Callable[..., Flask], config: dict[str, t.Any], pattern: str
) -> None:
    app = make_app(init=False, **config)
    with pytest.raises(ValueError, match=pattern) as excinfo:
        NotifyQueue().init_app(app)
    assert isinstance(excinfo.value, ConfigurationError)


@pytest.mark.parametrize(("config", "pattern"), BAD_CONFIGS)
def test_failed_init_app_leaves_nothing_half_done(
    make_app: t.Callable[..., Flask], config: dict[str, t.Any], pattern: str
) -> None:
    app = make_app(init=False, **config)
    teardowns = list(app.teardown_appcontext_funcs)
    commands = set(app.cli.commands)
    notify = NotifyQueue()
    with pytest.raises(ConfigurationError):
        notify.init_app(app)
    assert "notifyqueue" not in app.extensions
    assert set(app.cli.commands) == commands
    assert app.teardown_appcontext_funcs == teardowns

    for key in [key for key in app.config if key.startswith("NOTIFYQUEUE_")]:
        del app.config[key]
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    notify.init_app(app)
    assert "notifyqueue" in app.cli.commands
    assert len(app.teardown_appcontext_funcs) == len(teardowns) + 1
    with app.app_context():
        enqueue("rec", "initialised after all")
        finalise()
    assert channel(app, "rec").sent == ["initialised after all"]


# --- NOTIFYQUEUE_ORDER -------------------------------------------------------


@pytest.fixture
def dispatches() -> t.Iterator[list[tuple[str, list[t.Any]]]]:
    """Every ``dispatch`` signal sent, as (channel name, payloads)."""
    sent: list[tuple[str, list[t.Any]]] = []

    def record(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        sent.append((sender, payloads(intents)))

    with signals.dispatch.connected_to(record):
        yield sent


CALLS = [
    ("a", "a1"),
    ("a", "a2"),
    ("b", "b1"),
    ("a", "a3"),
    ("b", "b2"),
    ("b", "b3"),
]


def run_calls(app: Flask) -> list[t.Any]:
    with app.app_context():
        for name, text in CALLS:
            enqueue(name, text)
        return payloads(finalise().dispatched)


def test_channel_order_is_the_default(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()
    assert app.extensions["notifyqueue"].order == "channel"


def test_channel_order_dispatches_channel_by_channel_in_config_order(
    make_app: t.Callable[..., Flask], dispatches: list[tuple[str, list[t.Any]]]
) -> None:
    # "b" is configured first though "a" is called first.
    app = make_app(NOTIFYQUEUE_CHANNELS={"b": REC, "a": REC})
    dispatched = run_calls(app)
    assert dispatches == [("b", ["b1", "b2", "b3"]), ("a", ["a1", "a2", "a3"])]
    assert dispatched == ["b1", "b2", "b3", "a1", "a2", "a3"]
    assert [payloads(batch) for batch in channel(app, "b").batches] == [
        ["b1", "b2", "b3"]
    ]
    assert [payloads(batch) for batch in channel(app, "a").batches] == [
        ["a1", "a2", "a3"]
    ]


def test_call_order_dispatches_runs_of_one_channel_in_call_order(
    make_app: t.Callable[..., Flask], dispatches: list[tuple[str, list[t.Any]]]
) -> None:
    app = make_app(NOTIFYQUEUE_CHANNELS={"b": REC, "a": REC}, NOTIFYQUEUE_ORDER="call")
    dispatched = run_calls(app)
    assert dispatches == [
        ("a", ["a1", "a2"]),
        ("b", ["b1"]),
        ("a", ["a3"]),
        ("b", ["b2", "b3"]),
    ]
    assert dispatched == ["a1", "a2", "b1", "a3", "b2", "b3"]
    assert [payloads(batch) for batch in channel(app, "a").batches] == [
        ["a1", "a2"],
        ["a3"],
    ]
    assert [payloads(batch) for batch in channel(app, "b").batches] == [
        ["b1"],
        ["b2", "b3"],
    ]


# --- finding the state -------------------------------------------------------

STATE_CALLS = pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: enqueue("log", "x"), id="enqueue"),
        pytest.param(lambda: finalise(), id="finalise"),
    ],
)


@STATE_CALLS
def test_outside_an_app_context_raises_naming_the_application_context(
    call: t.Callable[[], object],
) -> None:
    with pytest.raises(RuntimeError, match="application context") as excinfo:
        call()
    assert isinstance(excinfo.value, LifecycleError)


@STATE_CALLS
def test_app_without_init_app_raises_naming_init_app(
    call: t.Callable[[], object],
) -> None:
    app = Flask("never_initialised")
    with app.app_context():
        with pytest.raises(
            RuntimeError, match=r"never_initialised.*init_app"
        ) as excinfo:
            call()
    assert isinstance(excinfo.value, LifecycleError)


# --- disabled channels -------------------------------------------------------


def test_a_disabled_channel_is_neither_built_nor_checked_nor_imported(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": REC,
            "mail": {"type": "mail", "enabled": False, "recipients": "not a list"},
            "sms": {"type": "no_such_package.sms:SMSChannel", "enabled": False},
            "pager": {"enabled": False},
        }
    )

    state = app.extensions["notifyqueue"]
    assert list(state.channels) == ["rec"]
    assert state.disabled == {"mail", "sms", "pager"}


def test_enabled_is_not_passed_to_the_channel_class(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(NOTIFYQUEUE_CHANNELS={"rec": {**REC, "enabled": True}})

    with app.app_context():
        enqueue("rec", "sent")
        finalise()
    assert channel(app, "rec").sent == ["sent"]


# --- start-up template checks ------------------------------------------------


def strict_app(make_app: t.Callable[..., Flask], name: str, **options: t.Any) -> Flask:
    """An app, not yet initialised, whose channel ``name`` checks templates.

    Each test names its channel for itself: apps of other tests may not be
    collected yet, and a check runs against every initialised app.
    """
    return make_app(
        init=False,
        NOTIFYQUEUE_CHANNELS={
            "rec": REC,
            name: {"type": "tests.helpers:StrictChannel", **options},
        },
    )


def test_init_app_checks_the_templates_of_functions_decorated_before(
    make_app: t.Callable[..., Flask],
) -> None:
    app = strict_app(make_app, "strict_before")

    @deferred_notify(rec="saved {name}", strict_before={"txt": "saved {name}"})
    def save(name: str) -> None:
        pass

    with pytest.raises(TemplateError) as excinfo:
        NotifyQueue(app)

    message = str(excinfo.value)
    assert f"{__name__}.{save.__qualname__}()" in message
    assert "channel 'strict_before'" in message
    assert "unknown key 'txt'" in message
    assert "notifyqueue" not in app.extensions
    assert "notifyqueue" not in app.cli.commands


def test_a_function_decorated_after_init_app_is_checked_at_decoration(
    make_app: t.Callable[..., Flask],
) -> None:
    app = strict_app(make_app, "strict_after")
    NotifyQueue(app)

    with pytest.raises(TemplateError) as excinfo:

        @deferred_notify(strict_after={})
        def save(name: str) -> None:
            pass

    message = str(excinfo.value)
    assert ".save()" in message
    assert f"channel 'strict_after' of app {app.name!r}" in message
    assert "the key 'text' is missing" in message


def test_templates_an_app_accepts_pass_its_checks(
    make_app: t.Callable[..., Flask],
) -> None:
    @deferred_notify(strict_ok={"text": "saved {name}"})
    def save(name: str) -> None:
        pass

    app = strict_app(make_app, "strict_ok")
    NotifyQueue(app)

    with app.app_context():
        save("a")
        finalise()
    assert channel(app, "strict_ok").sent == ["saved a"]


def test_template_checks_skip_channels_an_app_lacks_or_disables(
    make_app: t.Callable[..., Flask],
) -> None:
    @deferred_notify(rec="saved", strict_off="not a dict")
    def save() -> None:
        pass

    NotifyQueue(make_app(init=False, NOTIFYQUEUE_CHANNELS={"rec": REC}))
    NotifyQueue(strict_app(make_app, "strict_off", enabled=False))


def test_a_collected_decorated_function_is_no_longer_checked(
    make_app: t.Callable[..., Flask],
) -> None:
    @deferred_notify(strict_gone="not a dict")
    def save() -> None:
        pass

    del save
    gc.collect()

    NotifyQueue(strict_app(make_app, "strict_gone"))


def test_init_app_checks_mail_templates_with_the_mail_channel(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False,
        NOTIFYQUEUE_CHANNELS={
            "rec": REC,
            "mail_checked": {"type": "mail", "recipients": ["admins@example.com"]},
        },
    )

    @deferred_notify(mail_checked={"subjct": "Saved {name}", "body": "{name}"})
    def save(name: str) -> None:
        pass

    with pytest.raises(TemplateError) as excinfo:
        NotifyQueue(app)

    message = str(excinfo.value)
    assert ".save()" in message
    assert "channel 'mail_checked'" in message
    assert "'subjct'" in message


# -- the queue's session look-up ------------------------------------------------


def test_the_queue_finds_the_session_db_session_gives(make_app) -> None:
    # The queue reads Flask-SQLAlchemy's sessions by app context directly
    # (State.context_sessions); it must find what db.session() would.
    from notifyqueue.context import current_context
    from notifyqueue.state import session_of

    app, other = make_app(), make_app()
    found: list[bool] = []

    def check(current: Flask) -> None:
        state = current.extensions["notifyqueue"]
        assert state.context_sessions is not None
        session = session_of(state, current_context())  # first: it may create it
        found.append(session is db.session())

    with app.app_context():
        check(app)
        with app.app_context():  # a nested context has a session of its own
            check(app)
        with other.app_context():
            check(other)
        db.session.remove()
        check(app)

    def in_a_thread() -> None:
        with app.app_context():
            check(app)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert found == [True] * 5


def test_a_session_scoped_otherwise_is_found_through_its_scoped_session(
    database_url: str,
) -> None:
    from flask_sqlalchemy import SQLAlchemy

    from notifyqueue.context import current_context
    from notifyqueue.state import session_of

    own = SQLAlchemy(session_options={"scopefunc": threading.get_ident})
    app = Flask("scoped_by_thread")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    own.init_app(app)
    NotifyQueue(app)
    state = app.extensions["notifyqueue"]
    try:
        with app.app_context():
            assert state.context_sessions is None
            assert session_of(state, current_context()) is own.session()
    finally:
        own.session.remove()
        with app.app_context():
            own.engine.dispose()
