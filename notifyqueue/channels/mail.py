"""The ``mail`` channel: email through Flask-Mail, one SMTP connection per batch."""

from __future__ import annotations

import base64
import difflib
import functools
import logging
import smtplib
import socket
import time
import typing as t
from collections.abc import Mapping
from email.utils import formataddr

import jinja2
from flask import current_app, render_template
from flask_mail import email_dispatched

from ..errors import (
    ConfigurationError,
    DeliveryError,
    PayloadError,
    TemplateError,
    mark_failure,
    marked_failure,
)
from ..templates import Raw, Template, compile_template, is_field_path
from .base import Channel
from .mail_headers import (
    address_of,
    check_address,
    check_content_type,
    check_encodable,
    check_header,
)
from .mail_message import MailAttachment, MailMessage
from .mail_smtp import (
    SMTPConnection,
    close,
    data_was_sent,
    failure_kind,
    reset,
    unreachable_error,
)

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import Intent

logger = logging.getLogger("notifyqueue")

_TEXT_KEYS = ("body", "html", "template")
_LIST_KEYS = ("recipients", "cc", "bcc")
_STR_KEYS = ("subject", "body", "html", "reply_to", "sender")
_TEMPLATE_KEYS = frozenset(
    {"subject", *_TEXT_KEYS, *_LIST_KEYS, "reply_to", "sender", "attachments"}
)
# A parameter, then attributes (or keys) of it: "files", "result.files". No
# attribute may start with "_", as in templates.
_MAX_FILENAME = 255  # what file systems take; longer names are a mistake


class MailChannel(Channel):
    """Send each intent as an email through Flask-Mail.

    A batch shares one SMTP connection with a socket timeout. Whatever goes
    wrong with one message fails that message alone: a refused message (refused
    for any one recipient counts as failed), one that cannot be built, or one
    whose address needs SMTPUTF8 from a server without it. A broken connection
    fails the message in flight and the next one reconnects; a server that
    cannot be reached fails the rest, naming ``MAIL_SERVER`` and ``MAIL_PORT``.
    Each message carries an ``X-Notifyqueue-Intent`` header with the intent id.

    A template is a dict: ``subject``; ``body`` (text), ``html`` or both, or
    ``template`` (Jinja files ``NAME.txt`` and ``NAME.html``); optionally
    ``recipients``, ``cc``, ``bcc`` (lists of address templates), ``reply_to``,
    ``sender`` (address templates) and ``attachments`` (the name of a
    parameter, or ``result.attr``, holding ``(filename, content_type, data)``
    tuples). :class:`~notifyqueue.Raw` queues such a dict of final text, with
    ``attachments`` the list itself.

    :param recipients: the default recipients, a non-empty list of addresses,
        for templates without ``recipients``.
    :param sender: the From address; default ``MAIL_DEFAULT_SENDER``.
    :param subject_prefix: put before every subject.
    :param timeout: the SMTP socket timeout, in seconds.
    :param max_size: the largest message, in bytes of body, HTML and
        attachment data before encoding; a larger one fails at queue time.
    """

    test_template: t.ClassVar[t.Any] = {
        "subject": "notifyqueue test",
        "body": "Test notification from notifyqueue (app {app}).",
    }

    def __init__(
        self,
        name: str,
        *,
        recipients: list[str] | None = None,
        sender: str | None = None,
        subject_prefix: str = "",
        timeout: float = 10,
        max_size: int = 10 * 1024 * 1024,
    ) -> None:
        super().__init__(name)
        self.recipients = (
            None
            if recipients is None
            else _checked_recipients(recipients, "option 'recipients'")
        )
        if sender is not None:
            check_address("option 'sender'", sender)
        self.sender = sender
        if not isinstance(subject_prefix, str):
            raise ValueError(
                f"option 'subject_prefix' must be a str, got {subject_prefix!r}."
            )
        check_header("option 'subject_prefix'", subject_prefix)
        self.subject_prefix = subject_prefix
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not timeout > 0
        ):
            raise ValueError(
                "option 'timeout' must be a positive number of seconds,"
                f" got {timeout!r}."
            )
        self.timeout = float(timeout)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(
                "option 'max_size' must be a positive whole number of bytes,"
                f" got {max_size!r}."
            )
        self.max_size = max_size
        self._sender: str | None = None
        self._mail: t.Any = None
        self._domain = ""
        self._prototype: dict[str, t.Any] = {}
        self._containers: tuple[str, ...] = ()

    def init_app(self, app: Flask) -> None:
        if "mail" not in app.extensions:
            raise ConfigurationError(
                "the mail channel needs Flask-Mail, which is not initialised on"
                " this app: call Mail(app) or mail.init_app(app) before"
                " NotifyQueue.init_app(app)."
            )
        sender = self.sender or app.config.get("MAIL_DEFAULT_SENDER")
        if isinstance(sender, tuple):
            sender = formataddr(sender)
        if not sender:
            raise ConfigurationError(
                "the mail channel has no sender: set its 'sender' option or"
                " MAIL_DEFAULT_SENDER."
            )
        check_address("the sender", sender)
        self._sender = sender
        self._mail = app.extensions["mail"]
        # socket.getfqdn() can be a DNS query, and Flask-Mail's Message()
        # makes one per message (make_msgid), smtplib one per connection
        # (EHLO): 40 µs each on loopback, the largest cost in B2. Ask once;
        # each message is then a copy of one Message() built here, with its
        # own lists and dicts, and a Message-ID made of its intent id.
        self._domain = socket.getfqdn()
        prototype = vars(MailMessage(sender=sender))
        self._prototype = prototype
        self._containers = tuple(
            key for key, value in prototype.items() if isinstance(value, (list, dict))
        )

    def check_template(self, template: t.Any) -> None:
        """Check a mail template's keys and the types of its values.

        :raises TemplateError: naming the problem (an unknown key with the
            closest known one, a missing ``subject`` or text, a wrong type).
        """
        problem = _shape_problem(template, raw=False)
        if problem is not None:
            raise TemplateError(problem)

    def render(
        self, template: t.Any, context: t.Mapping[str, t.Any]
    ) -> dict[str, t.Any]:
        raw = isinstance(template, Raw)
        if raw:
            template = template.value
        problem = _shape_problem(template, raw)
        if problem is not None:
            raise TemplateError(f"Channel {self.name!r} (mail): {problem}")
        return self._render_checked(template, context, raw)

    def _renderer(self, template: t.Any) -> t.Callable[[t.Mapping[str, t.Any]], t.Any]:
        # A decorated function's template, whose shape check_template()
        # accepted when this app met the function: render() without checking
        # it again at every call.
        if (
            type(self).render is MailChannel.render
            and type(self).check_template is MailChannel.check_template
            and isinstance(template, Mapping)
        ):
            return functools.partial(self._render_checked, template, raw=False)
        return super()._renderer(template)

    def _render_checked(
        self, template: t.Mapping[str, t.Any], context: t.Mapping[str, t.Any], raw: bool
    ) -> dict[str, t.Any]:
        """:meth:`render` of a template (or a Raw payload's value) whose shape
        :func:`_shape_problem` accepted."""
        where = "the Raw payload's" if raw else "the template's"

        def text(value: t.Any) -> str:
            return value if raw else Channel.render(self, value, context)  # type: ignore[no-any-return]

        subject = self.subject_prefix + text(template["subject"])
        check_header("the subject", subject)
        payload: dict[str, t.Any] = {"subject": subject}
        body: str | None = None
        html: str | None = None
        if "template" in template:
            body, html = _render_files(str(template["template"]), context)
        else:
            if "body" in template:
                body = text(template["body"])
            if "html" in template:
                html = (
                    template["html"] if raw else _render_html(template["html"], context)
                )
        size = 0
        if body is not None:
            size += _encoded_size("the body", body)
            payload["body"] = body
        if html is not None:
            size += _encoded_size("the HTML part", html)
            payload["html"] = html
        if "recipients" in template:
            recipients = self._addresses(
                template["recipients"], where, "recipients", text
            )
        else:
            recipients = list(self.recipients or ())
        payload["recipients"] = recipients
        anyone = bool(recipients)
        for key in ("cc", "bcc"):
            if key in template:
                payload[key] = self._addresses(template[key], where, key, text)
                anyone = True
        if not anyone:
            raise PayloadError(
                f"The mail {subject!r} has no recipient: the template has no"
                " 'recipients', 'cc' or 'bcc', and channel"
                f" {self.name!r} no 'recipients' option; give it one of them."
            )
        if "reply_to" in template:
            reply_to = text(template["reply_to"])
            check_address(f"{where} 'reply_to'", reply_to)
            payload["reply_to"] = reply_to
        if "sender" in template:
            sender = text(template["sender"])
            check_address(f"{where} 'sender'", sender)
            payload["sender"] = sender
        else:
            payload["sender"] = self._sender
        if "attachments" in template:
            files = (
                template["attachments"]
                if raw
                else _lookup(template["attachments"], context)
            )
            attachments, data_size = _attachments(files, where)
            size += data_size
            if attachments:
                payload["attachments"] = attachments
        if size > self.max_size:
            raise PayloadError(
                f"The mail {subject!r} is {size:,} bytes (body, HTML and"
                f" attachment data), over the limit of {self.max_size:,} bytes"
                f" set by the 'max_size' option of channel {self.name!r}; send"
                " less (a link instead of a large file), or raise 'max_size'"
                " in NOTIFYQUEUE_CHANNELS if your server takes more."
            )
        return payload

    def _addresses(
        self,
        templates: list[t.Any],
        where: str,
        key: str,
        text: t.Callable[[t.Any], str],
    ) -> list[str]:
        """Render each entry of ``recipients``, ``cc`` or ``bcc``; check the address."""
        addresses = []
        for number, entry in enumerate(templates, 1):
            address = text(entry)
            check_address(f"entry {number} of {where} {key!r}", address)
            addresses.append(address)
        return addresses

    def send(self, intents: t.Sequence[Intent]) -> None:
        if self._mail is None:
            raise RuntimeError(f"Channel {self.name!r} was not initialised on an app.")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        max_emails = self._mail.max_emails
        failures: dict[str, BaseException] = {}
        connection: SMTPConnection | None = None
        unreachable: BaseException | None = None
        sent = 0
        try:
            for intent in intents:
                if unreachable is not None:
                    failures[intent.id] = unreachable
                    continue
                if connection is None:
                    try:
                        connection = SMTPConnection(
                            self._mail, self.timeout, self._domain
                        ).__enter__()
                    except OSError as exc:  # smtplib's errors are OSErrors too
                        # About the server or its settings, not the message:
                        # retried (a durable channel), whatever the code.
                        unreachable = failures[intent.id] = mark_failure(
                            unreachable_error(exc, self._mail), "transient"
                        )
                        continue
                    sent = 0
                try:
                    self._deliver(app, connection, intent)
                except (
                    smtplib.SMTPRecipientsRefused,
                    smtplib.SMTPSenderRefused,
                    smtplib.SMTPDataError,
                    smtplib.SMTPNotSupportedError,
                ) as exc:
                    # smtplib reset the transaction (or never began it) and the
                    # connection goes on, unless the server closed it (a 421
                    # answer): then the next message reconnects instead of
                    # failing untried.
                    failures[intent.id] = exc
                    if connection.host is None or connection.host.sock is None:
                        connection = None
                    continue
                except OSError as exc:
                    # Lost before the data went out in full: it did not
                    # arrive. After: whether it arrived is unknown, and the
                    # outbox does not retry it. Either way the next message
                    # opens a new connection.
                    if data_was_sent(connection):
                        mark_failure(exc, "uncertain")
                    failures[intent.id] = exc
                    close(connection)
                    connection = None
                    continue
                except Exception as exc:
                    # The message could not be built, or smtplib met something
                    # it does not handle: this message alone fails. It may have
                    # left an SMTP transaction half open, so reset that. A
                    # retry would meet the same problem.
                    failures[intent.id] = mark_failure(exc, "permanent")
                    if not reset(connection):
                        connection = None
                    continue
                sent += 1
                if sent == max_emails:
                    # MAIL_MAX_EMAILS: the next message opens a new connection.
                    close(connection)
                    connection = None
        except BaseException as exc:
            if not isinstance(exc, Exception) and connection is not None:
                # KeyboardInterrupt, or a stopping drainer past its grace
                # period: drop the socket rather than wait for QUIT's answer.
                if connection.host is not None:
                    connection.host.close()
                connection = None
            raise
        finally:
            if connection is not None:
                close(connection)
        if failures:
            raise DeliveryError(failures)

    def failure_kind(self, exc: BaseException) -> str:
        """SMTP 5xx permanent; 4xx and a connection lost before the message data
        went out transient; lost after it, uncertain (it may have arrived)."""
        return marked_failure(exc) or failure_kind(exc)

    def _deliver(self, app: Flask, connection: SMTPConnection, intent: Intent) -> None:
        """Build and send one message, then send Flask-Mail's ``email_dispatched``.

        Flask-Mail's ``Connection.send`` in steps, so that an exception is
        attributed to the step that raised it.
        """
        host = connection.host
        if host is None and not email_dispatched.receivers:
            # Suppressed (MAIL_SUPPRESS_SEND, as in testing) and nobody
            # records messages: no one would see the Message built.
            return
        message = self._message(intent)
        message.date = time.time()
        if host is not None:
            sender = address_of(message.sender)
            # Bcc addresses go in the envelope only, never in a header.
            recipients = [
                address_of(item)
                for item in (*message.recipients, *message.cc, *message.bcc)
            ]
            utf8 = not sender.username.isascii() or any(
                not item.username.isascii() for item in recipients
            )
            options = []
            if utf8:
                host.ehlo_or_helo_if_needed()
                if not host.has_extn("smtputf8"):
                    needing = next(
                        item.addr_spec
                        for item in (sender, *recipients)
                        if not item.username.isascii()
                    )
                    raise smtplib.SMTPNotSupportedError(
                        f"The address {needing!r} has a non-ASCII local part,"
                        " which needs the SMTPUTF8 extension, and the SMTP"
                        f" server {self._mail.server}:{self._mail.port} does not"
                        " offer SMTPUTF8; enable it on the server or use an"
                        " ASCII address."
                    )
                options.append("SMTPUTF8")
            host.sendmail(
                sender.addr_spec,
                list(dict.fromkeys(item.addr_spec for item in recipients)),
                message.as_bytes(),
                options,
            )
        if email_dispatched.receivers:
            _send_dispatched(app, message, intent)

    def _message(self, intent: Intent) -> MailMessage:
        payload = intent.payload
        message = MailMessage.__new__(MailMessage)
        fields = vars(message)
        fields.update(self._prototype)
        for key in self._containers:
            fields[key] = fields[key].copy()
        message.subject = payload["subject"]
        message.recipients = list(payload["recipients"])
        message.body = payload.get("body")
        if "html" in payload:
            message.html = payload["html"]
        message.cc = list(payload.get("cc", ()))
        message.bcc = list(payload.get("bcc", ()))
        message.reply_to = payload.get("reply_to")
        message.sender = payload["sender"]
        message.attachments = [
            MailAttachment(
                entry["filename"],
                entry["content_type"],
                base64.b64decode(entry["data_base64"], validate=True),
                charset=entry.get("charset"),
            )
            for entry in payload.get("attachments", ())
        ]
        message.extra_headers = {"X-Notifyqueue-Intent": intent.id}
        message.msgId = f"<{intent.id}@{_id_domain(message.sender, self._domain)}>"
        return message


@functools.lru_cache(maxsize=64)
def _id_domain(sender: str, fallback: str) -> str:
    """The Message-ID's domain: the sender's, the same wherever it is resent from
    (a drainer on another host); this host's name if that is not ASCII."""
    domain = address_of(sender).domain
    return domain if domain and domain.isascii() else fallback


def _shape_problem(template: t.Any, raw: bool) -> str | None:
    """What is wrong with a mail template's shape, or None.

    The one check of :meth:`MailChannel.check_template` and of ``render``, so
    that a template accepted at start-up is never refused at its call for its
    shape. ``raw``: a :class:`~notifyqueue.Raw` payload, whose ``attachments``
    is the list itself and which cannot name Jinja files.
    """
    # collections.abc, not typing: typing's alias makes isinstance 3x slower.
    if not isinstance(template, Mapping):
        return (
            "takes a dict template with 'subject' and 'body', 'html' or"
            f" 'template', got {type(template).__name__} {template!r}."
        )
    if not _TEMPLATE_KEYS.issuperset(template):
        unknown = sorted(map(str, set(template) - _TEMPLATE_KEYS))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, _TEMPLATE_KEYS, n=1)
            hints.append(
                f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        return (
            f"unknown key {', '.join(hints)} in the template; a mail template"
            f" takes {', '.join(map(repr, sorted(_TEMPLATE_KEYS)))}."
        )
    if "subject" not in template:
        return f"the template has no 'subject': add one. Template: {template!r}."
    if not ("body" in template or "html" in template or "template" in template):
        return (
            "the template has none of 'body', 'html' or 'template': add a text"
            " body, an HTML body, or both, or the name of Jinja files."
            f" Template: {template!r}."
        )
    for key in _STR_KEYS:
        if key in template and not isinstance(template[key], str):
            value = template[key]
            return (
                f"the template's {key!r} must be a str template, got"
                f" {type(value).__name__} {value!r}."
            )
    for key in _LIST_KEYS:
        value = template.get(key)
        if value is not None or key in template:
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(item, str) and item for item in value)
            ):
                return (
                    f"the template's {key!r} must be a non-empty list of address"
                    f" templates (non-empty strings), got {value!r}; leave the key"
                    " out for none."
                )
    if "template" in template:
        name = template["template"]
        if raw:
            return (
                "a Raw payload holds final text and cannot name Jinja files"
                f" ('template': {name!r}); render them first, or leave out Raw."
            )
        if not isinstance(name, str) or not name:
            return (
                "the template's 'template' must be the name of Jinja files"
                f" without extension ('email/confirm'), got {name!r}."
            )
        if "body" in template or "html" in template:
            return (
                "the template has 'template' and also 'body' or 'html': the"
                f" files {name}.txt and {name}.html are the body and the HTML"
                " part; keep one or the other."
            )
    if "attachments" in template:
        files = template["attachments"]
        if raw:
            if files is not None and not isinstance(files, (list, tuple)):
                return (
                    "the Raw payload's 'attachments' must be a list of"
                    f" (filename, content_type, data) tuples, got {files!r}."
                )
        elif not is_field_path(files):
            return (
                "the template's 'attachments' must name a parameter, or an"
                " attribute of one or of the result ('files', 'result.files'),"
                f" holding (filename, content_type, data) tuples; got {files!r}."
                " Attributes that start with '_' are refused."
            )
    return None


def _render_html(value: str, context: t.Mapping[str, t.Any]) -> str:
    template = value if isinstance(value, Template) else compile_template(value)
    return template.render_html(context)


def _render_files(
    name: str, context: t.Mapping[str, t.Any]
) -> tuple[str | None, str | None]:
    """Render ``NAME.txt`` and ``NAME.html`` with Flask's ``render_template``.

    Either may be missing, not both. Jinja autoescapes the ``.html`` file
    (Flask's default) and not the ``.txt``.
    """
    rendered: list[str | None] = []
    names = (f"{name}.txt", f"{name}.html")
    for filename in names:
        try:
            rendered.append(render_template(filename, **context))
        except jinja2.TemplateNotFound as exc:
            if exc.name != filename:  # a file it includes or extends is missing
                raise TemplateError(
                    f"Cannot render the mail template {filename!r}: it uses"
                    f" {exc.name!r}, which was not found."
                ) from exc
            rendered.append(None)
        except jinja2.TemplateError as exc:
            raise TemplateError(
                f"Cannot render the mail template {filename!r}:"
                f" {type(exc).__name__}: {exc}."
            ) from exc
    if rendered[0] is None and rendered[1] is None:
        raise TemplateError(
            f"The mail template 'template': {name!r} needs {names[0]!r} or"
            f" {names[1]!r} (or both) in the app's template folders, and"
            " neither was found."
        )
    return rendered[0], rendered[1]


def _lookup(path: str, context: t.Mapping[str, t.Any]) -> t.Any:
    """The value ``path`` (``"files"``, ``"result.files"``) names in ``context``."""
    first, *attributes = path.split(".")
    try:
        value = context[first]
        for attribute in attributes:
            if isinstance(value, Mapping):
                value = value[attribute]
            else:
                value = getattr(value, attribute)
    except (KeyError, AttributeError) as exc:
        raise TemplateError(
            f"The template's 'attachments' names {path!r}, which the call does"
            f" not have ({type(exc).__name__}: {exc}); name a parameter of the"
            " function, or 'result.<attribute>'."
        ) from exc
    return value


def _attachments(files: t.Any, where: str) -> tuple[list[dict[str, str]], int]:
    """Check attachments and make them JSON: the entries and their data's size.

    Data travels base64-encoded (``data_base64``); ``str`` data as its UTF-8
    bytes, the entry then saying ``"charset": "utf-8"``.
    """
    if files is None:
        return [], 0
    what = f"{where} 'attachments'"
    if isinstance(files, (str, bytes)) or not isinstance(files, (list, tuple)):
        raise PayloadError(
            f"{what} must hold a list of (filename, content_type, data) tuples,"
            f" got {type(files).__name__} {files!r:.200}."
        )
    entries = []
    size = 0
    for number, item in enumerate(files, 1):
        label = f"attachment {number} of {what}"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise PayloadError(
                f"{label} must be a (filename, content_type, data) tuple,"
                f" got {item!r:.200}."
            )
        filename, content_type, data = item
        if not isinstance(filename, str) or not filename.strip():
            raise PayloadError(
                f"the filename of {label} must be a non-empty str, got {filename!r}."
            )
        check_header(f"the filename of {label}", filename)
        if len(filename) > _MAX_FILENAME:
            raise PayloadError(
                f"the filename of {label} is {len(filename)} characters long;"
                f" at most {_MAX_FILENAME} are taken: shorten it."
            )
        if not isinstance(content_type, str):
            raise PayloadError(
                f"the content type of {label} must be a str, got {content_type!r}."
            )
        check_content_type(f"the content type of {label}", content_type)
        entry = {"filename": filename, "content_type": content_type}
        if isinstance(data, str):
            check_encodable(f"the data of {label}", data)
            data = data.encode()
            entry["charset"] = "utf-8"
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            raise PayloadError(
                f"the data of {label} ({filename!r}) must be bytes or str, got"
                f" {type(data).__name__}."
            )
        entry["data_base64"] = base64.b64encode(data).decode("ascii")
        size += len(data)
        entries.append(entry)
    return entries, size


def _encoded_size(what: str, text: str) -> int:
    """The UTF-8 size of ``text``, refusing a lone surrogate (it cannot be sent)."""
    # isascii() is O(1) in CPython: the common text skips the scan.
    if text.isascii():
        return len(text)
    check_encodable(what, text)
    return len(text.encode())


def _send_dispatched(app: Flask, message: MailMessage, intent: Intent) -> None:
    """Send ``email_dispatched`` so that a receiver that raises stops no other.

    The server has already accepted the message, so it counts as delivered;
    the receiver's exception is logged, not reported as a failed notification.
    """
    for receiver in list(email_dispatched.receivers_for(app)):
        try:
            receiver(app, message=message)
        except Exception:
            logger.exception(
                "Receiver %r of Flask-Mail's email_dispatched raised for"
                " notification %s, which was delivered; the other receivers"
                " still ran.",
                receiver,
                intent.id,
            )


def _string_list(value: t.Any, what: str, error: type[ValueError]) -> list[str]:
    """``value`` as a list, if it is a non-empty list of non-empty strings."""
    if (
        isinstance(value, str)
        or not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise error(f"{what} must be a non-empty list of addresses, got {value!r}.")
    return list(value)


def _checked_recipients(value: t.Any, what: str) -> list[str]:
    recipients = _string_list(value, what, ValueError)
    for number, item in enumerate(recipients, 1):
        check_address(f"entry {number} of {what}", item)
    return recipients
