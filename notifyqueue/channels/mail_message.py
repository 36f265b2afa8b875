"""The email the mail channel sends: Flask-Mail's message, built safely.

Headers are folded here and written with refolding off, text parts with
long lines go quoted-printable, and attachments base64: see
:class:`MailMessage`.
"""

from __future__ import annotations

import base64
import re
from email import charset as _charset
from email import policy
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import formatdate

from flask_mail import Attachment, Message

from .mail_headers import address_of, format_address, format_disposition, format_subject

# Bodies keep the form Flask-Mail gives them (its "utf-8" charset: 7bit or
# 8bit, unwrapped) unless a line is longer than the 998 octets SMTP allows
# (RFC 5321 4.5.3.1.6); then quoted-printable, which carries every line whole
# and keeps the text readable.
_QUOTED_PRINTABLE = _charset.Charset("utf-8")
_QUOTED_PRINTABLE.body_encoding = _charset.QP
_LONG_LINE = re.compile(rb"[^\r\n]{999}")
_UNFOLDED = policy.SMTP.clone(max_line_length=None)
_UNFOLDED_UTF8 = policy.SMTPUTF8.clone(max_line_length=None)


class MailMessage(Message):
    """Flask-Mail's message as the mail channel sends it.

    Built like Flask-Mail's, ASCII header strings (RFC 2047 for non-ASCII
    names and subjects) written out by the ``SMTP`` policy, except: headers
    are folded here and never refolded (see :func:`format_address`); a
    message to or from an address with a non-ASCII local part is written as
    UTF-8 (RFC 6532; it needs SMTPUTF8, and Flask-Mail's ``formataddr``
    cannot write it at all); a text or HTML part with a line over 998 octets
    is quoted-printable; an HTML-only message has no empty text part; and
    attachments are base64 with RFC 2231 file names.
    """

    def _message(self) -> MIMEBase:
        sender = address_of(self.sender)
        recipients = [address_of(item) for item in dict.fromkeys(self.recipients)]
        cc = [address_of(item) for item in dict.fromkeys(self.cc)]
        reply_to = address_of(self.reply_to) if self.reply_to else None
        in_headers = [sender, *recipients, *cc, *([reply_to] if reply_to else [])]
        utf8 = any(not item.username.isascii() for item in in_headers)
        html = self.html
        parts = []
        if self.body is not None or html is None:
            parts.append(_text_part("plain", self.body or ""))
        if html is not None:
            parts.append(_text_part("html", html))
        mime: MIMEBase = parts[0]
        if len(parts) > 1:
            mime = MIMEMultipart("alternative", _subparts=parts)
        if self.attachments:
            mime = MIMEMultipart(
                "mixed", _subparts=[mime, *map(_attachment_part, self.attachments)]
            )
        if len(parts) > 1 or self.attachments:
            for part in mime.walk():
                if part is not mime:
                    del part["MIME-Version"]
        if self.subject:
            mime["Subject"] = format_subject(self.subject)
        mime["From"] = format_address(sender)
        if recipients:
            mime["To"] = ",\n ".join(map(format_address, recipients))
        if cc:
            mime["Cc"] = ",\n ".join(map(format_address, cc))
        if reply_to is not None:
            mime["Reply-To"] = format_address(reply_to)
        mime["Date"] = formatdate(self.date, localtime=True)
        mime["Message-ID"] = self.msgId
        for name, value in (self.extra_headers or {}).items():
            mime[name] = value
        mime.policy = _UNFOLDED_UTF8 if utf8 else _UNFOLDED
        return mime


class MailAttachment(Attachment):
    """Flask-Mail's attachment, knowing the charset of data that was text."""

    def __init__(
        self, filename: str, content_type: str, data: bytes, charset: str | None
    ) -> None:
        super().__init__(filename, content_type, data)
        self.charset = charset


def _text_part(subtype: str, text: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype, charset="utf-8")
    # A line of 998 octets has at least 250 characters (4 octets at most each).
    long_lines = len(text) >= 250 and _LONG_LINE.search(text.encode()) is not None
    part.set_payload(text, _QUOTED_PRINTABLE if long_lines else "utf-8")
    return part


def _attachment_part(attachment: Attachment) -> MIMEBase:
    maintype, subtype = attachment.content_type.split("/")
    part = MIMEBase(maintype, subtype)
    charset = getattr(attachment, "charset", None)
    if charset:
        part.set_param("charset", charset)
    data = attachment.data
    # base64 carries every byte as it is; lines of 76 characters.
    part.set_payload(
        base64.encodebytes(data if isinstance(data, bytes) else data.encode()).decode(
            "ascii"
        )
    )
    part["Content-Transfer-Encoding"] = "base64"
    part["Content-Disposition"] = format_disposition(attachment.filename or "file")
    return part
