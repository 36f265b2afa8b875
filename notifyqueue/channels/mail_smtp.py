"""The mail channel's SMTP connection: Flask-Mail's, with a timeout and clear errors."""

from __future__ import annotations

import logging
import smtplib
import typing as t

from flask_mail import Connection

from ..errors import mark_failure

logger = logging.getLogger("notifyqueue")


def unreachable_error(exc: OSError, mail: t.Any) -> OSError:
    """``exc`` restated to name the server settings and the fix, chained to it.

    The same type as ``exc`` where it can be made (``ConnectionRefusedError``
    stays one), so that callers catching it by type still do.
    """
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        message = (
            f"The SMTP server MAIL_SERVER={mail.server!r}, MAIL_PORT={mail.port!r}"
            f" refused the login of MAIL_USERNAME={mail.username!r}"
            f" ({exc.smtp_code} {exc.smtp_error!r}). Check MAIL_USERNAME and"
            " MAIL_PASSWORD."
        )
    else:
        message = (
            f"Cannot reach the SMTP server MAIL_SERVER={mail.server!r},"
            f" MAIL_PORT={mail.port!r} ({type(exc).__name__}: {exc}). Check that a"
            " server listens there (and MAIL_USE_TLS, MAIL_USE_SSL,"
            " MAIL_USERNAME); in development, set MAIL_SUPPRESS_SEND = True to"
            " send nothing."
        )
    restated: OSError
    try:
        if isinstance(exc, smtplib.SMTPResponseException):
            restated = type(exc)(exc.smtp_code, message)
        elif exc.errno is not None and not isinstance(exc, smtplib.SMTPException):
            restated = type(exc)(exc.errno, message)
        else:
            restated = type(exc)(message)
    except TypeError:  # a subclass with a constructor of its own
        restated = OSError(message)
    try:
        raise restated from exc
    except OSError as raised:  # raised, so that it carries a traceback
        return raised


class _RefusalsRaise:
    """``sendmail`` raises when some recipients were refused, not only all.

    smtplib returns partial refusals, and Flask-Mail drops the return value:
    without this a message that missed a recipient would count as delivered.
    Such a refusal is permanent for the outbox's retries: the recipients who
    were not refused have the message.

    It also records whether the current message's data went out in full
    (``data_sent``): a connection lost after that may have delivered it.
    """

    data_sent = False

    def sendmail(self, *args: t.Any, **kwargs: t.Any) -> dict[str, tuple[int, bytes]]:
        self.data_sent = False
        refused: dict[str, tuple[int, bytes]] = super().sendmail(  # type: ignore[misc]
            *args, **kwargs
        )
        if refused:
            raise mark_failure(smtplib.SMTPRecipientsRefused(refused), "permanent")
        return refused

    def send(self, s: t.Any) -> None:
        super().send(s)  # type: ignore[misc]
        # smtplib's data() ends the message with CRLF "." CRLF, in one send().
        if isinstance(s, bytes) and s.endswith(b"\r\n.\r\n"):
            self.data_sent = True


class _SMTP(_RefusalsRaise, smtplib.SMTP):
    pass


class _SMTP_SSL(_RefusalsRaise, smtplib.SMTP_SSL):
    pass


class SMTPConnection(Connection):
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
        try:
            host.set_debuglevel(int(mail.debug))
            if mail.use_tls:
                host.starttls()
            if mail.username and mail.password:
                host.login(mail.username, mail.password)
        except BaseException:
            host.close()  # a refused STARTTLS or login must not leak the socket
            raise
        return host


def data_was_sent(connection: SMTPConnection) -> bool:
    """Whether the message in flight on ``connection`` had all its data sent."""
    return bool(getattr(connection.host, "data_sent", False))


def failure_kind(exc: BaseException) -> str:
    """SMTP's answer as a retry decision: 5xx permanent, 4xx transient."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return (
            "permanent"
            if codes and all(code >= 500 for code in codes)
            else ("transient")
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        return "permanent" if exc.smtp_code >= 500 else "transient"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "permanent"
    return "transient"


def close(connection: SMTPConnection) -> None:
    host = connection.host
    if host is None:
        return
    try:
        host.quit()
    except OSError as exc:
        # Every message was already accepted or reported; only the goodbye failed.
        logger.debug("SMTP QUIT failed: %r", exc)
        host.close()


def reset(connection: SMTPConnection) -> bool:
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
        close(connection)
        return False
    return True
