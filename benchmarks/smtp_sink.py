"""A minimal SMTP server in a process of its own, for B3 and B5.

``python -m benchmarks.smtp_sink [--tls] [--data-delay SECONDS] [--ids]``
prints the loopback port it listens on, accepts every message, and when its
stdin closes prints how many messages it received and exits. In its own
process it runs on the other core, as a real mail server would, instead of
taking the GIL from the client it measures.

With ``--tls`` it is set up like a mail relay: STARTTLS required (a
self-signed certificate made with the ``openssl`` command) and AUTH required
(any credentials pass). With ``--data-delay`` it stalls that long before
answering each DATA, as a slow server does (the sessions stall side by side).
With ``--ids`` it also prints, after the count, a JSON object: the
``X-Notifyqueue-Intent`` header of the messages -> how many carried it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import ssl
import subprocess
import sys
import tempfile
import typing as t
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.smtp import free_port


class Sink:
    """Accepts every message and counts it.

    :param delay: seconds each DATA waits before the answer.
    :param ids: count the messages by their ``X-Notifyqueue-Intent`` header.
    """

    def __init__(self, delay: float = 0.0, ids: bool = False) -> None:
        self.received = 0
        self.delay = delay
        self.ids: collections.Counter[str] | None = (
            collections.Counter() if ids else None
        )

    async def handle_DATA(self, server: t.Any, session: t.Any, envelope: t.Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        # Counted before the answer: a client that has its 250 finds it counted.
        self.received += 1
        if self.ids is not None:
            headers = BytesHeaderParser().parsebytes(envelope.content)
            self.ids[headers.get("X-Notifyqueue-Intent", "")] += 1
        return "250 Message accepted for delivery"


def _accept_any(*args: t.Any) -> AuthResult:
    return AuthResult(success=True)


def tls_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def main() -> None:
    # aiosmtpd itself sets its deprecated Session.login_data after each AUTH,
    # and logs a warning every time.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smtp_sink")
    parser.add_argument("--tls", action="store_true", help="require STARTTLS and AUTH")
    parser.add_argument(
        "--data-delay", type=float, default=0.0, help="seconds before each DATA answer"
    )
    parser.add_argument(
        "--ids", action="store_true", help="also print the counts by intent id"
    )
    args = parser.parse_args()
    sink = Sink(args.data_delay, args.ids)
    port = free_port()
    options: dict[str, t.Any] = {}
    if args.tls:
        with tempfile.TemporaryDirectory() as directory:
            options = {
                "tls_context": tls_context(Path(directory)),
                "require_starttls": True,
                "auth_required": True,
                "authenticator": _accept_any,
            }
    controller = Controller(sink, hostname="127.0.0.1", port=port, **options)
    controller.start()
    print(port, flush=True)
    sys.stdin.read()
    controller.stop()
    print(sink.received, flush=True)
    if sink.ids is not None:
        print(json.dumps(sink.ids), flush=True)


if __name__ == "__main__":
    main()
