"""A real SMTP server (aiosmtpd) for tests and the load script, with fault injection."""

from __future__ import annotations

import asyncio
import socket
import typing as t
from dataclasses import dataclass, field
from email import message_from_bytes, policy


@dataclass
class SMTPServer:
    """A real SMTP server (aiosmtpd) on a free loopback port.

    ``messages`` holds each message received, parsed; ``raw`` the same as the
    bytes that arrived; ``envelopes`` the recipients each was accepted for;
    ``mail_options`` the MAIL FROM parameters each came with (``SMTPUTF8``...);
    ``connections`` counts SMTP sessions; addresses in ``refuse`` are
    answered 550. aiosmtpd's ``Controller`` offers SMTPUTF8 unless started
    with ``enable_SMTPUTF8=False``.

    ``faults`` injects a failure at the Nth MAIL command the server receives
    (counted from 1 in ``mail_commands``, across connections):

    - ``"550"``: refuse the sender; the connection goes on;
    - ``"421"``: answer "service closing" and close the connection;
    - ``"drop"``: drop the connection without an answer;
    - ``"stall"``: answer only after ``stall_seconds``, past a client's timeout;
    - ``"451"``: refuse the sender for now (a transient 4xx); the connection
      goes on;
    - ``"drop-after-data"``: accept the message (it is in ``messages``), then
      drop the connection before answering the final ``.`` of DATA, so the
      client cannot know it arrived.
    """

    host: str
    port: int
    messages: list[t.Any] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    envelopes: list[list[str]] = field(default_factory=list)
    mail_options: list[list[str]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    connections: int = 0
    faults: dict[int, str] = field(default_factory=dict)
    mail_commands: int = 0
    stall_seconds: float = 2.0
    data_delay: float = 0.0
    """Seconds every DATA waits before the server answers (a slow server)."""
    answer_delay: float = 0.0
    """Seconds every DATA waits after the message is stored, before the
    server answers (the client cannot know it arrived meanwhile)."""

    def config(self) -> dict[str, t.Any]:
        return {
            "MAIL_SERVER": self.host,
            "MAIL_PORT": self.port,
            "MAIL_SUPPRESS_SEND": False,
        }

    def intent_ids(self) -> list[str]:
        """The X-Notifyqueue-Intent header of each message received, in order."""
        return [message["X-Notifyqueue-Intent"] for message in self.messages]


class _Handler:
    def __init__(self, server: SMTPServer) -> None:
        self.server = server

    # Every SMTP session smtplib opens starts with EHLO (or HELO as fallback).
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.server.connections += 1
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):  # type: ignore[no-untyped-def]
        self.server.connections += 1
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        self.server.mail_commands += 1
        fault = self.server.faults.get(self.server.mail_commands)
        if fault == "550":
            return "550 5.7.1 sender refused"
        if fault == "451":
            return "451 4.3.0 try again later"
        if fault == "drop-after-data":
            envelope.drop_after_data = True
            fault = None
        if fault in ("421", "drop"):
            if fault == "421":
                await server.push("421 4.3.2 service shutting down")
            server.transport.abort()
            return "250 OK"  # never reaches the client: the connection is gone
        if fault == "stall":
            await asyncio.sleep(self.server.stall_seconds)
        elif fault is not None:
            raise ValueError(f"unknown SMTP fault {fault!r}")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        if address in self.server.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.server.data_delay:
            await asyncio.sleep(self.server.data_delay)
        self.server.envelopes.append(list(envelope.rcpt_tos))
        self.server.mail_options.append(list(envelope.mail_options))
        self.server.raw.append(bytes(envelope.content))
        self.server.messages.append(
            message_from_bytes(envelope.content, policy=policy.default)
        )
        if getattr(envelope, "drop_after_data", False):
            server.transport.abort()
        if self.server.answer_delay:
            await asyncio.sleep(self.server.answer_delay)
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_smtp_server(
    port: int | None = None, **options: t.Any
) -> tuple[SMTPServer, t.Callable[[], None]]:
    """Start a server on ``port`` (default a free loopback one); return it and its
    stop function. Start one again on a stopped one's port to bring it back.

    Keyword arguments go to aiosmtpd's ``Controller`` (``data_size_limit``...).
    """
    from aiosmtpd.controller import Controller

    server = SMTPServer("127.0.0.1", port or free_port())
    controller = Controller(
        _Handler(server),
        hostname=server.host,
        port=server.port,
        loop=asyncio.new_event_loop(),
        **options,
    )
    controller.start()

    def stop() -> None:
        controller.stop()
        controller.loop.close()

    return server, stop
