"""``flask notifyqueue channels`` and ``flask notifyqueue send-test``."""

from __future__ import annotations

import logging
import re
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from notifyqueue import Intent, signals

from .conftest import SMTPServer
from .helpers import RecordingChannel

REC = "tests.helpers:RecordingChannel"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The CLI does not depend on the database: SQLite only."""
    return f"sqlite:///{tmp_path / 'test.db'}"


def invoke(app: Flask, *args: str) -> t.Any:
    return app.test_cli_runner().invoke(args=["notifyqueue", *args])


def test_init_app_adds_the_notifyqueue_command_group(app: Flask) -> None:
    assert set(app.cli.commands["notifyqueue"].commands) >= {"channels", "send-test"}


def test_channels_lists_each_channel_with_type_and_options_in_order(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC, "fail_on": "boom"},
            "audit": {"type": "log", "logger": "audit", "level": "WARNING"},
            "plain": {"type": "log"},
        }
    )
    result = invoke(app, "channels")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    found = {
        name: [i for i, line in enumerate(lines) if line.startswith(f"{name}:")]
        for name in ("rec", "audit", "plain")
    }
    assert all(len(indexes) == 1 for indexes in found.values()), result.output
    rec_line, audit_line, plain_line = (lines[found[n][0]] for n in found)
    assert found["rec"][0] < found["audit"][0] < found["plain"][0]
    assert REC in rec_line and "fail_on" in rec_line and "boom" in rec_line
    assert "log" in audit_line
    for option in ("logger", "audit", "level", "WARNING"):
        assert option in audit_line
    assert "log" in plain_line and "logger" not in plain_line


def test_send_test_delivers_one_test_intent_to_the_channel(
    app: Flask, rec: RecordingChannel
) -> None:
    result = invoke(app, "send-test", "rec")
    assert result.exit_code == 0, result.output
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 1
    intent = rec.batches[0][0]
    assert intent.channel == "rec"
    assert intent.payload == f"Test notification from notifyqueue (app {app.name})."
    assert intent.id in result.output


def test_send_test_uses_only_the_named_channel(app: Flask) -> None:
    sent: list[tuple[str, list[Intent]]] = []

    def record(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        sent.append((sender, intents))

    with signals.dispatch.connected_to(record):
        result = invoke(app, "send-test", "rec")
    assert result.exit_code == 0, result.output
    assert [(name, len(intents)) for name, intents in sent] == [("rec", 1)]


def test_send_test_through_log_writes_a_log_record(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=app.logger.name)
    result = invoke(app, "send-test", "log")
    assert result.exit_code == 0, result.output
    records = [
        record
        for record in caplog.records
        if record.name == app.logger.name and "Test notification" in record.getMessage()
    ]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert records[0].getMessage() == (
        f"Test notification from notifyqueue (app {app.name})."
    )


def test_send_test_through_mail_sends_one_email(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = make_app(
        **smtp_server.config(),
        NOTIFYQUEUE_CHANNELS={
            "mail": {"type": "mail", "recipients": ["admin@example.com"]}
        },
    )
    result = invoke(app, "send-test", "mail")
    assert result.exit_code == 0, result.output
    assert len(smtp_server.messages) == 1
    message = smtp_server.messages[0]
    assert message["To"] == "admin@example.com"
    assert message["Subject"] == "notifyqueue test"
    assert app.name in message.get_content()


def test_send_test_unknown_channel_fails_naming_the_configured_ones(
    app: Flask, rec: RecordingChannel
) -> None:
    result = invoke(app, "send-test", "nope")
    assert result.exit_code != 0
    assert "'nope'" in result.output
    assert "log, rec" in result.output
    assert rec.batches == []


def test_send_test_through_a_failing_channel_exits_1_and_prints_failed(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(NOTIFYQUEUE_CHANNELS={"rec": {"type": REC, "crash": True}})
    result = invoke(app, "send-test", "rec")
    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert "channel rec is down" in result.output


def test_send_test_in_strict_mode_reports_failure_like_non_strict(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={"rec": {"type": REC, "crash": True}},
        NOTIFYQUEUE_STRICT=True,
    )
    result = invoke(app, "send-test", "rec")
    assert result.exit_code == 1
    assert "FAILED" in result.output, repr(result.exception)
    assert "channel rec is down" in result.output


def mail_app(make_app: t.Callable[..., Flask], **config: t.Any) -> Flask:
    return make_app(
        NOTIFYQUEUE_CHANNELS={
            "mail": {"type": "mail", "recipients": ["admin@example.com"]},
            "rec": {"type": REC},
        },
        **config,
    )


def test_send_test_to_sends_the_test_to_that_address_instead(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = mail_app(make_app, **smtp_server.config())
    result = invoke(app, "send-test", "mail", "--to", "Ops <ops@example.org>")
    assert result.exit_code == 0, result.output
    assert smtp_server.envelopes == [["ops@example.org"]]
    message = smtp_server.messages[0]
    assert message["To"] == "Ops <ops@example.org>"
    assert message["Subject"] == "notifyqueue test"
    assert message.get_content().strip() == (
        f"Test notification from notifyqueue (app {app.name})."
    )
    assert result.output.strip() == (
        f"Sent {message['X-Notifyqueue-Intent']} via mail to Ops <ops@example.org>."
    )


def test_send_test_to_takes_braces_in_the_address_literally(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = mail_app(make_app, **smtp_server.config())
    result = invoke(app, "send-test", "mail", "--to", "{app}@example.org")
    assert result.exit_code == 0, result.output
    assert smtp_server.envelopes == [["{app}@example.org"]]


def test_send_test_to_a_malformed_address_is_a_usage_error(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = mail_app(make_app, **smtp_server.config())
    result = invoke(app, "send-test", "mail", "--to", "not an address")
    assert result.exit_code == 2, result.output
    assert "'--to'" in result.output and "'not an address'" in result.output
    assert smtp_server.messages == []


def test_send_test_to_on_a_channel_that_is_not_mail_is_a_usage_error(
    make_app: t.Callable[..., Flask],
) -> None:
    app = mail_app(make_app)
    result = invoke(app, "send-test", "rec", "--to", "ops@example.org")
    assert result.exit_code == 2, result.output
    assert "only a mail channel has recipients; 'rec' is a" in result.output
    rec = app.extensions["notifyqueue"].channels["rec"]
    assert rec.batches == []


def test_send_test_mail_with_mail_suppress_send_says_nothing_was_sent(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = mail_app(make_app, **(smtp_server.config() | {"MAIL_SUPPRESS_SEND": True}))
    result = invoke(app, "send-test", "mail", "--to", "ops@example.org")
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    assert re.fullmatch(
        r"Suppressed [0-9a-f]{32} via mail \(MAIL_SUPPRESS_SEND\):"
        r" nothing was sent to ops@example\.org\.",
        line,
    )
    assert smtp_server.connections == 0 and smtp_server.messages == []


def test_send_test_mail_in_the_sample_app_says_suppressed_not_sent(
    tmp_path: Path,
) -> None:
    from sample_app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 's.db'}"})
    result = invoke(app, "send-test", "mail")
    assert result.exit_code == 0, result.output
    assert "Email not sent (MAIL_SUPPRESS_SEND): notifyqueue test" in result.output
    assert "Suppressed " in result.output
    assert "Sent " not in result.output


def test_channels_shows_a_disabled_channel_as_disabled(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC, "enabled": True},
            "mail": {"type": "mail", "enabled": False, "recipients": "unchecked"},
        }
    )
    result = invoke(app, "channels")
    assert result.exit_code == 0, result.output
    rec_line, mail_line = result.output.splitlines()[:2]
    assert rec_line == f"rec: type={REC} delivery=inline options={{}}"
    assert mail_line == "mail: type=mail disabled"


def test_send_test_on_a_disabled_channel_says_it_is_disabled(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC},
            "mail": {"type": "mail", "enabled": False},
        }
    )
    result = invoke(app, "send-test", "mail")
    assert result.exit_code == 2, result.output
    assert "channel 'mail' is disabled ('enabled': False" in result.output


def test_send_test_mail_without_recipients_asks_for_to(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={"mail": {"type": "mail"}}, **smtp_server.config()
    )
    result = invoke(app, "send-test", "mail")
    assert result.exit_code == 2, result.output
    assert "has no 'recipients' option" in result.output
    assert "pass --to ADDRESS" in result.output
    assert smtp_server.connections == 0
    result = invoke(app, "send-test", "mail", "--to", "ops@example.org")
    assert result.exit_code == 0, result.output
    assert smtp_server.envelopes == [["ops@example.org"]]


def test_channels_shows_each_channels_delivery_mode(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC, "delivery": "inline"},
            "log": {"type": "log"},
        },
    )
    result = invoke(app, "channels")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"rec: type={REC} delivery=inline options={{}}" in lines
    assert "log: type=log delivery=background options={}" in lines


def test_send_test_through_a_background_channel_waits_and_reports_success(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = make_app(
        **smtp_server.config(),
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "recipients": ["admin@example.com"],
                "delivery": "background",
            }
        },
    )
    smtp_server.data_delay = 0.3  # arrives after the commit has returned
    result = invoke(app, "send-test", "mail")
    assert result.exit_code == 0, result.output
    (intent_id,) = smtp_server.intent_ids()
    assert result.output == f"Sent {intent_id} via mail.\n"


def test_send_test_through_a_failing_background_channel_exits_1(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC, "crash": True, "delivery": "background"}
        }
    )
    result = invoke(app, "send-test", "rec")
    assert result.exit_code == 1
    assert re.search(r"FAILED [0-9a-f]{32} via rec: RuntimeError", result.output)
