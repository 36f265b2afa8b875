from __future__ import annotations

import logging
import typing as t

import pytest
from flask import Flask

from notifyqueue import (
    ConfigurationError,
    Intent,
    NotifyQueue,
    TemplateError,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)

from .helpers import Item, db

AUDIT_LOGGER = "tests.audit.notify"


def _log_app(make_app: t.Callable[..., Flask], **options: t.Any) -> Flask:
    return make_app(NOTIFYQUEUE_CHANNELS={"log": {"type": "log", **options}})


def _messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


# -- where and at what level ------------------------------------------------


def test_one_record_per_intent_at_info_on_the_app_logger_by_default(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app)
    caplog.set_level(logging.DEBUG, logger=app.logger.name)
    with app.app_context():
        enqueue("log", "Saved {name}", name="a")
        enqueue("log", "Saved {name}", name="b")
        finalise()

    records = [r for r in caplog.records if r.name == app.logger.name]
    assert [r.getMessage() for r in records] == ["Saved a", "Saved b"]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]


def test_logger_option_names_the_logger(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=app.logger.name)
    with app.app_context():
        enqueue("log", "Saved {name}", name="a")
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == ["Saved a"]
    assert _messages(caplog, app.logger.name) == []


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("DEBUG", logging.DEBUG),
        ("WARNING", logging.WARNING),
        ("CRITICAL", logging.CRITICAL),
        (logging.ERROR, logging.ERROR),
    ],
)
def test_level_option_sets_the_record_level(
    make_app: t.Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
    level: str | int,
    expected: int,
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER, level=level)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        enqueue("log", "Saved {name}", name="a")
        finalise()

    [record] = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    assert record.levelno == expected


# -- when and in what order -------------------------------------------------


def test_records_are_emitted_only_after_commit(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("log", "Saved {name}", name="a")
        db.session.flush()
        assert _messages(caplog, AUDIT_LOGGER) == []

        db.session.commit()

        assert _messages(caplog, AUDIT_LOGGER) == ["Saved a"]


def test_records_follow_call_order(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)

    @deferred_notify(log="Saved {result.name}")
    def save_item(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    with app.app_context():
        save_item("c")
        enqueue("log", "Between {n}", n=1)
        save_item("a")
        save_item("b")
        enqueue("log", "Between {n}", n=2)
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == [
        "Saved c",
        "Between 1",
        "Saved a",
        "Saved b",
        "Between 2",
    ]


def test_nothing_is_logged_after_rollback(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("log", "Rolled back {name}", name="a")
        finalise(commit=False)
        db.session.add(Item(name="b"))
        enqueue("log", "Saved {name}", name="b")
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == ["Saved b"]


# -- one intent, one line ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a\nINFO forged line", "User a\\nINFO forged line logged in"),
        ("a\rINFO forged line", "User a\\rINFO forged line logged in"),
        ("a\r\nINFO forged line", "User a\\r\\nINFO forged line logged in"),
        ("\n\n", "User \\n\\n logged in"),
    ],
)
def test_line_breaks_in_values_are_escaped(
    make_app: t.Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
    value: str,
    expected: str,
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        enqueue("log", "User {name} logged in", name=value)
        finalise()

    [message] = _messages(caplog, AUDIT_LOGGER)
    assert message == expected
    assert "\n" not in message and "\r" not in message


def test_line_breaks_in_attribute_values_of_a_decorated_call_are_escaped(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)

    @deferred_notify(log="Saved {result.name} ({note:>3})")
    def save_item(name: str, note: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    with app.app_context():
        save_item("x\ny", "\r")
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == ["Saved x\\ny (  \\r)"]


def test_line_breaks_written_in_the_template_are_kept(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        enqueue("log", "Report\nfirst: {a}\r\nsecond: {b}", a="1", b="x\ny")
        enqueue("log", "Plain\n{a}", a="no break")
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == [
        "Report\nfirst: 1\r\nsecond: x\\ny",
        "Plain\nno break",
    ]


@pytest.mark.parametrize("value", ["100%", "%s %d %(name)s", "%%"])
def test_percent_in_a_value_is_logged_verbatim(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture, value: str
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    with app.app_context():
        enqueue("log", "Progress: {value}", value=value)
        result = finalise()

    assert result.ok
    assert _messages(caplog, AUDIT_LOGGER) == [f"Progress: {value}"]
    # A handler's formatter sees the same text (no %-formatting error).
    assert f"Progress: {value}" in caplog.text


def test_non_ascii_and_a_megabyte_value_are_logged_whole(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    big = "Grüße ✓ 東京 " * (1024 * 1024 // 12) + "THE END"
    assert len(big.encode()) > 1024 * 1024
    with app.app_context():
        enqueue("log", "Saved {value}", value="Zürich — 東京")
        enqueue("log", "Big: {value}", value=big)
        finalise()

    assert _messages(caplog, AUDIT_LOGGER) == ["Saved Zürich — 東京", f"Big: {big}"]


# -- errors -----------------------------------------------------------------


@pytest.mark.parametrize("level", ["LOUD", "", None, True, 2.5])
def test_bad_level_fails_at_init_app(
    make_app: t.Callable[..., Flask], level: t.Any
) -> None:
    app = make_app(
        init=False, NOTIFYQUEUE_CHANNELS={"log": {"type": "log", "level": level}}
    )
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['log'\].*level"
    ):
        NotifyQueue(app)
    assert "notifyqueue" not in app.extensions


def test_bad_logger_option_fails_at_init_app(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False, NOTIFYQUEUE_CHANNELS={"log": {"type": "log", "logger": 42}}
    )
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['log'\].*logger"
    ):
        NotifyQueue(app)


def test_unknown_option_fails_at_init_app(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False, NOTIFYQUEUE_CHANNELS={"log": {"type": "log", "format": "x"}}
    )
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['log'\].*format"
    ):
        NotifyQueue(app)


def test_dict_template_raises_template_error_at_enqueue(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    queued: list[Intent] = []

    def on_queued(sender: t.Any, intent: Intent) -> None:
        queued.append(intent)

    with signals.intent_queued.connected_to(on_queued), app.app_context():
        with pytest.raises(TemplateError, match=r"Channel 'log' \(log\).*str"):
            enqueue("log", {"subject": "Saved {name}", "body": "x"}, name="a")
        result = finalise()

    assert queued == []
    assert result.dispatched == []
    assert _messages(caplog, AUDIT_LOGGER) == []


def test_dict_template_raises_template_error_when_the_decorated_function_returns(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = _log_app(make_app, logger=AUDIT_LOGGER)
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    calls: list[str] = []

    @deferred_notify(log={"subject": "Saved {name}", "body": "Saved {name}."})
    def save_item(name: str) -> None:
        calls.append(name)

    with app.app_context():
        with pytest.raises(TemplateError, match=r"Channel 'log' \(log\)"):
            save_item("a")
        result = finalise()

    assert calls == ["a"]
    assert result.dispatched == []
    assert _messages(caplog, AUDIT_LOGGER) == []


# -- records made without Logger.log() -------------------------------------------


class _OwnLogger(logging.Logger):
    """A logger class of its own: the channel logs through its log()."""

    def findCaller(
        self, stack_info: bool = False, stacklevel: int = 1
    ) -> tuple[str, int, str, str | None]:
        # This frame is one more to step over.
        return super().findCaller(stack_info, stacklevel + 1)


_RECORD_FIELDS = (
    "name",
    "msg",
    "args",
    "levelno",
    "levelname",
    "pathname",
    "filename",
    "module",
    "funcName",
    "exc_info",
    "exc_text",
    "stack_info",
    "notifyqueue_intent",
)


@pytest.mark.parametrize("caller_lookup", [True, False], ids=["", "no _srcfile"])
def test_a_record_is_what_logger_log_would_make(
    make_app: t.Callable[..., Flask],
    monkeypatch: pytest.MonkeyPatch,
    caller_lookup: bool,
) -> None:
    # The channel makes records with makeRecord() and handle() itself, but
    # for a logger class of its own; both kinds of record must read alike.
    names = ["tests.audit.plain", "tests.audit.own"]
    manager = logging.Logger.manager
    monkeypatch.setattr(manager, "loggerClass", _OwnLogger)
    own = logging.getLogger(names[1])
    monkeypatch.setattr(manager, "loggerClass", None)
    assert type(own) is _OwnLogger and type(logging.getLogger(names[0])) is not (
        _OwnLogger
    )
    if not caller_lookup:
        monkeypatch.setattr(logging, "_srcfile", None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "plain": {"type": "log", "logger": names[0], "level": "WARNING"},
            "own": {"type": "log", "logger": names[1], "level": "WARNING"},
        }
    )
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        with app.app_context():
            enqueue("plain", "{x}% done", x=50)
            enqueue("own", "{x}% done", x=50)
            finalise()
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
    plain, own_record = records
    assert [plain.name, own_record.name] == names
    for field in _RECORD_FIELDS:
        if field not in ("name", "notifyqueue_intent"):
            assert getattr(plain, field) == getattr(own_record, field), field
    assert plain.getMessage() == "50% done"
    if caller_lookup:
        assert plain.funcName == "send"
        assert plain.pathname.endswith("notifyqueue/channels/log.py")
        assert plain.lineno > 0 and own_record.lineno > 0
    else:
        assert (plain.pathname, plain.lineno) == ("(unknown file)", 0)
        assert (own_record.pathname, own_record.lineno) == ("(unknown file)", 0)
