"""A minimal SMTP server in a process of its own, for B3.

``python -m benchmarks.smtp_sink [--tls]`` prints the loopback port it listens
on, accepts every message, and when its stdin closes prints how many messages
it received and exits. In its own process it runs on the other core, as a
real mail server would, instead of taking the GIL from the client it measures.

With ``--tls`` it is set up like a mail relay: STARTTLS required (a
self-signed certificate made with the ``openssl`` command) and AUTH required
(any credentials pass).
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.smtp import free_port


class Sink:
    """Accepts every message and counts it."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: t.Any, session: t.Any, envelope: t.Any) -> str:
        self.received += 1
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
    sink = Sink()
    port = free_port()
    options: dict[str, t.Any] = {}
    if "--tls" in sys.argv[1:]:
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


if __name__ == "__main__":
    main()
