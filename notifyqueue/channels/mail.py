"""The ``mail`` channel: email through Flask-Mail, one SMTP connection per batch."""

from __future__ import annotations

import logging
import smtplib
import socket
import typing as t
from collections.abc import Mapping
from email.utils import formataddr

from flask_mail import Connection, Message

from ..errors import ConfigurationError, DeliveryError, PayloadError, TemplateError
from .base import Channel

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import Intent

logger = logging.getLogger("notifyqueue")

_TEMPLATE_KEYS = frozenset({"subject", "body", "recipients"})


class MailChannel(Channel):
    """Send each intent as an email through Flask-Mail.

    A batch shares one SMTP connection with a socket timeout. A refused
    message fails alone (refused for any one recipient counts as failed); a
    broken connection fails the message in flight and the next one
    reconnects; a server that cannot be reached fails the rest.
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
            _check_header("option 'sender'", sender)
        self.sender = sender
        if not isinstance(subject_prefix, str):
            raise ValueError(
                f"option 'subject_prefix' must be a str, got {subject_prefix!r}."
            )
        _check_header("option 'subject_prefix'", subject_prefix)
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
        _check_header("the sender", sender)
        self._sender = sender
        self._mail = app.extensions["mail"]
        # socket.getfqdn() can be a DNS query, and Flask-Mail's Message()
        # makes one per message (make_msgid), smtplib one per connection
        # (EHLO): 40 µs each on loopback, the largest cost in B2. Ask once;
        # each message is then a copy of one Message() built here, with its
        # own lists and dicts, and a Message-ID made of its intent id.
        self._domain = socket.getfqdn()
        prototype = vars(Message(sender=sender))
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
        _check_header("the subject", subject)
        if "recipients" in template:
            recipients = _checked_recipients(
                template["recipients"], "the template's 'recipients'", PayloadError
            )
        else:
            recipients = list(self.recipients)
        return {
            "subject": subject,
            "body": super().render(template["body"], context),
            "recipients": recipients,
            "sender": self._sender,
        }

    def send(self, intents: t.Sequence[Intent]) -> None:
        if self._mail is None:
            raise RuntimeError(f"Channel {self.name!r} was not initialised on an app.")
        failures: dict[str, BaseException] = {}
        connection: _Connection | None = None
        unreachable: BaseException | None = None
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
                try:
                    connection.send(self._message(intent))
                except (
                    smtplib.SMTPRecipientsRefused,
                    smtplib.SMTPSenderRefused,
                    smtplib.SMTPDataError,
                ) as exc:
                    # smtplib reset the transaction and the connection goes on,
                    # unless the server closed it (a 421 answer): then the next
                    # message reconnects instead of failing untried.
                    failures[intent.id] = exc
                    if connection.host is None or connection.host.sock is None:
                        connection = None
                except OSError as exc:
                    # Whether this one arrived is unknown; it is not retried
                    # (at most once). The next message opens a new connection.
                    failures[intent.id] = exc
                    _close(connection)
                    connection = None
        finally:
            if connection is not None:
                _close(connection)
        if failures:
            raise DeliveryError(failures)

    def _message(self, intent: Intent) -> Message:
        payload = intent.payload
        message = Message.__new__(Message)
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


def _check_header(what: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise PayloadError(
            f"{what} {value!r} contains CR or LF, which could inject mail headers;"
            " remove the line break."
        )


def _checked_recipients(
    value: t.Any, what: str, error: type[ValueError] = ValueError
) -> list[str]:
    if (
        isinstance(value, str)
        or not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise error(f"{what} must be a non-empty list of addresses, got {value!r}.")
    for item in value:
        if "\r" in item or "\n" in item:
            raise error(f"{what}: address {item!r} contains CR or LF.")
    return list(value)
