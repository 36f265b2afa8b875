"""The mail channel's richer messages: HTML, Jinja files, Cc/Bcc/Reply-To,
attachments, the size limit, Raw payloads, template checks, an unreachable
server. Each message is sent to a real SMTP server and parsed as it arrived.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import pathlib
import re
import typing as t

import pytest
from flask import Flask, url_for
from flask_mail import Mail
from markupsafe import Markup
from sqlalchemy.orm import scoped_session, sessionmaker

from notifyqueue import (
    ConfigurationError,
    Intent,
    NotifyQueue,
    PayloadError,
    Raw,
    TemplateError,
    deferred_notify,
    enqueue,
    finalise,
)
from notifyqueue.channels.mail import MailChannel
from notifyqueue.templates import compile_template

from .conftest import SMTPServer, free_port

RECIPIENTS = ["admin@example.com"]
NASTY = '<b>&"'  # must arrive escaped in HTML, as it is in text and headers
ESCAPED = "&lt;b&gt;&amp;&#34;"


def _app(
    server: SMTPServer | None = None,
    template_folder: pathlib.Path | None = None,
    **options: t.Any,
) -> Flask:
    """An app with Flask-Mail and NotifyQueue on a session bound to no database."""
    app = Flask(
        "mail_parts_app",
        template_folder=str(template_folder) if template_folder else "templates",
    )
    app.config.update(
        TESTING=True,
        SERVER_NAME="shop.example",
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS={
            "mail": {"type": "mail", "recipients": list(RECIPIENTS), **options}
        },
        **(server.config() if server is not None else {}),
    )
    Mail(app)
    NotifyQueue(app, session=scoped_session(sessionmaker()))
    return app


def _send(server: SMTPServer, template: t.Any, **context: t.Any) -> t.Any:
    """Queue one mail, commit, and return the message as it arrived, parsed."""
    app = _app(server)
    with app.app_context():
        enqueue("mail", template, **context)
        result = finalise()
    assert result.ok, result.failed
    [message] = server.messages
    return message


def _text(part: t.Any) -> str:
    return str(part.get_content()).replace("\r\n", "\n").removesuffix("\n")


def _types(message: t.Any) -> list[str]:
    return [part.get_content_type() for part in message.walk()]


# -- HTML --------------------------------------------------------------------


def test_body_and_html_arrive_as_multipart_alternative(
    smtp_server: SMTPServer,
) -> None:
    message = _send(
        smtp_server,
        {
            "subject": "Hi {v}",
            "body": "Text {v}",
            "html": "<p>HTML {v}</p>",
        },
        v="x",
    )

    assert _types(message) == ["multipart/alternative", "text/plain", "text/html"]
    plain, html = message.iter_parts()
    assert plain.get_content_charset() == "utf-8"
    assert html.get_content_charset() == "utf-8"
    assert _text(plain) == "Text x"
    assert _text(html) == "<p>HTML x</p>"
    # One MIME-Version, on the message itself.
    assert smtp_server.raw[0].count(b"MIME-Version") == 1


def test_values_are_escaped_in_html_and_raw_in_text_and_subject(
    smtp_server: SMTPServer,
) -> None:
    message = _send(
        smtp_server,
        {"subject": "Hi {v}", "body": "Text {v}", "html": "<p>{v}</p>"},
        v=NASTY,
    )

    plain, html = message.iter_parts()
    assert message["Subject"] == f"Hi {NASTY}"
    assert _text(plain) == f"Text {NASTY}"
    assert _text(html) == f"<p>{ESCAPED}</p>"


def test_a_markup_value_is_not_escaped_again(smtp_server: SMTPServer) -> None:
    message = _send(
        smtp_server,
        {"subject": "s", "html": "<p>{a} {b}</p>"},
        a=Markup("<i>safe</i>"),
        b="<i>unsafe</i>",
    )

    assert _text(message) == "<p><i>safe</i> &lt;i&gt;unsafe&lt;/i&gt;</p>"


def test_render_html_escapes_each_value_and_keeps_the_template_text() -> None:
    template = compile_template("<p class='x'>{a} {a!r} {n:>3} {{literal}}</p>")

    assert template.render_html({"a": "<&>", "n": 7}) == (
        "<p class='x'>&lt;&amp;&gt; &#39;&lt;&amp;&gt;&#39;   7 {literal}</p>"
    )
    with pytest.raises(TemplateError, match="Cannot render template"):
        template.render_html({})


def test_html_alone_is_one_text_html_part(smtp_server: SMTPServer) -> None:
    app = _app(smtp_server)
    with app.app_context():
        intent = enqueue("mail", {"subject": "s", "html": "<p>{v}</p>"}, v="x")
        finalise()

    [message] = smtp_server.messages
    assert _types(message) == ["text/html"]
    assert message.get_content_charset() == "utf-8"
    assert _text(message) == "<p>x</p>"
    assert "body" not in intent.payload
    assert intent.payload["html"] == "<p>x</p>"


def test_a_plain_text_mail_keeps_its_payload_and_its_single_part(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        intent = enqueue("mail", {"subject": "s", "body": "b"})
        finalise()

    assert intent.payload == {
        "subject": "s",
        "body": "b",
        "recipients": RECIPIENTS,
        "sender": "notify@example.com",
    }
    assert _types(smtp_server.messages[0]) == ["text/plain"]


def test_an_html_line_over_998_octets_is_quoted_printable_and_arrives_whole(
    smtp_server: SMTPServer,
) -> None:
    html = "<p>" + "ü" * 700 + "</p>"
    message = _send(
        smtp_server, {"subject": "s", "body": "short", "html": "{h}"}, h=Markup(html)
    )

    plain, part = message.iter_parts()
    assert plain["Content-Transfer-Encoding"] == "7bit"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True).decode("utf-8") == html
    assert max(len(line) for line in smtp_server.raw[0].split(b"\r\n")) <= 998


def test_a_lone_surrogate_in_html_is_refused_at_queue_time(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        with pytest.raises(PayloadError, match="^the HTML part contains the lone"):
            enqueue("mail", {"subject": "s", "html": "{v}"}, v="\ud800")


# -- Jinja files -------------------------------------------------------------


def _folder(tmp_path: pathlib.Path, **files: str) -> pathlib.Path:
    (tmp_path / "email").mkdir()
    for name, text in files.items():
        (tmp_path / "email" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_jinja_files_render_the_body_and_the_html_with_the_context(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    folder = _folder(
        tmp_path,
        confirm_txt="Hello {{ user }}, token {{ token }}.",
        confirm_html="<p>Hello {{ user }}, token {{ token }}.</p>",
    )
    app = _app(smtp_server, folder)
    with app.app_context():
        intent = enqueue(
            "mail", {"subject": "s", "template": "email/confirm"}, user=NASTY, token=7
        )
        finalise()

    [message] = smtp_server.messages
    plain, html = message.iter_parts()
    # Jinja autoescapes the .html file (Flask's default), not the .txt.
    assert _text(plain) == f"Hello {NASTY}, token 7."
    assert _text(html) == "<p>Hello &lt;b&gt;&amp;&#34;, token 7.</p>"
    assert intent.payload["body"] == f"Hello {NASTY}, token 7."


@pytest.mark.parametrize(
    ("files", "types"),
    [
        pytest.param({"confirm_txt": "T {{ user }}"}, ["text/plain"], id="txt-only"),
        pytest.param({"confirm_html": "<p>{{ user }}</p>"}, ["text/html"], id="html"),
    ],
)
def test_either_jinja_file_may_be_missing(
    smtp_server: SMTPServer,
    tmp_path: pathlib.Path,
    files: dict[str, str],
    types: list[str],
) -> None:
    app = _app(smtp_server, _folder(tmp_path, **files))
    with app.app_context():
        enqueue("mail", {"subject": "s", "template": "email/confirm"}, user="u")
        finalise()

    [message] = smtp_server.messages
    assert _types(message) == types
    assert "u" in _text(message)


def test_both_jinja_files_missing_is_a_template_error_naming_both(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    app = _app(smtp_server, _folder(tmp_path))
    with app.app_context():
        with pytest.raises(
            TemplateError, match=r"'email/confirm\.txt' or 'email/confirm\.html'"
        ):
            enqueue("mail", {"subject": "s", "template": "email/confirm"})
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_a_file_a_jinja_template_includes_is_missing_is_a_template_error(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    folder = _folder(tmp_path, confirm_txt='{% include "email/footer.txt" %}')
    app = _app(smtp_server, folder)
    with app.app_context():
        with pytest.raises(TemplateError, match=r"uses 'email/footer\.txt'"):
            enqueue("mail", {"subject": "s", "template": "email/confirm"})


def test_a_jinja_syntax_error_is_a_template_error(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    app = _app(smtp_server, _folder(tmp_path, confirm_html="{% if %}"))
    with app.app_context():
        with pytest.raises(TemplateError, match=r"'email/confirm\.html'.*Syntax"):
            enqueue("mail", {"subject": "s", "template": "email/confirm"})


def test_jinja_files_render_url_for_external_inside_the_request(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    folder = _folder(
        tmp_path,
        confirm_txt="{{ url_for('confirm', token=token, _external=True) }}",
        confirm_html="<a href=\"{{ url_for('confirm', token=token, _external=True)"
        ' }}">confirm</a>',
    )
    app = _app(smtp_server, folder)
    app.config["SERVER_NAME"] = None
    app.add_url_rule("/confirm/<token>", "confirm", lambda token: token)

    with app.test_request_context(base_url="https://shop.example:8443/"):
        expected = url_for("confirm", token="abc", _external=True)
        enqueue("mail", {"subject": "s", "template": "email/confirm"}, token="abc")
        finalise()

    assert expected == "https://shop.example:8443/confirm/abc"
    plain, html = smtp_server.messages[0].iter_parts()
    assert _text(plain) == expected
    assert _text(html) == f'<a href="{expected}">confirm</a>'


def test_a_decorated_function_renders_jinja_files_with_its_parameters(
    smtp_server: SMTPServer, tmp_path: pathlib.Path
) -> None:
    folder = _folder(tmp_path, confirm_txt="{{ user }} {{ token }} {{ result }}")
    app = _app(smtp_server, folder)

    @deferred_notify(mail={"subject": "s", "template": "email/confirm"})
    def register(user: str, token: str) -> str:
        return "done"

    with app.app_context():
        register("kermit", "t0k")
        finalise()

    assert _text(smtp_server.messages[0]) == "kermit t0k done"


# -- Cc, Bcc, Reply-To, Sender -----------------------------------------------


def test_cc_and_reply_to_are_headers_and_bcc_is_in_the_envelope_only(
    smtp_server: SMTPServer,
) -> None:
    message = _send(
        smtp_server,
        {
            "subject": "s",
            "body": "b",
            "recipients": ["{user} <{user}@example.com>"],
            "cc": ["boss@example.com", "Audit <audit@example.com>"],
            "bcc": ["{secret}@example.com"],
            "reply_to": "Help <help+{user}@example.com>",
            "sender": "Shop <shop@example.com>",
        },
        user="kermit",
        secret="hidden",
    )

    assert [a.addr_spec for a in message["To"].addresses] == ["kermit@example.com"]
    assert [a.addr_spec for a in message["Cc"].addresses] == [
        "boss@example.com",
        "audit@example.com",
    ]
    [reply_to] = message["Reply-To"].addresses
    assert reply_to.addr_spec == "help+kermit@example.com"
    [sender] = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Shop", "shop@example.com")
    assert "Bcc" not in message
    assert b"hidden" not in smtp_server.raw[0]
    assert smtp_server.envelopes == [
        [
            "kermit@example.com",
            "boss@example.com",
            "audit@example.com",
            "hidden@example.com",
        ]
    ]


def test_bcc_adds_to_the_default_recipients_or_goes_alone_without_to(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        enqueue("mail", {"subject": "s", "body": "b", "bcc": ["a@example.com"]})
        finalise()
    # A template without 'recipients' has the channel's, and Bcc besides.
    [message] = smtp_server.messages
    assert "Bcc" not in message
    assert smtp_server.envelopes == [["admin@example.com", "a@example.com"]]

    smtp_server.messages.clear()
    smtp_server.envelopes.clear()
    app = Flask("no_default_recipients")
    app.config.update(
        TESTING=True,
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS={"mail": {"type": "mail"}},
        **smtp_server.config(),
    )
    Mail(app)
    NotifyQueue(app, session=scoped_session(sessionmaker()))
    with app.app_context():
        enqueue("mail", {"subject": "s", "body": "b", "bcc": ["a@example.com"]})
        finalise()

    [message] = smtp_server.messages
    assert "To" not in message and "Bcc" not in message
    assert smtp_server.envelopes == [["a@example.com"]]


@pytest.mark.parametrize("key", ["cc", "bcc", "reply_to", "sender"])
@pytest.mark.parametrize(
    ("value", "match"),
    [
        pytest.param("a@example.com\r\nX-Evil: 1", "CR or LF", id="line-break"),
        pytest.param("not an address", "is not an email address", id="not-address"),
    ],
)
def test_cc_bcc_reply_to_and_sender_are_checked_at_queue_time(
    smtp_server: SMTPServer, key: str, value: str, match: str
) -> None:
    app = _app(smtp_server)
    entry: t.Any = ["{v}"] if key in ("cc", "bcc") else "{v}"
    label = f"the template's '{key}'"
    if key in ("cc", "bcc"):
        label = f"entry 1 of {label}"
    with app.app_context():
        with pytest.raises(PayloadError, match=rf"^{re.escape(label)}.*{match}"):
            enqueue("mail", {"subject": "s", "body": "b", key: entry}, v=value)
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_a_non_ascii_cc_local_part_is_sent_with_smtputf8(
    smtp_server: SMTPServer,
) -> None:
    _send(smtp_server, {"subject": "s", "body": "b", "cc": ["jürgen@example.com"]})

    assert "SMTPUTF8" in smtp_server.mail_options[0]
    assert "jürgen@example.com" in smtp_server.envelopes[0]


# -- attachments -------------------------------------------------------------

PDF = bytes(range(256)) * 40 + b"\r\n\r\n.\r\n\x00end"  # every byte, CRLF, a dot


def test_attachments_arrive_byte_for_byte_with_names_and_types(
    smtp_server: SMTPServer,
) -> None:
    long_name = "Größe ✓ " * 20 + ".csv"
    files = [
        ("report.pdf", "application/pdf", PDF),
        (long_name, "text/csv", "a;b\nü;€\n"),
        ('we"ird\\name.bin', "application/octet-stream", b""),
    ]
    app = _app(smtp_server)
    with app.app_context():
        intent = enqueue(
            "mail",
            {"subject": "s", "body": "See {n} files.", "attachments": "files"},
            files=files,
            n=3,
        )
        finalise()

    [message] = smtp_server.messages
    assert _types(message) == [
        "multipart/mixed",
        "text/plain",
        "application/pdf",
        "text/csv",
        "application/octet-stream",
    ]
    body, *attached = message.iter_parts()
    assert _text(body) == "See 3 files."
    assert [part.get_filename() for part in attached] == [f[0] for f in files]
    assert [part.get_content_disposition() for part in attached] == ["attachment"] * 3
    assert [part.get_payload(decode=True) for part in attached] == [
        PDF,
        "a;b\nü;€\n".encode(),
        b"",
    ]
    assert attached[1].get_content_charset() == "utf-8"
    assert max(len(line) for line in smtp_server.raw[0].split(b"\r\n")) <= 998
    # The payload is plain JSON: bytes travel as base64.
    assert json.loads(json.dumps(intent.payload)) == intent.payload
    assert intent.payload["attachments"][0] == {
        "filename": "report.pdf",
        "content_type": "application/pdf",
        "data_base64": base64.b64encode(PDF).decode(),
    }
    assert intent.payload["attachments"][1]["charset"] == "utf-8"
    assert Intent.from_dict(json.loads(json.dumps(intent.to_dict()))) == intent


def test_attachments_with_html_are_mixed_around_the_alternative(
    smtp_server: SMTPServer,
) -> None:
    message = _send(
        smtp_server,
        {"subject": "s", "body": "t", "html": "<p>h</p>", "attachments": "files"},
        files=[("a.png", "image/png", b"\x89PNG\r\n")],
    )

    assert _types(message) == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "image/png",
    ]
    assert list(message.walk())[-1].get_payload(decode=True) == b"\x89PNG\r\n"


def test_attachments_from_a_result_attribute_of_a_decorated_call(
    smtp_server: SMTPServer,
) -> None:
    class Export:
        files = [("export.json", "application/json", b'{"a": 1}')]

    app = _app(smtp_server)

    @deferred_notify(mail={"subject": "s", "body": "b", "attachments": "result.files"})
    def export() -> Export:
        return Export()

    with app.app_context():
        export()
        finalise()

    [part] = [p for p in smtp_server.messages[0].walk() if p.get_filename()]
    assert part.get_payload(decode=True) == b'{"a": 1}'


def test_none_or_no_attachments_send_a_plain_message(smtp_server: SMTPServer) -> None:
    app = _app(smtp_server)
    with app.app_context():
        for files in (None, []):
            intent = enqueue(
                "mail", {"subject": "s", "body": "b", "attachments": "f"}, f=files
            )
            assert "attachments" not in intent.payload
        finalise()

    assert [_types(m) for m in smtp_server.messages] == [["text/plain"]] * 2


@pytest.mark.parametrize(
    ("files", "match"),
    [
        pytest.param("a.pdf", "must hold a list", id="not-a-list"),
        pytest.param([("a.pdf", "application/pdf")], "must be a .* tuple", id="pair"),
        pytest.param([("", "text/plain", b"")], "non-empty str", id="empty-name"),
        pytest.param([("a\r\nX: y", "text/plain", b"")], "CR or LF", id="crlf-name"),
        pytest.param([("a" * 256, "text/plain", b"")], "256 characters", id="long"),
        pytest.param([("a", "pdf", b"")], "is not a media type", id="no-slash"),
        pytest.param(
            [("a", "text/plain; charset=x", b"")], "without parameters", id="params"
        ),
        pytest.param([("a", "text/plain", 5)], "must be bytes or str", id="data"),
        pytest.param([("a", "text/plain", "\udc80")], "lone surrogate", id="sur"),
    ],
)
def test_a_bad_attachment_is_refused_at_queue_time(
    smtp_server: SMTPServer, files: t.Any, match: str
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        with pytest.raises(PayloadError, match=match):
            enqueue("mail", {"subject": "s", "body": "b", "attachments": "f"}, f=files)
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


def test_an_attachments_path_the_call_lacks_is_a_template_error(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        with pytest.raises(TemplateError, match=r"names 'result\.files'"):
            enqueue(
                "mail",
                {"subject": "s", "body": "b", "attachments": "result.files"},
                result=object(),
            )


# -- size limit --------------------------------------------------------------


def test_a_mail_over_max_size_fails_at_queue_time_naming_size_limit_and_option(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server, max_size=1000)
    template = {"subject": "s", "body": "{b}", "html": "{h}", "attachments": "f"}
    with app.app_context():
        # Exactly the limit: 100 + 400 (200 "é", 2 bytes each) + 500.
        fits = enqueue(
            "mail", template, b="x" * 100, h="é" * 200, f=[("a", "a/b", b"\0" * 500)]
        )
        with pytest.raises(
            PayloadError,
            match=r"is 1,001 bytes .* over the limit of 1,000 bytes set by the"
            r" 'max_size' option of channel 'mail'",
        ):
            enqueue(
                "mail",
                template,
                b="x" * 101,
                h="é" * 200,
                f=[("a", "a/b", b"\0" * 500)],
            )
        result = finalise()

    assert result.dispatched == [fits]
    [part] = [p for p in smtp_server.messages[0].walk() if p.get_filename()]
    assert part.get_payload(decode=True) == b"\0" * 500


def test_the_default_max_size_is_ten_megabytes(smtp_server: SMTPServer) -> None:
    app = _app(smtp_server)
    limit = 10 * 1024 * 1024
    template = {"subject": "s", "body": "b", "attachments": "f"}
    with app.app_context():
        enqueue("mail", template, f=[("big", "a/b", b"\0" * (limit - 1))])
        with pytest.raises(PayloadError, match="10,485,761 bytes"):
            enqueue("mail", template, f=[("big", "a/b", b"\0" * limit)])
        finalise(commit=False)


@pytest.mark.parametrize("max_size", [0, -1, 1.5, "10", True])
def test_a_bad_max_size_fails_at_init_app(max_size: t.Any) -> None:
    with pytest.raises(
        ConfigurationError, match=r"NOTIFYQUEUE_CHANNELS\['mail'\].*'max_size'"
    ):
        _app(max_size=max_size)


# -- Raw ---------------------------------------------------------------------


def test_raw_is_queued_as_it_is_never_formatted_or_escaped(
    smtp_server: SMTPServer,
) -> None:
    app = _app(smtp_server, subject_prefix="[shop] ")
    payload = {
        "subject": "Order {user.id}",
        "body": "Text {user.id} {{x}} " + NASTY,
        "html": "<p>{user.id}</p><style>p {color: red}</style>" + NASTY,
        "cc": ["cc@example.com"],
        "attachments": [("a.bin", "application/octet-stream", b"\x00\xff")],
    }
    with app.app_context():
        intent = enqueue("mail", Raw(payload), user="never used")
        finalise()

    assert intent.payload["body"] == payload["body"]
    [message] = smtp_server.messages
    assert message["Subject"] == "[shop] Order {user.id}"
    plain, html = list(message.walk())[2:4]
    assert _text(plain) == payload["body"]
    assert _text(html) == payload["html"]
    assert [a.addr_spec for a in message["Cc"].addresses] == ["cc@example.com"]
    assert list(message.walk())[-1].get_payload(decode=True) == b"\x00\xff"


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        pytest.param(
            {"subject": "a\nBcc: x@example.com", "body": "b"},
            PayloadError,
            "CR or LF",
            id="header",
        ),
        pytest.param(
            {"subject": "s", "body": "b", "recipients": ["{user.email}"]},
            PayloadError,
            "is not an email address",
            id="address",
        ),
        pytest.param(
            {"subject": "s", "body": "caf\ud800"},
            PayloadError,
            "lone surrogate",
            id="surrogate",
        ),
        pytest.param(
            {"subject": "s", "html": "x" * 101}, PayloadError, "max_size", id="size"
        ),
        pytest.param(
            {"subject": "s", "template": "email/confirm"},
            TemplateError,
            "cannot name Jinja files",
            id="jinja",
        ),
        pytest.param({"subject": "s"}, TemplateError, "none of", id="no-body"),
        pytest.param("text", TemplateError, "takes a dict", id="str"),
        pytest.param(
            {"subject": "s", "body": "b", "attachments": "files"},
            TemplateError,
            "'attachments' must be a list",
            id="attachments-path",
        ),
    ],
)
def test_raw_is_still_checked(
    smtp_server: SMTPServer, payload: t.Any, error: type[Exception], match: str
) -> None:
    app = _app(smtp_server, max_size=100)
    with app.app_context():
        with pytest.raises(error, match=match):
            enqueue("mail", Raw(payload))
        result = finalise()

    assert result.dispatched == []
    assert smtp_server.messages == []


# -- check_template ----------------------------------------------------------

GOOD_TEMPLATES = [
    {"subject": "s", "body": "b"},
    {"subject": "s", "html": "<p>{x}</p>"},
    {"subject": "s", "template": "email/confirm", "attachments": "result.files"},
    {
        "subject": "s",
        "body": "b",
        "html": "h",
        "recipients": ["{a}"],
        "cc": ["c@example.com"],
        "bcc": ("b@example.com",),
        "reply_to": "r@example.com",
        "sender": "{s}",
        "attachments": "files",
    },
]

BAD_TEMPLATES = [
    pytest.param("Saved {name}", "takes a dict template", id="not-a-dict"),
    pytest.param(
        {"subjct": "s", "body": "b"},
        r"unknown key 'subjct' \(did you mean 'subject'\?\)",
        id="typo",
    ),
    pytest.param({"subject": "s", "body": "b", "xyz": 1}, "'xyz'", id="unknown"),
    pytest.param({"body": "b"}, "no 'subject'", id="no-subject"),
    pytest.param({"subject": "s"}, "none of 'body', 'html' or 'template'", id="text"),
    pytest.param({"subject": 5, "body": "b"}, "'subject' must be a str", id="int"),
    pytest.param(
        {"subject": "s", "html": ["h"]}, "'html' must be a str", id="html-list"
    ),
    pytest.param(
        {"subject": "s", "body": "b", "reply_to": ["r@example.com"]},
        "'reply_to' must be a str",
        id="reply-to-list",
    ),
    pytest.param(
        {"subject": "s", "body": "b", "recipients": "a@example.com"},
        "'recipients' must be a non-empty list",
        id="recipients-str",
    ),
    pytest.param(
        {"subject": "s", "body": "b", "cc": []},
        "'cc' must be a non-empty list",
        id="cc-empty",
    ),
    pytest.param(
        {"subject": "s", "body": "b", "bcc": ["a@example.com", 5]},
        "'bcc' must be a non-empty list",
        id="bcc-int",
    ),
    pytest.param(
        {"subject": "s", "template": "email/x", "body": "b"},
        "keep one or the other",
        id="template-and-body",
    ),
    pytest.param(
        {"subject": "s", "template": ""}, "name of Jinja files", id="template-empty"
    ),
    pytest.param(
        {"subject": "s", "body": "b", "attachments": "result._files"},
        "'attachments' must name a parameter",
        id="attachments-private",
    ),
    pytest.param(
        {"subject": "s", "body": "b", "attachments": ["files"]},
        "'attachments' must name a parameter",
        id="attachments-list",
    ),
]


def _compiled(template: t.Any) -> t.Any:
    """The template as the decorator stores it: str values compiled."""
    if not isinstance(template, dict):
        return template
    return {
        key: value
        if key in ("template", "attachments") or not isinstance(value, (str, list))
        else compile_template(value)
        if isinstance(value, str)
        else [
            compile_template(entry) if isinstance(entry, str) else entry
            for entry in value
        ]
        for key, value in template.items()
    }


@pytest.mark.parametrize("template", GOOD_TEMPLATES)
def test_check_template_accepts_every_valid_shape(template: dict[str, t.Any]) -> None:
    channel = MailChannel("mail")
    channel.check_template(template)
    channel.check_template(_compiled(template))


@pytest.mark.parametrize(("template", "match"), BAD_TEMPLATES)
def test_check_template_refuses_a_malformed_template(
    template: t.Any, match: str
) -> None:
    channel = MailChannel("mail")
    with pytest.raises(TemplateError, match=match):
        channel.check_template(_compiled(template))
    with pytest.raises(TemplateError, match=match):
        channel.check_template(template)


@pytest.mark.parametrize(("template", "match"), BAD_TEMPLATES)
def test_render_refuses_what_check_template_refuses(
    smtp_server: SMTPServer, template: t.Any, match: str
) -> None:
    app = _app(smtp_server)
    with app.app_context():
        with pytest.raises(
            TemplateError, match=rf"^Channel 'mail' \(mail\): .*{match}"
        ):
            enqueue("mail", template, a="a@example.com", s="s@example.com", files=[])


# -- record_messages ---------------------------------------------------------


def test_record_messages_sees_html_cc_bcc_reply_to_and_attachments() -> None:
    app = _app()  # TESTING: MAIL_SUPPRESS_SEND
    mail = app.extensions["mail"]
    with app.app_context(), mail.record_messages() as outbox:
        enqueue(
            "mail",
            {
                "subject": "s",
                "body": "b",
                "html": "<p>{v}</p>",
                "cc": ["c@example.com"],
                "bcc": ["b@example.com"],
                "reply_to": "r@example.com",
                "attachments": "f",
            },
            v=NASTY,
            f=[("a.bin", "application/octet-stream", PDF)],
        )
        finalise()

    [message] = outbox
    assert message.html == f"<p>{ESCAPED}</p>"
    assert (message.cc, message.bcc, message.reply_to) == (
        ["c@example.com"],
        ["b@example.com"],
        "r@example.com",
    )
    [attachment] = message.attachments
    assert (attachment.filename, attachment.content_type, attachment.data) == (
        "a.bin",
        "application/octet-stream",
        PDF,
    )
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert "Bcc" not in parsed


# -- an unreachable server ---------------------------------------------------


def test_an_unreachable_server_names_mail_server_mail_port_and_the_fix() -> None:
    port = free_port()  # nothing listens there
    app = Flask("unreachable")
    app.config.update(
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=port,
        MAIL_SUPPRESS_SEND=False,
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS={"mail": {"type": "mail", "recipients": RECIPIENTS}},
    )
    Mail(app)
    NotifyQueue(app, session=scoped_session(sessionmaker()))
    with app.app_context():
        intents = [enqueue("mail", {"subject": "s", "body": "b"}) for _ in range(2)]
        result = finalise()

    assert [intent for intent, _ in result.failed] == intents
    for _, exc in result.failed:
        assert isinstance(exc, ConnectionRefusedError)
        message = str(exc)
        assert f"MAIL_SERVER='127.0.0.1', MAIL_PORT={port}" in message
        assert "MAIL_SUPPRESS_SEND = True" in message
        assert isinstance(exc.__cause__, ConnectionRefusedError)
        assert exc.__cause__ is not exc
        assert exc.__traceback__ is not None
