"""SMTP faults during delivery, end to end through the sample app.

A batch of three emails meets a real SMTP server (aiosmtpd) that fails the
second one in a given way. Whatever the fault, the request succeeds, its data
stays committed, every message the server allows is delivered, and each
failure is reported per intent: in the response, by ``intent_failed`` and by
an ERROR log record with its traceback.
"""

from __future__ import annotations

import logging
import typing as t

import pytest
from flask import Flask

from notifyqueue import signals

from .conftest import SMTPServer, free_port
from .test_sample_app import add_froggies, make_froggy_app, table

__all__ = ["make_froggy_app"]  # a fixture, imported for pytest

COLOURS = ["red", "blue", "gold"]


@pytest.fixture
def failures() -> t.Iterator[list[tuple[str, BaseException]]]:
    """``(intent id, exception)`` for each ``intent_failed`` signal."""
    seen: list[tuple[str, BaseException]] = []

    def receiver(sender: Flask, *, intent: t.Any, exception: BaseException) -> None:
        seen.append((intent.id, exception))

    with signals.intent_failed.connected_to(receiver):
        yield seen


def change_three_colours(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    mail_config: dict[str, t.Any],
) -> tuple[Flask, list[int], t.Any]:
    """POST one batch that changes three froggies' colours: 3 log + 3 mail intents.

    The mail channel's socket timeout is half a second.
    """
    app = make_froggy_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": database_url,
            "NOTIFYQUEUE_CHANNELS": {
                "log": {"type": "log"},
                "mail": {
                    "type": "mail",
                    "recipients": ["froggy-admins@example.com"],
                    "timeout": 0.5,
                },
            },
        }
        | mail_config
    )
    ids = add_froggies(app, "a", "b", "c")
    operations = [
        {"op": "colour", "id": froggy_id, "colour": colour}
        for froggy_id, colour in zip(ids, COLOURS, strict=True)
    ]
    response = app.test_client().post("/batch", json={"operations": operations})
    return app, ids, response


def mail_ids(notifications: list[dict[str, str]]) -> list[str]:
    return [n["id"] for n in notifications if n["channel"] == "mail"]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("550", id="sender-refused"),
        pytest.param("421", id="server-closes-with-421"),
        pytest.param("drop", id="connection-dropped"),
        pytest.param("stall", id="slow-past-the-timeout"),
    ],
)
def test_a_fault_on_one_message_fails_it_alone(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    smtp_server: SMTPServer,
    failures: list[tuple[str, BaseException]],
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    smtp_server.faults[2] = fault
    app, ids, response = change_three_colours(
        make_froggy_app, database_url, smtp_server.config()
    )

    assert response.status_code == 200
    notifications = response.json["notifications"]
    assert [n["channel"] for n in notifications["dispatched"]] == [
        "log",
        "log",
        "log",
        "mail",
        "mail",
    ]
    [failed] = mail_ids(notifications["failed"])
    delivered = mail_ids(notifications["dispatched"])
    # The server received exactly the messages reported delivered, in order.
    assert smtp_server.intent_ids() == delivered
    assert [
        m.get_body(("plain",)).get_content().strip() for m in smtp_server.messages
    ] == [
        f"Froggy: {froggy_id}; new colour: {colour}"
        for froggy_id, colour in [(ids[0], "red"), (ids[2], "gold")]
    ]
    assert [intent_id for intent_id, _ in failures] == [failed]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.name == "notifyqueue"
    assert failed in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is failures[0][1]
    # The data was committed before delivery began, and stays so.
    assert [row["colour"] for row in table(app)] == COLOURS


def test_a_server_that_is_down_fails_every_email_and_nothing_else(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    failures: list[tuple[str, BaseException]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens on the port.
    config = {"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": free_port()}
    config["MAIL_SUPPRESS_SEND"] = False
    app, _, response = change_three_colours(make_froggy_app, database_url, config)

    assert response.status_code == 200
    notifications = response.json["notifications"]
    assert [n["channel"] for n in notifications["dispatched"]] == ["log"] * 3
    failed = mail_ids(notifications["failed"])
    assert len(failed) == 3
    assert [intent_id for intent_id, _ in failures] == failed
    assert all(isinstance(exc, ConnectionRefusedError) for _, exc in failures)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info is not None for r in errors] == [True] * 3
    assert [row["colour"] for row in table(app)] == COLOURS
