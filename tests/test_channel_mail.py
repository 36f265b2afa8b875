from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import json
import logging
import re
import socket
import sys
import threading
import time
import typing as t
import unicodedata

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_mail import Mail, email_dispatched
from sqlalchemy.orm import scoped_session, sessionmaker

from notifyqueue import (
    ConfigurationError,
    Intent,
    NotifyQueue,
    PayloadError,
    TemplateError,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)

from .conftest import SMTPServer, free_port
from .helpers import Item, db

RECIPIENTS = ["admin@example.com", "ops@example.com"]
TEMPLATE = {"subject": "Saved {name}", "body": "Item {name} was saved."}


@pytest.fixture
def silent_port() -> t.Iterator[int]:
    """A port that accepts TCP connections and never says a word.

    As a safety net the connections are closed after a few seconds, so a
    missing socket timeout makes the test fail (server disconnected, no
    timeout) instead of hanging.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        deadline = time.monotonic() + 5
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        listener.close()


# -- helpers ----------------------------------------------------------------


def _channels(**options: t.Any) -> dict[str, t.Any]:
    return {"mail": {"type": "mail", "recipients": list(RECIPIENTS), **options}}


def _mail_app(
    make_app: t.Callable[..., Flask], server: t.Any, **options: t.Any
) -> Flask:
    return make_app(**server.config(), NOTIFYQUEUE_CHANNELS=_channels(**options))


def _committed_names() -> list[str]:
    """Item names as the database has them, read on a connection of its own."""
    with db.engine.connect() as connection:
        return list(connection.scalars(sa.select(Item.name).order_by(Item.name)).all())


def _addresses(header: t.Any) -> list[str]:
    return [address.addr_spec for address in header.addresses]


def _body(message: t.Any) -> str:
    # On the wire every line ends in CRLF; compare with the text as written.
    return str(message.get_content()).replace("\r\n", "\n").removesuffix("\n")


def _exception_chain(exc: BaseException | None) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _queue_three_with_a_refused_one() -> list[Intent]:
    return [
        enqueue("mail", TEMPLATE, name="first"),
        enqueue(
            "mail",
            {**TEMPLATE, "recipients": ["refused@example.com"]},
            name="second",
        ),
        enqueue("mail", TEMPLATE, name="third"),
    ]


# -- delivery ---------------------------------------------------------------


def test_batch_is_delivered_over_one_smtp_connection(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        for name in ("a", "b", "c", "d"):
            enqueue("mail", TEMPLATE, name=name)
        result = finalise()

    assert result.ok
    assert len(smtp_server.messages) == 4
    assert smtp_server.connections == 1


def test_each_batch_opens_its_own_connection(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        for batch in range(2):
            enqueue("mail", TEMPLATE, name=f"a{batch}")
            enqueue("mail", TEMPLATE, name=f"b{batch}")
            finalise()

    assert len(smtp_server.messages) == 4
    assert smtp_server.connections == 2


def test_messages_arrive_in_call_order_with_intent_id_header(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        intents = [enqueue("mail", TEMPLATE, name=str(n)) for n in range(3)]
        finalise()

    assert [m["X-Notifyqueue-Intent"] for m in smtp_server.messages] == [
        intent.id for intent in intents
    ]
    assert [m["Subject"] for m in smtp_server.messages] == [
        "Saved 0",
        "Saved 1",
        "Saved 2",
    ]
    # The Message-ID is the intent's: unique, and the same if it is ever resent.
    assert [m["Message-ID"] for m in smtp_server.messages] == [
        f"<{intent.id}@example.com>" for intent in intents
    ]


def test_message_carries_prefixed_subject_body_sender_and_recipients(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(
        make_app, smtp_server, subject_prefix="[shop] ", sender="shop@example.com"
    )

    @deferred_notify(
        mail={"subject": "Saved {result.name}", "body": "Item #{result.id} saved."}
    )
    def save_item(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        db.session.flush()
        return item

    with app.app_context():
        item_id = save_item("apple").id
        result = finalise()

    assert result.ok
    [message] = smtp_server.messages
    assert message["Subject"] == "[shop] Saved apple"
    assert _body(message) == f"Item #{item_id} saved."
    assert _addresses(message["From"]) == ["shop@example.com"]
    assert sorted(_addresses(message["To"])) == sorted(RECIPIENTS)
    assert message["X-Notifyqueue-Intent"] == result.dispatched[0].id


def test_sender_defaults_to_mail_default_sender(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = make_app(
        **smtp_server.config(),
        MAIL_DEFAULT_SENDER="default@example.com",
        NOTIFYQUEUE_CHANNELS=_channels(),
    )
    with app.app_context():
        intent = enqueue("mail", TEMPLATE, name="x")
        finalise()

    assert intent.payload["sender"] == "default@example.com"
    assert _addresses(smtp_server.messages[0]["From"]) == ["default@example.com"]


def test_template_recipients_override_the_channel_recipients(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        enqueue("mail", {**TEMPLATE, "recipients": ["boss@example.com"]}, name="x")
        enqueue("mail", TEMPLATE, name="y")
        finalise()

    first, second = smtp_server.messages
    assert _addresses(first["To"]) == ["boss@example.com"]
    assert smtp_server.envelopes[0] == ["boss@example.com"]
    assert sorted(_addresses(second["To"])) == sorted(RECIPIENTS)
    assert sorted(smtp_server.envelopes[1]) == sorted(RECIPIENTS)


def test_non_ascii_subject_and_body_are_delivered_intact(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server, subject_prefix="[Bücher] ")
    subject = "Grüße aus Zürich — 東京 ✓"
    body = "Ärger mit «Ünïcödé»: 日本語のテキスト ✓\nzweite Zeile: ß€"
    with app.app_context():
        enqueue("mail", {"subject": "{s}", "body": "{b}"}, s=subject, b=body)
        finalise()

    [message] = smtp_server.messages
    assert message["Subject"] == "[Bücher] " + subject
    assert _body(message) == body


def _megabyte_body() -> str:
    """1 MiB of text with non-ASCII, long lines and a recognisable end."""
    line = "Froggy ✓ jumps über the pond. " * 4
    lines = [f"{number:06d} {line}" for number in range(1024 * 1024 // len(line))]
    return "\n".join(lines) + "\nTHE END"


def test_a_megabyte_body_is_delivered_whole(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    body = _megabyte_body()
    assert len(body.encode()) > 1024 * 1024
    with app.app_context():
        enqueue("mail", {"subject": "Big", "body": "{b}"}, b=body)
        result = finalise()

    assert result.ok
    [message] = smtp_server.messages
    assert _body(message) == body


def test_a_body_over_the_servers_size_limit_fails_and_is_not_truncated(
    make_app: t.Callable[..., Flask],
    make_smtp_server: t.Callable[..., SMTPServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_smtp_server(data_size_limit=512 * 1024)
    app = _mail_app(make_app, server)
    with app.app_context():
        big = enqueue("mail", {"subject": "Big", "body": "{b}"}, b=_megabyte_body())
        small = enqueue("mail", TEMPLATE, name="small")
        result = finalise()

    # The server refused the big one outright (552); nothing cut it to fit.
    [(failed, error)] = result.failed
    assert failed is big
    assert "552" in str(error) and "size" in str(error)
    assert result.dispatched == [small]
    assert [_body(m) for m in server.messages] == ["Item small was saved."]
    assert big.id in caplog.text


# -- commit and rollback ----------------------------------------------------


def test_nothing_reaches_the_server_before_commit(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        enqueue("mail", TEMPLATE, name="x")
        db.session.add(Item(name="x"))
        db.session.flush()
        assert smtp_server.connections == 0
        assert smtp_server.messages == []

        db.session.commit()

    assert len(smtp_server.messages) == 1


def test_nothing_reaches_the_server_after_rollback(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        db.session.add(Item(name="x"))
        intent = enqueue("mail", TEMPLATE, name="x")
        result = finalise(commit=False)
        # The next transaction commits, and must not carry the discarded intent.
        db.session.add(Item(name="y"))
        finalise()

    assert result.discarded == [intent]
    assert smtp_server.connections == 0
    assert smtp_server.messages == []


# -- a refused recipient ----------------------------------------------------


def test_refused_recipient_fails_only_its_message(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    smtp_server.refuse.add("refused@example.com")
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        first, second, third = _queue_three_with_a_refused_one()
        result = finalise()

    assert [m["X-Notifyqueue-Intent"] for m in smtp_server.messages] == [
        first.id,
        third.id,
    ]
    assert result.dispatched == [first, third]
    [(failed, exc)] = result.failed
    assert failed == second
    assert "refused@example.com" in str(exc)
    assert not result.ok


def test_refused_recipient_keeps_the_batch_on_one_connection(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    smtp_server.refuse.add("refused@example.com")
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        _queue_three_with_a_refused_one()
        finalise()

    assert len(smtp_server.messages) == 2
    assert smtp_server.connections == 1


def test_recipient_refused_among_several_is_reported_as_a_failure(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    # smtplib only raises when every recipient is refused; otherwise it
    # returns the refused ones, and a channel that ignores them loses the
    # notification for those recipients without a word.
    smtp_server.refuse.add("refused@example.com")
    app = make_app(
        **smtp_server.config(),
        NOTIFYQUEUE_CHANNELS=_channels(
            recipients=["admin@example.com", "refused@example.com"]
        ),
    )
    with app.app_context():
        intent = enqueue("mail", TEMPLATE, name="x")
        result = finalise()

    assert len(smtp_server.messages) == 1  # admin@example.com got it
    assert [failed for failed, _ in result.failed] == [intent]
    assert "refused@example.com" in str(result.failed[0][1])


def test_refused_recipient_is_logged_at_error_with_traceback(
    make_app: t.Callable[..., Flask],
    smtp_server: SMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp_server.refuse.add("refused@example.com")
    app = _mail_app(make_app, smtp_server)
    caplog.set_level(logging.ERROR, logger="notifyqueue")
    with app.app_context():
        _, second, _ = _queue_three_with_a_refused_one()
        result = finalise()

    [(_, exc)] = result.failed
    records = [
        r
        for r in caplog.records
        if r.name == "notifyqueue" and r.levelno == logging.ERROR
    ]
    [record] = records
    assert second.id in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[1] is exc
    assert record.exc_info[2] is not None


def test_refused_recipient_sends_intent_failed(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    smtp_server.refuse.add("refused@example.com")
    app = _mail_app(make_app, smtp_server)
    received: list[tuple[t.Any, Intent, BaseException]] = []

    def on_failed(sender: t.Any, intent: Intent, exception: BaseException) -> None:
        received.append((sender, intent, exception))

    with signals.intent_failed.connected_to(on_failed, sender=app):
        with app.app_context():
            _, second, _ = _queue_three_with_a_refused_one()
            result = finalise()

    [(failed, exc)] = result.failed
    assert received == [(app, second, exc)]


def test_refused_recipient_leaves_the_commit_committed(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    smtp_server.refuse.add("refused@example.com")
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        db.session.add(Item(name="kept"))
        _queue_three_with_a_refused_one()
        result = finalise()

        assert result.committed
        assert _committed_names() == ["kept"]


# -- an unreachable or silent server ----------------------------------------


def test_unreachable_server_fails_every_intent_without_raising(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=free_port(),  # nothing listens there
        MAIL_SUPPRESS_SEND=False,
        NOTIFYQUEUE_CHANNELS=_channels(),
    )
    with app.app_context():
        intents = [enqueue("mail", TEMPLATE, name=str(n)) for n in range(3)]
        result = finalise()

    assert result.committed
    assert not result.ok
    assert result.dispatched == []
    assert [intent for intent, _ in result.failed] == intents
    assert all(isinstance(exc, OSError) for _, exc in result.failed)


def test_unreachable_server_leaves_the_commit_committed(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=free_port(),
        MAIL_SUPPRESS_SEND=False,
        NOTIFYQUEUE_CHANNELS=_channels(),
    )
    with app.app_context():
        db.session.add(Item(name="kept"))
        enqueue("mail", TEMPLATE, name="kept")
        finalise()

        assert _committed_names() == ["kept"]


def test_timeout_option_fails_delivery_to_a_silent_server(
    make_app: t.Callable[..., Flask], silent_port: int
) -> None:
    app = make_app(
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=silent_port,
        MAIL_SUPPRESS_SEND=False,
        NOTIFYQUEUE_CHANNELS=_channels(timeout=0.5),
    )
    with app.app_context():
        db.session.add(Item(name="kept"))
        intent = enqueue("mail", TEMPLATE, name="x")
        result = finalise()

        assert _committed_names() == ["kept"]
    [(failed, exc)] = result.failed
    assert failed == intent
    assert isinstance(exc, OSError)
    assert any(isinstance(e, TimeoutError) for e in _exception_chain(exc))


# -- CR/LF in headers -------------------------------------------------------


@pytest.mark.parametrize("line_break", ["\n", "\r", "\r\n"])
def test_line_break_in_rendered_subject_raises_when_the_function_returns(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer, line_break: str
) -> None:
    app = _mail_app(make_app, smtp_server)
    calls: list[str] = []

    @deferred_notify(mail={"subject": "Saved {name}", "body": "Saved {name}."})
    def save_item(name: str) -> None:
        calls.append(name)
        db.session.add(Item(name="x"))

    with app.app_context():
        with pytest.raises(PayloadError, match="CR or LF") as excinfo:
            save_item(f"x{line_break}Bcc: victim@example.com")
        assert calls, "the error is raised after the function body ran"
        result = finalise()

    assert isinstance(excinfo.value, ValueError)
    assert result.dispatched == []
    assert smtp_server.messages == []


def test_line_break_in_enqueued_subject_raises_at_enqueue(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    queued: list[Intent] = []

    def on_queued(sender: t.Any, intent: Intent) -> None:
        queued.append(intent)

    with signals.intent_queued.connected_to(on_queued), app.app_context():
        with pytest.raises(PayloadError, match="subject"):
            enqueue("mail", TEMPLATE, name="x\r\nBcc: victim@example.com")
        result = finalise()

    assert queued == []
    assert result.dispatched == []
    assert smtp_server.messages == []


def test_line_break_in_recipients_override_raises_at_queue_time(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)
    template = {**TEMPLATE, "recipients": ["a@example.com\r\nBcc: victim@example.com"]}
    with app.app_context():
        with pytest.raises(PayloadError, match="CR or LF"):
            enqueue("mail", template, name="x")
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_line_break_in_recipients_override_of_a_decorator_raises_at_call(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server)

    @deferred_notify(
        mail={**TEMPLATE, "recipients": ["a@example.com\nBcc: victim@example.com"]}
    )
    def save_item(name: str) -> None:
        pass

    with app.app_context():
        with pytest.raises(PayloadError, match="CR or LF"):
            save_item("x")
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_payload_error_queues_no_intent_for_any_channel(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = make_app(
        **smtp_server.config(),
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": "tests.helpers:RecordingChannel"},
            **_channels(),
        },
    )

    @deferred_notify(rec="Saved {name}", mail=TEMPLATE)
    def save_item(name: str) -> None:
        pass

    with app.app_context():
        with pytest.raises(PayloadError):
            save_item("x\nBcc: victim@example.com")
        result = finalise()

    assert result.dispatched == []
    assert app.extensions["notifyqueue"].channels["rec"].batches == []


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            {"NOTIFYQUEUE_CHANNELS": _channels(sender="a@x.com\r\nBcc: v@x.com")},
            id="option",
        ),
        pytest.param(
            {
                "MAIL_DEFAULT_SENDER": "a@x.com\nBcc: v@x.com",
                "NOTIFYQUEUE_CHANNELS": _channels(),
            },
            id="MAIL_DEFAULT_SENDER",
        ),
    ],
)
def test_line_break_in_sender_is_refused_before_anything_is_queued(
    make_app: t.Callable[..., Flask], config: dict[str, t.Any]
) -> None:
    # The sender is not part of a template: it comes from the config, so it
    # is refused when the app starts, before any intent can be queued.
    app = make_app(init=False, **config)
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*CR or LF"
    ) as excinfo:
        NotifyQueue(app)
    assert isinstance(excinfo.value.__cause__, PayloadError)


def test_line_break_in_subject_prefix_fails_at_init_app(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False, NOTIFYQUEUE_CHANNELS=_channels(subject_prefix="[x]\nBcc: v@x.com ")
    )
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*subject_prefix"
    ):
        NotifyQueue(app)


# -- template shape ---------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "match"),
    [
        pytest.param("Saved {name}", "takes a dict template", id="not-a-dict"),
        pytest.param(
            {"subject": "Saved {name}"},
            "none of 'body', 'html' or 'template'",
            id="no-body",
        ),
        pytest.param({"body": "Saved {name}"}, "has no 'subject'", id="no-subject"),
        pytest.param(
            {**TEMPLATE, "subjct": "x"},
            r"unknown key 'subjct' \(did you mean 'subject'\?\)",
            id="unknown-key",
        ),
    ],
)
def test_template_shape_error_raises_at_enqueue(
    make_app: t.Callable[..., Flask],
    smtp_server: SMTPServer,
    template: t.Any,
    match: str,
) -> None:
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        with pytest.raises(TemplateError, match=match):
            enqueue("mail", template, name="x")
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("Saved {name}", id="not-a-dict"),
        pytest.param({"subject": "Saved {name}"}, id="no-body"),
        pytest.param({**TEMPLATE, "replyto": "Saved {name}"}, id="unknown-key"),
    ],
)
def test_template_shape_error_raises_at_decoration_once_an_app_is_initialised(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer, template: t.Any
) -> None:
    # The app is initialised, so MailChannel.check_template refuses the
    # template when the decorator runs, before any call.
    app = _mail_app(make_app, smtp_server)
    with app.app_context():
        with pytest.raises(TemplateError, match=r"(?i)channel 'mail'"):

            @deferred_notify(mail=template)
            def save_item(name: str) -> str:
                return name

        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


# -- MAIL_SUPPRESS_SEND -----------------------------------------------------


def test_suppressed_send_reaches_no_server_but_record_messages_sees_it(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    # TESTING=True makes Flask-Mail's MAIL_SUPPRESS_SEND default to True.
    app = make_app(
        MAIL_SERVER=smtp_server.host,
        MAIL_PORT=smtp_server.port,
        NOTIFYQUEUE_CHANNELS=_channels(subject_prefix="[t] "),
    )
    mail = app.extensions["mail"]
    assert mail.suppress
    with app.app_context(), mail.record_messages() as outbox:
        intents = [enqueue("mail", TEMPLATE, name=n) for n in ("a", "b")]
        result = finalise()

    assert result.ok
    assert [m.subject for m in outbox] == ["[t] Saved a", "[t] Saved b"]
    assert [m.extra_headers["X-Notifyqueue-Intent"] for m in outbox] == [
        intent.id for intent in intents
    ]
    assert [m.recipients for m in outbox] == [RECIPIENTS, RECIPIENTS]
    # Each message is a copy of one prototype: none may share a list or dict
    # with another, or with the channel's own recipients.
    first, second = outbox
    for name, value in vars(first).items():
        if isinstance(value, (list, dict)):
            assert value is not getattr(second, name), name
    assert (
        first.recipients
        is not app.extensions["notifyqueue"].channels["mail"].recipients
    )
    first.cc.append("changed@example.com")
    assert second.cc == []
    assert smtp_server.connections == 0
    assert smtp_server.messages == []


# -- init_app ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"recipients": []}, "recipients", id="empty-recipients"),
        pytest.param(
            {"recipients": "admin@example.com"}, "recipients", id="recipients-str"
        ),
        pytest.param({"recipients": [""]}, "recipients", id="empty-address"),
        pytest.param({"timeout": 0}, "timeout", id="timeout-zero"),
        pytest.param({"timeout": -1.5}, "timeout", id="timeout-negative"),
        pytest.param({"timeout": "10"}, "timeout", id="timeout-str"),
        pytest.param({"cc": ["x@example.com"]}, "cc", id="unknown-option"),
    ],
)
def test_bad_option_fails_at_init_app(
    make_app: t.Callable[..., Flask], options: dict[str, t.Any], match: str
) -> None:
    app = make_app(init=False, NOTIFYQUEUE_CHANNELS=_channels(**options))
    with pytest.raises(
        ConfigurationError, match=rf"NOTIFYQUEUE_CHANNELS\['mail'\].*{match}"
    ):
        NotifyQueue(app)
    assert "notifyqueue" not in app.extensions


def test_without_a_recipients_option_a_mail_to_nobody_fails_at_queue_time(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server, NOTIFYQUEUE_CHANNELS={"mail": {"type": "mail"}})
    with app.app_context():
        with pytest.raises(
            PayloadError,
            match=r"^The mail 'Saved x' has no recipient: .*'recipients', 'cc' or"
            r" 'bcc'.*channel 'mail' no 'recipients' option",
        ):
            enqueue("mail", TEMPLATE, name="x")
        intent = enqueue(
            "mail", {**TEMPLATE, "recipients": ["a@example.com"]}, name="y"
        )
        result = finalise()

    assert result.dispatched == [intent]
    assert smtp_server.envelopes == [["a@example.com"]]


def test_no_sender_anywhere_fails_at_init_app(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False, MAIL_DEFAULT_SENDER=None, NOTIFYQUEUE_CHANNELS=_channels()
    )
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*sender"
    ):
        NotifyQueue(app)


def test_flask_mail_not_initialised_fails_at_init_app() -> None:
    app = Flask("no_mail")
    app.config.update(
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS=_channels(),
    )
    session = scoped_session(sessionmaker())
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*Flask-Mail"
    ):
        NotifyQueue(app, session=session)
    assert "notifyqueue" not in app.extensions


def test_flask_mail_not_installed_fails_at_init_app_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if Flask-Mail were not installed: importing it raises ImportError.
    monkeypatch.setitem(sys.modules, "flask_mail", None)
    monkeypatch.delitem(sys.modules, "notifyqueue.channels.mail", raising=False)
    app = Flask("no_flask_mail")
    app.config["NOTIFYQUEUE_CHANNELS"] = _channels()
    with pytest.raises(ConfigurationError) as excinfo:
        NotifyQueue(app, session=scoped_session(sessionmaker()))
    message = str(excinfo.value)
    assert "NOTIFYQUEUE_CHANNELS['mail']['type']" in message
    assert "pip install 'notifyqueue[mail]'" in message
    assert "notifyqueue" not in app.extensions


# -- every line break and control character in headers ----------------------


def _refused_in_headers() -> list[str]:
    """Every character a header value may not hold, found from first principles.

    Whatever ``str.splitlines()`` splits on (the email package folds headers
    with it), every control character but TAB (C0, DEL and C1), and lone
    surrogates, which cannot be encoded.
    """
    refused = [
        chr(code)
        for code in range(0x110000)
        if (code != 0x09 and unicodedata.category(chr(code)) == "Cc")
        or len(f"a{chr(code)}b".splitlines()) > 1
    ]
    return refused + ["\ud800", "\udbff", "\udc00", "\udfff"]


REFUSED_IN_HEADERS = _refused_in_headers()
INJECTION = "Reply-To: attacker@evil.example"


def _light_app(server: SMTPServer | None = None, **config: t.Any) -> Flask:
    """An app with Flask-Mail and NotifyQueue on a session bound to no database.

    Nothing here needs SQL, and the tests that use it are parametrised over
    dozens of characters: building a database per test would be most of the
    run.
    """
    app = Flask("light_mail_app")
    app.config.update(
        TESTING=True,
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS=_channels(),
        **(server.config() if server is not None else {}),
    )
    app.config.update(config)
    Mail(app)
    NotifyQueue(app, session=scoped_session(sessionmaker()))
    return app


def _char_id(char: str) -> str:
    return f"U+{ord(char):04X}"


def test_the_refused_characters_include_every_line_break_of_the_issue() -> None:
    for char in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00\x7f\x9f\ud800":
        assert char in REFUSED_IN_HEADERS
    assert "\t" not in REFUSED_IN_HEADERS


@pytest.mark.parametrize("char", REFUSED_IN_HEADERS, ids=_char_id)
@pytest.mark.parametrize(
    ("field", "template", "what"),
    [
        pytest.param(
            "subject",
            {"subject": "Renamed to {value}", "body": "ok"},
            "the subject",
            id="subject",
        ),
        pytest.param(
            "recipients",
            {"subject": "s", "body": "ok", "recipients": ["{value}"]},
            "entry 1 of the template's 'recipients'",
            id="recipient",
        ),
    ],
)
def test_header_character_that_could_break_a_line_is_refused_at_queue_time(
    smtp_server: SMTPServer,
    field: str,
    template: dict[str, t.Any],
    what: str,
    char: str,
) -> None:
    app = _light_app(smtp_server)
    value = (
        f"kermit{char}{INJECTION}"
        if field == "subject"
        else f"kermit@example.com{char}{INJECTION}"
    )
    with app.app_context():
        with pytest.raises(
            PayloadError, match=rf"^{re.escape(what)} .*{re.escape(_char_id(char))}"
        ):
            enqueue("mail", template, value=value)
        fine = enqueue("mail", TEMPLATE, name="fine")
        result = finalise()

    # Nothing of the refused value reached the server; the next intent did.
    assert result.dispatched == [fine]
    [message] = smtp_server.messages
    assert "Reply-To" not in message
    assert b"attacker" not in smtp_server.raw[0]
    assert smtp_server.envelopes == [RECIPIENTS]


def test_vertical_tab_in_a_decorated_subject_is_refused_when_the_function_returns(
    smtp_server: SMTPServer,
) -> None:
    # The issue's own example: before, this delivered a real Reply-To header.
    app = _light_app(smtp_server)

    @deferred_notify(mail={"subject": "Renamed to {n}", "body": "ok"})
    def rename(n: str) -> None:
        pass

    with app.app_context():
        with pytest.raises(PayloadError, match=r"^the subject .*U\+000B"):
            rename(f"kermit\x0b{INJECTION}")
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


@pytest.mark.parametrize("char", REFUSED_IN_HEADERS, ids=_char_id)
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            lambda bad: {"NOTIFYQUEUE_CHANNELS": _channels(sender=bad)}, id="sender"
        ),
        pytest.param(
            lambda bad: {"MAIL_DEFAULT_SENDER": bad}, id="MAIL_DEFAULT_SENDER"
        ),
        pytest.param(
            lambda bad: {"NOTIFYQUEUE_CHANNELS": _channels(subject_prefix=bad)},
            id="subject_prefix",
        ),
        pytest.param(
            lambda bad: {
                "NOTIFYQUEUE_CHANNELS": _channels(recipients=["ops@example.com", bad])
            },
            id="recipients",
        ),
    ],
)
def test_header_character_that_could_break_a_line_fails_an_option_at_init_app(
    config: t.Callable[[str], dict[str, t.Any]], char: str
) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"NOTIFYQUEUE_CHANNELS\['mail'\].*{re.escape(_char_id(char))}",
    ) as excinfo:
        _light_app(**config(f"shop@example.com{char}{INJECTION}"))
    assert isinstance(excinfo.value.__cause__, PayloadError)


def test_tab_and_non_ascii_in_headers_arrive_intact_and_add_no_header(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server)
    subject = f"kermit\t{INJECTION} — Grüße\u00a0aus 東京 ✓ \u200b\ufeff"
    recipient = f"Kermit {INJECTION} Grüße <kermit@example.com>"
    with app.app_context():
        intent = enqueue(
            "mail",
            {"subject": "{s}", "body": "ok", "recipients": ["{r}"]},
            s=subject,
            r=recipient,
        )
        result = finalise()

    assert result.dispatched == [intent]
    [message] = smtp_server.messages
    assert message["Subject"] == subject
    [address] = message["To"].addresses
    assert address.addr_spec == "kermit@example.com"
    assert address.display_name == f"Kermit {INJECTION} Grüße"
    assert sorted(message.keys()) == sorted(
        [
            "Content-Type",
            "MIME-Version",
            "Content-Transfer-Encoding",
            "Subject",
            "From",
            "To",
            "Date",
            "Message-ID",
            "X-Notifyqueue-Intent",
        ]
    )
    assert not any(
        line.lower().startswith(b"reply-to") for line in smtp_server.raw[0].splitlines()
    )


# -- one unsendable email fails alone ---------------------------------------


def _three(middle: dict[str, t.Any], **context: t.Any) -> list[Intent]:
    return [
        enqueue("mail", TEMPLATE, name="first"),
        enqueue("mail", {**TEMPLATE, **middle}, name="second", **context),
        enqueue("mail", TEMPLATE, name="third"),
    ]


def test_a_lone_surrogate_in_the_body_is_refused_at_queue_time(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server)
    surrogate = json.loads('"caf\\ud800e"')  # straight from a JSON request body
    with app.app_context():
        first = enqueue("mail", TEMPLATE, name="first")
        with pytest.raises(
            PayloadError, match=r"^the body contains the lone surrogate U\+D800"
        ):
            enqueue("mail", {"subject": "s", "body": "Note: {note}"}, note=surrogate)
        third = enqueue("mail", TEMPLATE, name="third")
        result = finalise()

    assert smtp_server.intent_ids() == [first.id, third.id]
    assert result.dispatched == [first, third]
    assert result.failed == []


def test_non_ascii_local_part_fails_alone_where_the_server_lacks_smtputf8(
    make_smtp_server: t.Callable[..., SMTPServer],
) -> None:
    smtp_server = make_smtp_server(enable_SMTPUTF8=False)
    app = _light_app(smtp_server)
    with app.app_context():
        first, second, third = _three({"recipients": ["jürgen@example.com"]})
        result = finalise()

    assert smtp_server.intent_ids() == [first.id, third.id]
    assert result.dispatched == [first, third]
    [(failed, exc)] = result.failed
    assert failed is second
    assert "'jürgen@example.com'" in str(exc)
    assert "does not offer SMTPUTF8" in str(exc)
    assert smtp_server.connections == 1


def test_non_ascii_local_part_is_delivered_where_the_server_offers_smtputf8(
    make_smtp_server: t.Callable[..., SMTPServer],
) -> None:
    server = make_smtp_server(enable_SMTPUTF8=True)
    app = _light_app(server)
    with app.app_context():
        first, second, third = _three(
            {"recipients": ["Jürgen Müller <jürgen@bücher.example>"]}
        )
        result = finalise()

    assert result.ok
    assert server.intent_ids() == [first.id, second.id, third.id]
    # The local part travels as UTF-8 (RFC 6531/6532), the domain as IDNA.
    assert server.envelopes[1] == ["jürgen@xn--bcher-kva.example"]
    assert "SMTPUTF8" in server.mail_options[1]
    assert "SMTPUTF8" not in server.mail_options[0] + server.mail_options[2]
    assert "<jürgen@xn--bcher-kva.example>".encode() in server.raw[1]
    # message_from_bytes reads 8-bit headers as surrogates: decode them first.
    arrived = email.message_from_string(
        server.raw[1].decode("utf-8"), policy=email.policy.SMTPUTF8
    )
    [address] = arrived["To"].addresses
    assert (address.display_name, address.username, address.domain) == (
        "Jürgen Müller",
        "jürgen",
        "xn--bcher-kva.example",
    )


def test_a_raising_email_dispatched_receiver_fails_no_message(
    smtp_server: SMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The server accepted the message before the receiver ran: it was
    # delivered, so it is reported delivered, and the receiver's error logged.
    app = _light_app(smtp_server)
    seen: list[str] = []
    boom = RuntimeError("receiver failed")

    def raising(sender: Flask, message: t.Any) -> None:
        if message.subject == "Saved second":
            raise boom

    def recording(sender: Flask, message: t.Any) -> None:
        seen.append(message.subject)

    with (
        email_dispatched.connected_to(raising),
        email_dispatched.connected_to(recording),
        app.app_context(),
    ):
        first, second, third = _three({})
        result = finalise()

    assert smtp_server.intent_ids() == [first.id, second.id, third.id]
    assert result.dispatched == [first, second, third]
    assert result.failed == []
    assert seen == ["Saved first", "Saved second", "Saved third"]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.name == "notifyqueue"
    assert second.id in record.getMessage()
    assert "email_dispatched" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is boom


def test_a_message_that_cannot_be_built_fails_alone(smtp_server: SMTPServer) -> None:
    # Queue-time checks keep unbuildable values out; this corrupts a payload
    # after them to prove that any error building one message fails it alone.
    app = _light_app(smtp_server)
    with app.app_context():
        first, second, third = _three({})
        second.payload["body"] = "\ud800"
        result = finalise()

    assert smtp_server.intent_ids() == [first.id, third.id]
    assert result.dispatched == [first, third]
    [(failed, exc)] = result.failed
    assert failed is second
    assert isinstance(exc, UnicodeEncodeError)
    assert smtp_server.connections == 1


# -- long body lines --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("x" * 2000, id="2000-ascii"),
        pytest.param("ü" * 600, id="600-umlauts"),
        pytest.param("x" * 999, id="999-octets"),
        pytest.param("€" * 333 + "x", id="1000-octets-in-334-chars"),
        pytest.param(
            "short\r\n"
            + "long "
            + "y" * 1200
            + "  \n"
            + "trailing spaces and a tab \t\r\n"
            + ".a line starting with a dot\n"
            + "From the start\n"
            + "=3D and = signs, \x0c form feed, \x85 NEL, \u2028 LS, \x0b VT\r\n"
            + "ü" * 700
            + "\n\n"
            + "last line without a break",
            id="mixed",
        ),
    ],
)
def test_a_body_line_over_998_octets_arrives_whole(
    smtp_server: SMTPServer, body: str
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        intent = enqueue("mail", {"subject": "s", "body": "{b}"}, b=body)
        result = finalise()

    assert result.dispatched == [intent]
    [message] = smtp_server.messages
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    # Every character arrives; line breaks arrive as CRLF, text's canonical
    # form (RFC 2046), and SMTP's DATA ends the last line.
    expected = re.sub(r"\r\n|\r|\n", "\r\n", body) + "\r\n"
    assert message.get_payload(decode=True).decode("utf-8") == expected
    assert max(len(line) for line in smtp_server.raw[0].split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        pytest.param("x" * 998, "7bit", id="998-ascii"),
        pytest.param("ü" * 499, "8bit", id="998-octets"),
        pytest.param("Ärger\nzweite Zeile  \n", "8bit", id="short-non-ascii"),
    ],
)
def test_a_body_with_lines_up_to_998_octets_keeps_its_form(
    smtp_server: SMTPServer, body: str, encoding: str
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        enqueue("mail", {"subject": "s", "body": "{b}"}, b=body)
        finalise()

    [message] = smtp_server.messages
    assert message["Content-Transfer-Encoding"] == encoding
    assert body.replace("\n", "\r\n").encode() in smtp_server.raw[0]


# -- recipients in templates ------------------------------------------------


def test_template_recipients_are_rendered_from_the_decorated_call(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server)

    @deferred_notify(
        mail={
            "subject": "Welcome {email}",
            "body": "Hello {name}.",
            "recipients": ["{name} <{email}>", "audit@example.com"],
        }
    )
    def register(name: str, email: str) -> None:
        pass

    with app.app_context():
        register("Kermit Frog", "kermit@example.com")
        result = finalise()

    assert result.ok
    [message] = smtp_server.messages
    assert message["Subject"] == "Welcome kermit@example.com"
    assert smtp_server.envelopes == [["kermit@example.com", "audit@example.com"]]
    assert [(a.display_name, a.addr_spec) for a in message["To"].addresses] == [
        ("Kermit Frog", "kermit@example.com"),
        ("", "audit@example.com"),
    ]


def test_template_recipients_are_rendered_for_enqueue(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        intent = enqueue(
            "mail",
            {**TEMPLATE, "recipients": ["{user[email]}"]},
            name="x",
            user={"email": "piggy@example.com"},
        )
        finalise()

    assert intent.payload["recipients"] == ["piggy@example.com"]
    assert smtp_server.envelopes == [["piggy@example.com"]]


def test_template_recipient_naming_no_parameter_fails_at_decoration() -> None:
    with pytest.raises(TemplateError, match="'email' names no parameter"):

        @deferred_notify(mail={**TEMPLATE, "recipients": ["{email}"]})
        def register(name: str) -> None:
            pass


@pytest.mark.parametrize(
    "address",
    [
        "kermit",
        "kermit@",
        "@example.com",
        "kermit@@example.com",
        "kermit@frog@example.com",
        "kermit@example.com, piggy@example.com",
        "kermit@example.com piggy@example.com",
        "Kermit <kermit@example.com> extra",
        "Kermit <kermit@example.com",
        "kermit @example.com",
        "kermit.@example.com",
        "kermit@example..com",
        "kermit@xn--ü" + "a" * 64 + ".example",
        "undisclosed-recipients:;",
        " ",
    ],
)
def test_template_recipient_that_is_not_an_address_is_refused_at_queue_time(
    smtp_server: SMTPServer, address: str
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        with pytest.raises(
            PayloadError,
            match=rf"^entry 2 of the template's 'recipients' {re.escape(repr(address))}"
            " is not an email address",
        ):
            enqueue(
                "mail",
                {**TEMPLATE, "recipients": ["ops@example.com", "{to}"]},
                name="x",
                to=address,
            )
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_an_empty_template_recipients_list_is_refused_at_queue_time(
    smtp_server: SMTPServer,
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        with pytest.raises(TemplateError, match="must be a non-empty list"):
            enqueue("mail", {**TEMPLATE, "recipients": []}, name="x")


def test_recipients_option_that_is_not_an_address_fails_at_init_app() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*entry 2 of option 'recipients'"
        r" 'ops' is not an email address",
    ):
        _light_app(NOTIFYQUEUE_CHANNELS=_channels(recipients=["a@example.com", "ops"]))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(f"Kermit, {INJECTION}," + " and more" * 10, id="ascii-long"),
        pytest.param(f"Kermit, {INJECTION}", id="ascii-short"),
        pytest.param(f"Kermit Grüße, {INJECTION}," + " und so" * 10, id="non-ascii"),
        pytest.param("Kermit \\ the Frog (green)", id="backslash-and-parens"),
        pytest.param('"Kermit \\"the\\" Frog"', id="quoted-with-quotes"),
    ],
)
def test_a_display_name_stays_one_name_whatever_it_holds(
    smtp_server: SMTPServer, name: str
) -> None:
    # Python's own refolding of a long address header drops the quotes of a
    # display name: "Kermit, attacker@..., ..." became extra To addresses.
    app = _light_app(smtp_server)
    with app.app_context():
        enqueue(
            "mail",
            {**TEMPLATE, "recipients": ["{name} <kermit@example.com>"]},
            name=name,
        )
        finalise()

    # Read with decode_header: policy.default's parser puts a space between
    # adjacent encoded words in a display name, which RFC 2047 says to drop.
    [message] = smtp_server.messages
    to = email.message_from_bytes(smtp_server.raw[0], policy=email.policy.compat32)
    addresses = [
        (str(email.header.make_header(email.header.decode_header(n))), a)
        for n, a in email.utils.getaddresses([to["To"]])
    ]
    unquoted = re.sub(r"\\(.)", r"\1", name[1:-1]) if name[0] == '"' else name
    assert addresses == [(unquoted, "kermit@example.com")]
    assert len(message["To"].addresses) == 1
    assert smtp_server.envelopes == [["kermit@example.com"]]
    headers = smtp_server.raw[0].split(b"\r\n\r\n")[0]
    assert max(len(line) for line in headers.split(b"\r\n")) <= 78


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("x" * 2000, id="one-long-word"),
        pytest.param("word " * 300, id="many-words"),
        pytest.param("ü" * 700, id="non-ascii"),
    ],
)
def test_a_long_subject_is_folded_and_arrives_whole(
    smtp_server: SMTPServer, subject: str
) -> None:
    app = _light_app(smtp_server)
    with app.app_context():
        intent = enqueue("mail", {"subject": "{s}", "body": "b"}, s=subject)
        result = finalise()

    assert result.dispatched == [intent]
    [message] = smtp_server.messages
    assert message["Subject"] == subject
    assert max(len(line) for line in smtp_server.raw[0].split(b"\r\n")) <= 78


# -- a decorated function's templates render without a second shape check ------


@pytest.mark.parametrize(
    ("template", "context"),
    [
        (TEMPLATE, {"name": "a"}),
        ({"subject": "S {name}", "html": "<b>{name}</b>"}, {"name": "<i>&"}),
        ({"subject": "S", "body": "b", "recipients": ["{to}"]}, {"to": "x@a.org"}),
        ({"subject": "S", "body": "b", "cc": ["{to}"]}, {"to": "not an address"}),
        ({"subject": "S {name}", "body": "b"}, {"name": "line\nbreak"}),
        ({"subject": "S {name}", "body": "b"}, {}),
        (
            {"subject": "S", "body": "b", "reply_to": "{to}", "sender": "{to}"},
            {"to": "r@a.org"},
        ),
        ({"subject": "S", "body": "{files}", "attachments": "files"}, {"files": []}),
    ],
)
def test_a_mail_renderer_agrees_with_render(
    make_app: t.Callable[..., Flask], template: dict[str, t.Any], context: t.Any
) -> None:
    from notifyqueue.templates import compile_templates

    app = make_app(NOTIFYQUEUE_CHANNELS=_channels())
    channel = app.extensions["notifyqueue"].channels["mail"]
    compiled = compile_templates(template, "test")
    channel.check_template(compiled)

    def outcome(render: t.Callable[[], t.Any]) -> tuple[t.Any, ...]:
        try:
            return ("rendered", render())
        except Exception as exc:
            return ("refused", type(exc), str(exc))

    with app.app_context():
        general = outcome(lambda: channel.render(compiled, context))
        fast = outcome(lambda: channel._renderer(compiled)(context))
    assert fast == general
