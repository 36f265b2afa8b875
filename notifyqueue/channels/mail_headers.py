"""What a mail header may hold, and how the mail channel writes one.

Every header value passes :func:`check_header`; every address also
:func:`check_address`. Both run when an intent is queued (or at ``init_app``
for channel options), so nothing unsafe reaches the message builder.
"""

from __future__ import annotations

import functools
import re
from email import policy
from email.header import Header
from email.headerregistry import Address
from urllib.parse import quote

from ..errors import PayloadError

# What a header value may not hold: every C0 control but TAB, DEL, every C1
# control (U+0085 among them), U+2028 and U+2029. That is everything
# str.splitlines() splits on, which is what the email package folds headers
# with, so a value holding one would become several header lines. Surrogates
# (U+D800-U+DFFF) cannot be encoded at all.
_HEADER_REFUSED = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_header(what: str, value: str) -> None:
    """Refuse a header value that could break a line or cannot be encoded.

    :param what: names the value in the error (``"the subject"``...).
    :raises PayloadError: naming the value, the character and its index.
    """
    # isprintable() is a fast C loop and False for every refused character;
    # only values it cannot vouch for (TAB, non-ASCII spaces) pay for the regex.
    if value.isprintable():
        return
    found = _HEADER_REFUSED.search(value)
    if found is None:
        return
    char = found.group()
    if _SURROGATE.match(char):
        raise PayloadError(
            f"{what} {value!r} contains the lone surrogate U+{ord(char):04X}"
            f" (at index {found.start()}), which cannot be encoded in a mail;"
            " decode the text it came from properly, or remove it."
        )
    raise PayloadError(
        f"{what} {value!r} contains U+{ord(char):04X} (at index {found.start()}):"
        " line breaks (CR or LF, and also VT, FF, U+001C-U+001E, U+0085, U+2028,"
        " U+2029) and other control characters could inject mail headers, and"
        " are refused in every header; remove it."
    )


def check_encodable(what: str, value: str) -> None:
    """Refuse a text (a body) holding a lone surrogate: it could never be sent."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise PayloadError(
            f"{what} contains the lone surrogate U+{ord(found.group()):04X}"
            f" (at index {found.start()}, in {_around(value, found.start())!r}),"
            " which cannot be encoded in a mail, so it could never be sent;"
            " decode the text it came from properly (json.loads turns"
            ' "\\ud800" into one), or remove it.'
        )


def _around(text: str, index: int) -> str:
    """Up to 40 characters of ``text`` around ``index``, for an error message."""
    return text[max(index - 20, 0) : index + 20]


# An address is "addr-spec" or "Name <addr-spec>" (the name bare or quoted);
# addr-spec is a dot-atom local part, "@", and a dot-atom domain. Non-ASCII
# is allowed in both: a local part then needs SMTPUTF8, a domain IDNA.
_ATOM = r"""[^\s"(),.:;<>@\[\\\]]+"""
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_ADDR_SPEC = rf"(?P<local{{0}}>{_DOT_ATOM})@(?P<domain{{0}}>{_DOT_ATOM})"
_ADDRESS = re.compile(
    rf"""(?:{_ADDR_SPEC.format(1)}|(?P<name>[^<>"]*|"(?:[^"\\]|\\.)*")\s*<{_ADDR_SPEC.format(2)}>)\Z"""
)
_QUOTED_PAIR = re.compile(r"\\(.)")


@functools.lru_cache(maxsize=1024)
def _address(value: str) -> Address | None:
    """``value`` as an Address with an ASCII (IDNA) domain, or None if it is none."""
    found = _ADDRESS.match(value)
    if found is None:
        return None
    name = found["name"] or ""
    if name.startswith('"'):
        name = _QUOTED_PAIR.sub(r"\1", name[1:-1])
    local = found["local1"] or found["local2"]
    domain = found["domain1"] or found["domain2"]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return Address(display_name=name.strip(), username=local, domain=domain)


def address_of(value: str | tuple[str, str]) -> Address:
    """Parse an address that :func:`check_address` accepted."""
    if isinstance(value, tuple):  # Flask-Mail also takes (name, address)
        value = f"{value[0]} <{value[1]}>"
    address = _address(value)
    if address is None:  # every address was checked when the intent was queued
        raise PayloadError(f"{value!r} is not an email address.")
    return address


def check_address(what: str, value: str) -> None:
    """Refuse a value that is not one address, or not a safe header value."""
    check_header(what, value)
    if _address(value) is None:
        raise PayloadError(
            f"{what} {value!r} is not an email address the mail channel can send"
            " to: write it as 'user@example.com' or 'Name <user@example.com>'"
            " (one address, a dot-atom local part, and a domain whose non-ASCII"
            " labels are valid IDNA)."
        )


_PHRASE_SPECIALS = re.compile(r'[][\\()<>@,:;".]')  # as email.utils.formataddr
_PHRASE_ESCAPES = re.compile(r'[\\"]')


def format_address(address: Address) -> str:
    """``address`` for a header, folded by hand, its display name quoted or encoded.

    The email package's own refolding of an address header drops the quotes
    around a long display name (and decodes an encoded one bare), so a name
    such as ``"x, a@evil.example, ..."`` turned into recipients of its own.
    Messages are therefore written with refolding off, and each address sits
    on lines of its own.
    """
    addr = address.addr_spec
    name = address.display_name
    if not name:
        return addr
    if name.isascii() and len(name) <= 60:
        if _PHRASE_SPECIALS.search(name):
            name = '"' + _PHRASE_ESCAPES.sub(r"\\\g<0>", name) + '"'
        if len(name) + len(addr) <= 72:
            return f"{name} <{addr}>"
        return f"{name}\n <{addr}>"
    # RFC 2047 encoded words, whole: Flask-Mail's sanitize_address leaves the
    # ASCII words of a non-ASCII name bare, specials and all.
    return f"{Header(name, 'utf-8', header_name='To').encode()}\n <{addr}>"


def format_subject(subject: str) -> str:
    """``subject`` folded for a header, as refolding is off (see format_address)."""
    if subject.isascii() and len(subject) <= 68:
        return subject
    if not subject.isascii():
        return Header(subject, "utf-8", header_name="Subject").encode()
    # The unstructured folder is safe (it has no quoting to lose).
    header = policy.SMTP.header_factory("Subject", subject)
    folded = str(header.fold(policy=policy.SMTP))
    return folded.removeprefix("Subject: ").removesuffix("\r\n").replace("\r\n", "\n")


# RFC 6838 4.2: a type and a subtype of restricted-name characters.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}\Z")


def check_content_type(what: str, value: str) -> None:
    """Refuse a value that is not a bare ``type/subtype`` media type."""
    if _CONTENT_TYPE.match(value) is None:
        raise PayloadError(
            f"{what} {value!r} is not a media type: write it as 'type/subtype'"
            " ('application/pdf', 'text/csv'), without parameters."
        )


_FILENAME_PLAIN = re.compile(r"[ !#-\[\]-~]{1,60}\Z")  # printable ASCII but " \


def format_disposition(filename: str) -> str:
    """A ``Content-Disposition`` value naming ``filename``, folded by hand.

    A short printable ASCII name is quoted; any other is written as RFC 2231
    continuations of UTF-8, percent-encoded (``filename*0*=utf-8''...``), on
    lines of their own, so that neither a long nor a non-ASCII name makes a
    line over SMTP's limit (refolding is off, see :func:`format_address`).
    """
    if _FILENAME_PLAIN.match(filename):
        return f'attachment; filename="{filename}"'
    encoded = quote(filename, safe="")
    chunks = []
    start = 0
    while start < len(encoded):
        end = min(start + 60, len(encoded))
        # Never split a %XX escape.
        if "%" in encoded[end - 2 : end] and end < len(encoded):
            end = encoded.rindex("%", start, end)
        chunks.append(encoded[start:end])
        start = end
    chunks[0] = "utf-8''" + chunks[0]
    parts = [f"filename*{number}*={chunk}" for number, chunk in enumerate(chunks)]
    return "attachment;\n " + ";\n ".join(parts)
