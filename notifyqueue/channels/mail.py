"""The ``mail`` channel: email through Flask-Mail, one SMTP connection per batch."""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import time
import typing as t
from collections.abc import Mapping
from email import charset as _charset
from email import policy
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import formataddr, formatdate

from flask import current_app
from flask_mail import Connection, Message, email_dispatched

from ..errors import ConfigurationError, DeliveryError, PayloadError, TemplateError
from .base import Channel
from .mail_headers import (
    address_of,
    check_address,
    check_encodable,
    check_header,
    format_address,
    format_subject,
)

if t.TYPE_CHECKING:
    from email.mime.base import MIMEBase

    from flask import Flask

    from ..intent import Intent

logger = logging.getLogger("notifyqueue")

_TEMPLATE_KEYS = frozenset({"subject", "body", "recipients"})


class MailChannel(Channel):
    """Send each intent as an email through Flask-Mail.

    A batch shares one SMTP connection with a socket timeout. Whatever goes
    wrong with one message fails that message alone: a refused message (refused
    for any one recipient counts as failed), one that cannot be built, or one
    whose address needs SMTPUTF8 from a server without it. A broken connection
    fails the message in flight and the next one reconnects; a server that
    cannot be reached fails the rest.
    Each message carries an ``X-Notifyqueue-Intent`` header with the intent id.

    :param recipients: the default recipients, a non-empty list of addresses.
    :param sender: the From address; default ``MAIL_DEFAULT_SENDER``.
    :param subject_prefix: put before every rendered subject.
    :param timeout: the SMTP socket timeout, in seconds.
    """

    test_template: t.ClassVar[t.Any] = {
        "subject": "notifyqueue test",
        "body": "Test notification from notifyqueue (app {app}).",
    }

    def __init__(
        self,
        name: str,
        *,
        recipients: list[str],
        sender: str | None = None,
        subject_prefix: str = "",
        timeout: float = 10,
    ) -> None:
        super().__init__(name)
        self.recipients = _checked_recipients(recipients, "option 'recipients'")
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
        prototype = vars(_Message(sender=sender))
        self._prototype = prototype
        self._containers = tuple(
            key for key, value in prototype.items() if isinstance(value, (list, dict))
        )

    def render(
        self, template: t.Any, context: t.Mapping[str, t.Any]
    ) -> dict[str, t.Any]:
        # collections.abc, not typing: typing's alias makes isinstance 3x slower.
        if not isinstance(template, Mapping):
            raise TemplateError(
                f"Channel {self.name!r} (mail) takes a dict template with 'subject'"
                f" and 'body', got {type(template).__name__} {template!r}."
            )
        if (
            "subject" not in template
            or "body" not in template
            or not _TEMPLATE_KEYS.issuperset(template)
        ):
            unknown = set(template) - _TEMPLATE_KEYS
            missing = {"subject", "body"} - set(template)
            raise TemplateError(
                f"Channel {self.name!r} (mail): the template needs 'subject' and"
                " 'body', and may have 'recipients';"
                f" missing {sorted(missing)}, unknown {sorted(unknown)}."
            )
        subject = self.subject_prefix + super().render(template["subject"], context)
        check_header("the subject", subject)
        body = super().render(template["body"], context)
        # isascii() is O(1) in CPython: the common body skips the scan.
        if not body.isascii():
            check_encodable("the body", body)
        if "recipients" in template:
            recipients = self._render_recipients(template["recipients"], context)
        else:
            recipients = list(self.recipients)
        return {
            "subject": subject,
            "body": body,
            "recipients": recipients,
            "sender": self._sender,
        }

    def _render_recipients(
        self, templates: t.Any, context: t.Mapping[str, t.Any]
    ) -> list[str]:
        """Render each entry of a template's ``recipients`` and check the address."""
        what = "the template's 'recipients'"
        recipients = []
        for number, entry in enumerate(_string_list(templates, what, PayloadError), 1):
            address = super().render(entry, context)
            check_address(f"entry {number} of {what}", address)
            recipients.append(address)
        return recipients

    def send(self, intents: t.Sequence[Intent]) -> None:
        if self._mail is None:
            raise RuntimeError(f"Channel {self.name!r} was not initialised on an app.")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        max_emails = self._mail.max_emails
        failures: dict[str, BaseException] = {}
        connection: _Connection | None = None
        unreachable: BaseException | None = None
        sent = 0
        try:
            for intent in intents:
                if unreachable is not None:
                    failures[intent.id] = unreachable
                    continue
                if connection is None:
                    try:
                        connection = _Connection(
                            self._mail, self.timeout, self._domain
                        ).__enter__()
                    except OSError as exc:  # smtplib's errors are OSErrors too
                        unreachable = failures[intent.id] = exc
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
                    # Whether this one arrived is unknown; it is not retried
                    # (at most once). The next message opens a new connection.
                    failures[intent.id] = exc
                    _close(connection)
                    connection = None
                    continue
                except Exception as exc:
                    # The message could not be built, or smtplib met something
                    # it does not handle: this message alone fails. It may have
                    # left an SMTP transaction half open, so reset that.
                    failures[intent.id] = exc
                    if not _reset(connection):
                        connection = None
                    continue
                sent += 1
                if sent == max_emails:
                    # MAIL_MAX_EMAILS: the next message opens a new connection.
                    _close(connection)
                    connection = None
        finally:
            if connection is not None:
                _close(connection)
        if failures:
            raise DeliveryError(failures)

    def _deliver(self, app: Flask, connection: _Connection, intent: Intent) -> None:
        """Build and send one message, then send Flask-Mail's ``email_dispatched``.

        Flask-Mail's ``Connection.send`` in steps, so that an exception is
        attributed to the step that raised it.
        """
        message = self._message(intent)
        message.date = time.time()
        host = connection.host
        if host is not None:
            sender = address_of(message.sender)
            recipients = [address_of(item) for item in message.recipients]
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

    def _message(self, intent: Intent) -> _Message:
        payload = intent.payload
        message = _Message.__new__(_Message)
        fields = vars(message)
        fields.update(self._prototype)
        for key in self._containers:
            fields[key] = fields[key].copy()
        message.subject = payload["subject"]
        message.recipients = list(payload["recipients"])
        message.body = payload["body"]
        message.sender = payload["sender"]
        message.extra_headers = {"X-Notifyqueue-Intent": intent.id}
        message.msgId = f"<{intent.id}@{self._domain}>"
        return message


def _send_dispatched(app: Flask, message: _Message, intent: Intent) -> None:
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


# Bodies keep the form Flask-Mail gives them (its "utf-8" charset: 7bit or
# 8bit, unwrapped) unless a line is longer than the 998 octets SMTP allows
# (RFC 5321 4.5.3.1.6); then quoted-printable, which carries every line whole
# and keeps the text readable.
_QUOTED_PRINTABLE = _charset.Charset("utf-8")
_QUOTED_PRINTABLE.body_encoding = _charset.QP
_LONG_LINE = re.compile(rb"[^\r\n]{999}")
_UNFOLDED = policy.SMTP.clone(max_line_length=None)
_UNFOLDED_UTF8 = policy.SMTPUTF8.clone(max_line_length=None)


class _Message(Message):
    """Flask-Mail's message as the mail channel sends it: plain text only.

    Built like Flask-Mail's, ASCII header strings (RFC 2047 for non-ASCII
    names and subjects) written out by the ``SMTP`` policy, except: headers
    are folded here and never refolded (see :func:`format_address`); a
    message to or from an address with a non-ASCII local part is written as
    UTF-8 (RFC 6532; it needs SMTPUTF8, and Flask-Mail's ``formataddr``
    cannot write it at all); and a body with a line over 998 octets is
    quoted-printable.
    """

    def _message(self) -> MIMEBase:
        sender = address_of(self.sender)
        recipients = [address_of(item) for item in dict.fromkeys(self.recipients)]
        utf8 = not sender.username.isascii() or any(
            not item.username.isascii() for item in recipients
        )
        mime = MIMENonMultipart("text", "plain", charset="utf-8")
        body = self.body or ""
        # A line of 998 octets has at least 250 characters (4 octets at most each).
        long_lines = len(body) >= 250 and _LONG_LINE.search(body.encode()) is not None
        mime.set_payload(body, _QUOTED_PRINTABLE if long_lines else "utf-8")
        if self.subject:
            mime["Subject"] = format_subject(self.subject)
        mime["From"] = format_address(sender)
        mime["To"] = ",\n ".join(map(format_address, recipients))
        mime["Date"] = formatdate(self.date, localtime=True)
        mime["Message-ID"] = self.msgId
        for name, value in (self.extra_headers or {}).items():
            mime[name] = value
        mime.policy = _UNFOLDED_UTF8 if utf8 else _UNFOLDED
        return mime


class _RefusalsRaise:
    """``sendmail`` raises when some recipients were refused, not only all.

    smtplib returns partial refusals, and Flask-Mail drops the return value:
    without this a message that missed a recipient would count as delivered.
    """

    def sendmail(self, *args: t.Any, **kwargs: t.Any) -> dict[str, tuple[int, bytes]]:
        refused: dict[str, tuple[int, bytes]] = super().sendmail(  # type: ignore[misc]
            *args, **kwargs
        )
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)
        return refused


class _SMTP(_RefusalsRaise, smtplib.SMTP):
    pass


class _SMTP_SSL(_RefusalsRaise, smtplib.SMTP_SSL):
    pass


class _Connection(Connection):
    """Flask-Mail's connection, with a socket timeout (it has none by default)."""

    def __init__(self, mail: t.Any, timeout: float, local_hostname: str) -> None:
        super().__init__(mail)
        self.timeout = timeout
        self.local_hostname = local_hostname

    def configure_host(self) -> smtplib.SMTP:
        mail = self.mail
        host: smtplib.SMTP
        if mail.use_ssl:
            host = _SMTP_SSL(
                mail.server,
                mail.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
            )
        else:
            host = _SMTP(
                mail.server,
                mail.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
            )
        host.set_debuglevel(int(mail.debug))
        if mail.use_tls:
            host.starttls()
        if mail.username and mail.password:
            host.login(mail.username, mail.password)
        return host


def _close(connection: _Connection) -> None:
    host = connection.host
    if host is None:
        return
    try:
        host.quit()
    except OSError as exc:
        # Every message was already accepted or reported; only the goodbye failed.
        logger.debug("SMTP QUIT failed: %r", exc)
        host.close()


def _reset(connection: _Connection) -> bool:
    """RSET the connection; close it and return False if that fails."""
    host = connection.host
    if host is None:
        return True
    try:
        code, _ = host.rset()
    except OSError as exc:
        logger.debug("SMTP RSET failed: %r", exc)
        host.close()
        return False
    if code != 250:
        _close(connection)
        return False
    return True


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
