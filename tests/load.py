"""Load the sample app through a threaded HTTP server; account for each notification.

``tests/test_load.py`` runs it at CI size. For a larger run::

    python -m tests.load --requests 20000 --clients 16

(PostgreSQL from ``NOTIFYQUEUE_TEST_POSTGRES_URL``, default the local one;
``--database-url`` picks another.) ``--delivery background-mail`` puts the
mail channel on ``"delivery": "background"``, ``--delivery background`` every
channel; the checks then wait for the pool to finish first.
``--delivery durable-mail`` makes the mail channel ``"durable": True`` (still
inline), ``--delivery durable-background-mail`` durable on background: the
outbox table is created with the schema, the drainer runs once the requests'
own delivery is over, and the outbox must end empty. ``--smtp-down-first-half``
(durable only) starts with the SMTP server down and brings it back, on the
same port, once half the requests are answered: the emails of the first half
fail transiently on the fast path, wait in the outbox, and the drainer must
then deliver each of them exactly once.

``--delivery celery-mail`` puts the mail channel on ``"delivery": "celery"``:
the requests publish their emails to Redis (``NOTIFYQUEUE_TEST_REDIS_URL``,
default db 5 of the local one, on a queue of the run's own) and one real
Celery worker process (``celery -A sample_app.make_celery worker
--pool=solo``, the sample's own worker module, given the same configuration
as ``FLASK_*`` variables) sends them to the run's SMTP server; the checks wait
until the server has them all and the queue is idle, and also count what was
published (``after_task_publish``): each committed email once, in call order,
nothing for a rolled-back request. ``--delivery celery-durable-mail`` makes
it durable too; with ``--broker-down-first-half`` the app publishes through a
TCP proxy that is down until half the requests are answered (the worker
reaches Redis directly): the emails of the first half fail on the fast path,
wait in the outbox, and the drainer publishes them once the proxy is back.

Each request changes one froggy's colour to a value no other request uses,
so every log line and email names the request that caused it. One request in
ten changes it twice in one batch (its two emails must arrive in that
order). One request in ten is rolled back instead: a batch that fails on an
unknown froggy (404) or on a taken name at COMMIT (409), after queueing its
own colour change. Each commit's intents are recorded from
``batch_committed``; then every committed request must have committed exactly
its own intents, once, every rolled-back request none, and each committed
intent must have arrived exactly once (counted by intent id at the SMTP server
and in the log), in call order within its commit (also for a commit whose
emails waited in the outbox for the drainer: they come due together).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import re
import signal as os_signal
import sys
import tempfile
import threading
import time
import typing as t
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from notifyqueue import (
    BackgroundStats,
    Intent,
    background_stats,
    outbox,
    signals,
    testing,
)
from notifyqueue.outbox import DrainStats
from notifyqueue.state import state_of

from .smtp import SMTPServer, start_smtp_server

if t.TYPE_CHECKING:
    from .celery_support import Worker
    from .tcp_proxy import TCPProxy

FROGGIES = 16
KERMIT = "kermit-0"  # a taken name: creating it again fails at COMMIT

_INLINE: dict[str, t.Any] = {"delivery": "inline"}
_BACKGROUND: dict[str, t.Any] = {"delivery": "background"}
_CELERY: dict[str, t.Any] = {"delivery": "celery"}
DELIVERIES: dict[str, dict[str, dict[str, t.Any]]] = {
    "inline": {"log": _INLINE, "mail": _INLINE},
    "background-mail": {"log": _INLINE, "mail": _BACKGROUND},
    "background": {"log": _BACKGROUND, "mail": _BACKGROUND},
    "durable-mail": {"log": _INLINE, "mail": _INLINE | {"durable": True}},
    "durable-background-mail": {
        "log": _INLINE,
        "mail": _BACKGROUND | {"durable": True},
    },
    "celery-mail": {"log": _INLINE, "mail": _CELERY},
    "celery-durable-mail": {"log": _INLINE, "mail": _CELERY | {"durable": True}},
}
"""``--delivery`` choices: each of the sample app's channels -> the options it
gets on top of the sample's (``"delivery"``, ``"durable"``; a celery channel
also gets ``"celery_queue"``, the run's own queue)."""

DURABLE_RETRY: dict[str, t.Any] = {"max_attempts": 1000}
"""A durable channel's retry options here: no transient failure makes a row dead."""
DRAIN_ROUNDS = 10
"""At most this many ``drain(once=True)`` calls, until nothing is due."""
DRAIN_AHEAD = timedelta(days=1)
"""The drainer's ``now`` is this far ahead: every retry's backoff has passed."""

# More commits than any run makes: a full queue would deliver inline instead,
# which the checks count as a problem.
BACKGROUND_QUEUE = 1_000_000
SETTLE_TIMEOUT = 300.0
"""Seconds the checks wait for background delivery to finish."""
WORKER_TIMEOUT = 300.0
"""Seconds the checks wait for the Celery worker to send every email."""
WORKER_START_TIMEOUT = 60.0
"""Seconds a Celery worker has to start consuming its queue."""
CELERY_RETAIN = 3600
"""``NOTIFYQUEUE_CELERY_RETAIN`` here: the run's guard keys in the shared Redis
expire within the hour (the run also deletes them at its end)."""

_COLOUR = re.compile(r"new (?:value|colour): (c\d+b?)$")


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        pass  # one access-log line per request would drown the output


@contextlib.contextmanager
def serve(app: Flask) -> t.Iterator[tuple[str, int]]:
    """Serve ``app`` on a free loopback port, one thread per request."""
    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.port
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


class Mailbox(t.Protocol):
    """Where a run's emails arrive: an :class:`SMTPServer` or an :class:`SMTPOutage`."""

    @property
    def messages(self) -> list[t.Any]: ...

    def config(self) -> dict[str, t.Any]: ...


class SMTPOutage:
    """An SMTP server that is down until :meth:`start` brings it up, on the port
    the app was configured with (use :func:`smtp_outage`, which stops it)."""

    def __init__(self) -> None:
        down, stop = start_smtp_server()
        stop()
        self.host, self.port = down.host, down.port
        self.server: SMTPServer | None = None
        self._stop: t.Callable[[], None] | None = None
        self._lock = threading.Lock()

    @property
    def messages(self) -> list[t.Any]:
        """What the server received since :meth:`start` (nothing before)."""
        return self.server.messages if self.server is not None else []

    def config(self) -> dict[str, t.Any]:
        return {
            "MAIL_SERVER": self.host,
            "MAIL_PORT": self.port,
            "MAIL_SUPPRESS_SEND": False,
        }

    def start(self) -> None:
        """Bring the server up (once; later calls do nothing)."""
        with self._lock:
            if self.server is None:
                self.server, self._stop = start_smtp_server(port=self.port)

    def stop(self) -> None:
        with self._lock:
            if self._stop is not None:
                self._stop()
                self._stop = None


@contextlib.contextmanager
def smtp_outage() -> t.Iterator[SMTPOutage]:
    """An :class:`SMTPOutage`, down at first; its server stops with the block."""
    outage = SMTPOutage()
    try:
        yield outage
    finally:
        outage.stop()


class Outage(t.Protocol):
    """A service the run starts with down, brought back by :meth:`start`."""

    def start(self) -> None: ...


class BrokerOutage:
    """The Celery broker as the app sees it: a :class:`~tests.tcp_proxy.TCPProxy`
    in front of Redis, down (connections refused) until :meth:`start`, then
    forwarding on the port the app was configured with (use
    :func:`broker_outage`, which stops it). The worker reaches Redis directly.
    """

    def __init__(self, redis_url: str) -> None:
        from .celery_support import broker_address, proxied_url
        from .tcp_proxy import TCPProxy

        self.proxy: TCPProxy = TCPProxy(*broker_address(redis_url))
        self.url = proxied_url(redis_url, self.proxy)  # picks the proxy's port
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bring the proxy up (once; later calls do nothing)."""
        with self._lock:
            if not self.proxy.running:
                self.proxy.start()

    def stop(self) -> None:
        with self._lock:
            self.proxy.stop()


@contextlib.contextmanager
def broker_outage(redis_url: str) -> t.Iterator[BrokerOutage]:
    """A :class:`BrokerOutage`, down at first; its proxy stops with the block."""
    outage = BrokerOutage(redis_url)
    try:
        yield outage
    finally:
        outage.stop()


@dataclass
class CeleryRun:
    """What the Celery channels went through in a run (one worker, one queue)."""

    redis_url: str
    """The Redis of the worker's broker and of the guard."""
    queue: str
    """The run's own queue (the celery channels' ``"celery_queue"``)."""
    worker: Worker | None = field(default=None, repr=False)
    published: list[str] = field(default_factory=list)
    """The task id of each ``notifyqueue.deliver`` published to the queue, in
    publish order (Celery's ``after_task_publish``, in this process)."""
    expected: int = 0
    """Emails the worker had to send: the committed intents of celery channels."""
    waited: float = 0.0
    """Seconds from the end of the requests (and of the drainer) until every
    email had arrived and the queue was idle."""
    guard: dict[str, int] = field(default_factory=dict)
    """Guard state -> how many of the published intents are in it, at the end."""
    not_done: list[str] = field(default_factory=list)
    """Published intents whose guard state is not ``done``, with the state."""
    problem: str | None = None
    """Why the wait for the worker ended early or timed out, if it did."""


class LogRecords(logging.Handler):
    """Keeps every record of the loggers it is attached to (thread-safely:
    ``Handler.handle`` holds the handler's lock around ``emit``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[tuple[str, str | None]]:
        """``(message, notifyqueue intent id or None)`` for each record."""
        return [
            (record.getMessage(), getattr(record, "notifyqueue_intent", None))
            for record in self.records
        ]


@dataclass
class Request:
    """One planned request and, once sent, its answer."""

    number: int
    froggy_id: int
    kind: str  # "commit", "pair" (two changes), "missing" (404) or "conflict" (409)
    status: int | None = None
    body: dict[str, t.Any] = field(default_factory=dict)
    seconds: float = 0.0
    """From sending the request to the end of its answer's body."""

    @property
    def committed(self) -> bool:
        return self.kind in ("commit", "pair")

    @property
    def colours(self) -> list[str]:
        """The colours it sets, in call order."""
        if self.kind == "pair":
            return [f"c{self.number}", f"c{self.number}b"]
        return [f"c{self.number}"]

    def expected(self) -> dict[str, list[str]]:
        """Channel -> the text of each intent it queues, in call order."""
        return {
            "log": [
                f"Froggy colour updated: {self.froggy_id}; new value: {colour}"
                for colour in self.colours
            ],
            "mail": [
                f"Froggy: {self.froggy_id}; new colour: {colour}"
                for colour in self.colours
            ],
        }

    def send(self, connection: http.client.HTTPConnection) -> None:
        if self.kind == "commit":
            method, path = "PUT", f"/froggies/{self.froggy_id}/colour"
            payload: dict[str, t.Any] = {"colour": self.colours[0]}
        else:
            operations = [
                {"op": "colour", "id": self.froggy_id, "colour": colour}
                for colour in self.colours
            ]
            if self.kind == "missing":
                operations.append({"op": "jump", "id": 10**9, "jump_height": "1 m"})
            elif self.kind == "conflict":
                operations.append({"op": "create", "name": KERMIT})
            method, path = "POST", "/batch"
            payload = {"operations": operations}
        started = time.perf_counter()
        connection.request(
            method, path, json.dumps(payload), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        self.status = response.status
        self.body = json.loads(response.read())
        self.seconds = time.perf_counter() - started


def plan(requests: int, froggy_ids: list[int]) -> list[Request]:
    """Nine commits in ten, one of them a pair; the tenth a 404 or a 409 in turn."""
    plans = []
    for number in range(requests):
        if number % 10 == 5:
            kind = "pair"
        elif number % 10 < 9:
            kind = "commit"
        else:
            kind = "missing" if number // 10 % 2 == 0 else "conflict"
        plans.append(Request(number, froggy_ids[number % len(froggy_ids)], kind))
    return plans


def text(intent: Intent) -> str:
    """What arrives of an intent: a log line, or an email's body."""
    payload = intent.payload
    return payload if isinstance(payload, str) else str(payload["body"])


@dataclass
class DurableRun:
    """What the durable channels went through in a run."""

    failed: dict[str, str] = field(default_factory=dict)
    """Intent id -> channel, for each ``intent_failed`` (the fast path's)."""
    retrying: list[tuple[str, int]] = field(default_factory=list)
    """``(intent id, attempt)`` of each ``intent_retrying``."""
    dead: list[str] = field(default_factory=list)
    """The intent id of each ``intent_dead``."""
    before_drain: dict[str, int] = field(default_factory=dict)
    """Outbox state -> rows, once the requests' own delivery was over."""
    drained: DrainStats = field(default_factory=DrainStats)
    """What the drainer did, over every round."""
    rounds: int = 0
    """``drain(once=True)`` calls made."""
    after_drain: dict[str, int] = field(default_factory=dict)
    """Outbox state -> rows, at the end."""


@dataclass
class Report:
    requests: int
    clients: int
    delivery: dict[str, str]
    durable_channels: list[str]
    seconds: float
    settled: float
    committed: int
    rolled_back: int
    emails: int
    log_lines: int
    stats: BackgroundStats
    problems: list[str]
    durable: DurableRun = field(default_factory=DurableRun)
    celery: CeleryRun | None = None
    plans: list[Request] = field(repr=False, default_factory=list)
    commits: list[list[Intent]] = field(repr=False, default_factory=list)
    """Each committed batch's intents, as ``batch_committed`` sent them."""

    def summary(self) -> str:
        modes = ", ".join(
            f"{name} {mode}" + (" durable" if name in self.durable_channels else "")
            for name, mode in self.delivery.items()
        )
        outbox = ""
        if self.durable_channels:
            d = self.durable
            outbox = (
                f"; outbox: {len(d.failed)} failed on the fast path, left"
                f" {d.before_drain or 'empty'}; the drainer ({d.rounds} rounds)"
                f" claimed {d.drained.claimed}, delivered {d.drained.delivered},"
                f" {len(d.retrying)} retries, {len(d.dead)} dead; left"
                f" {d.after_drain or 'empty'}"
            )
        celery = ""
        if self.celery is not None:
            c = self.celery
            startup = c.worker.startup_seconds if c.worker is not None else None
            celery = (
                f"; celery: {len(c.published)} tasks published to {c.queue},"
                f" {c.expected} emails expected from one worker (solo pool,"
                f" started in {startup or 0:.1f} s), all sent and the queue idle"
                f" {c.waited:.1f} s after the requests; guard {c.guard or 'empty'}"
            )
        slowest = max((request.seconds for request in self.plans), default=0.0)
        return (
            f"{self.requests} requests from {self.clients} clients ({modes}) in"
            f" {self.seconds:.1f} s ({self.requests / self.seconds:.0f}/s, the"
            f" slowest {slowest * 1e3:.0f} ms),"
            f" every notification out at {self.settled:.1f} s:"
            f" {self.committed} committed, {self.rolled_back} rolled back;"
            f" {self.emails} emails and {self.log_lines} notification log lines"
            f" counted; background {self.stats}{outbox}{celery};"
            f" {len(self.problems)}"
            " problems"
        )


def run(
    app: Flask,
    smtp: Mailbox,
    records: LogRecords,
    requests: int,
    clients: int,
    *,
    outage: Outage | None = None,
) -> Report:
    """Send the requests from ``clients`` threads and check every notification.

    ``outage`` (default ``smtp`` if it is an :class:`SMTPOutage`; else, say, a
    :class:`BrokerOutage`) is started once half the requests are answered.
    With a durable channel, the drainer runs once the requests' own delivery
    is over (:func:`drain_until_empty`); with a celery channel the checks
    then wait for the app's worker (started by :func:`loaded_app`) to send
    every email (:func:`wait_for_worker`).
    """
    from sample_app.extensions import db
    from sample_app.models import Froggy

    with app.app_context():
        froggies = [
            Froggy(name=f"kermit-{n}", colour="green", is_jumping=False)
            for n in range(FROGGIES)
        ]
        db.session.add_all(froggies)
        db.session.commit()
        froggy_ids = [froggy.id for froggy in froggies]
        db.session.remove()
    plans = plan(requests, froggy_ids)
    commits: list[list[Intent]] = []

    durable = DurableRun()
    if outage is None and isinstance(smtp, SMTPOutage):
        outage = smtp
    celery = _celery_runs.get(app)
    answered = [0]
    lock = threading.Lock()

    def record(sender: Flask, *, intents: list[Intent], **kwargs: t.Any) -> None:
        commits.append(list(intents))  # list.append is atomic

    def failed(sender: Flask, *, intent: Intent, **kwargs: t.Any) -> None:
        durable.failed[intent.id] = intent.channel

    def retrying(
        sender: Flask, *, intent: Intent, attempt: int, **kwargs: t.Any
    ) -> None:
        durable.retrying.append((intent.id, attempt))

    def dead(sender: Flask, *, intent: Intent, **kwargs: t.Any) -> None:
        durable.dead.append(intent.id)

    def published(
        sender: str | None = None,
        headers: dict[str, t.Any] | None = None,
        routing_key: str | None = None,
        **kwargs: t.Any,
    ) -> None:
        # Celery protocol 2: the task id is in the headers.
        if celery is not None and routing_key == celery.queue and headers:
            celery.published.append(headers["id"])  # list.append is atomic

    def one_answered() -> None:
        with lock:
            answered[0] += 1
            half = answered[0] == max(1, requests // 2)
        if half and outage is not None:
            outage.start()

    errors: list[BaseException] = []
    receivers: list[tuple[t.Any, t.Callable[..., None]]] = [
        (signals.batch_committed, record),
        (signals.intent_failed, failed),
        (signals.intent_retrying, retrying),
        (signals.intent_dead, dead),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, sender=app, weak=False)
    if celery is not None:
        from celery.signals import after_task_publish

        after_task_publish.connect(published, weak=False)
    try:
        started = time.perf_counter()
        with serve(app) as (host, port):

            def client(mine: list[Request]) -> None:
                try:
                    for request in mine:
                        connection = http.client.HTTPConnection(host, port, timeout=60)
                        try:
                            request.send(connection)
                        finally:
                            connection.close()
                        one_answered()
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=client, args=(plans[n::clients],))
                for n in range(clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        seconds = time.perf_counter() - started
        if outage is not None:
            outage.start()  # whatever happened to the requests
        if errors:
            raise errors[0]
        with contextlib.suppress(TimeoutError):  # check() reports it
            settle(app)
        if state_of(app).durable:
            durable.before_drain = outbox_states(app)
            durable.drained, durable.rounds = drain_until_empty(app)
            durable.after_drain = outbox_states(app)
        if celery is not None:
            wait_for_worker(app, celery, smtp, commits)
        settled = time.perf_counter() - started
        problems = check(
            app, plans, smtp, records, commits, durable, celery, outage is not None
        )
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver, sender=app)
        if celery is not None:
            after_task_publish.disconnect(published)
    committed = sum(1 for request in plans if request.committed)
    return Report(
        requests,
        clients,
        dict(state_of(app).delivery),
        sorted(state_of(app).durable),
        seconds,
        settled,
        committed,
        requests - committed,
        len(smtp.messages),
        sum(1 for _, intent_id in records.messages() if intent_id is not None),
        background_stats(app),
        problems,
        durable,
        celery,
        plans,
        commits,
    )


def outbox_states(app: Flask) -> dict[str, int]:
    """The app's outbox rows: state -> how many."""
    from sample_app.extensions import db

    table = outbox.table
    with app.app_context(), db.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.state, sa.func.count()).group_by(table.c.state)
        ).all()
    return {state: count for state, count in rows}


def drain_until_empty(app: Flask) -> tuple[DrainStats, int]:
    """Run the drainer, ``now`` :data:`DRAIN_AHEAD` ahead, until no row is due.

    :return: what it did over every round, and the number of rounds (at most
        :data:`DRAIN_ROUNDS`).
    """
    total = DrainStats()
    rounds = 0
    while rounds < DRAIN_ROUNDS:
        rounds += 1
        stats = outbox.drain(
            app, once=True, now=datetime.now(timezone.utc) + DRAIN_AHEAD
        )
        for name in (f.name for f in dataclasses.fields(DrainStats)):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        left = outbox_states(app)
        if not left.get("pending") and not left.get("leased"):
            break
    return total, rounds


def settle(app: Flask, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until the app's background delivery has nothing pending.

    Also what its tasks handed off meanwhile (a receiver that commits in a
    pool thread), which one :func:`notifyqueue.testing.wait` does not cover.

    :raises TimeoutError: past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    testing.wait(app, timeout)
    while background_stats(app).pending:
        testing.wait(app, max(0.0, deadline - time.monotonic()))


def celery_channels(app: Flask) -> set[str]:
    """The app's channels on ``"delivery": "celery"``."""
    return {name for name, mode in state_of(app).delivery.items() if mode == "celery"}


def wait_for_worker(
    app: Flask,
    celery: CeleryRun,
    smtp: Mailbox,
    commits: list[list[Intent]],
    timeout: float = WORKER_TIMEOUT,
) -> None:
    """Wait until the worker has sent every committed email and the queue is idle.

    Idle: no message waits in the queue, and none is taken and unacknowledged
    (prefetched, or held for a retry's countdown); the task is ``acks_late``,
    so a message is acknowledged after its email went out, and a duplicate
    would have arrived by then. Stops early if the worker exits. Then records
    the guard's state of each published intent in ``celery``.
    """
    channels = celery_channels(app)
    celery.expected = sum(
        1 for intents in commits for intent in intents if intent.channel in channels
    )
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    client = _redis(celery.redis_url)
    try:
        while True:
            if len(smtp.messages) >= celery.expected and not _queue_busy(
                client, celery.queue
            ):
                break
            worker = celery.worker
            if worker is not None and worker.returncode is not None:
                celery.problem = (
                    f"the Celery worker exited with {worker.returncode}; its log"
                    f" ends:\n{worker.log_tail()}"
                )
                break
            if time.monotonic() >= deadline:
                tail = worker.log_tail() if worker is not None else ""
                busy = _queue_busy(client, celery.queue)
                celery.problem = (
                    f"after {timeout} s the worker had sent {len(smtp.messages)} of"
                    f" {celery.expected} emails, and {busy} messages were in or"
                    f" taken from its queue; its log ends:\n{tail}"
                )
                break
            time.sleep(0.05)
        celery.waited = time.perf_counter() - started
        celery.guard, celery.not_done = _guard_states(client, celery.published)
    finally:
        client.close()


def _redis(url: str) -> t.Any:
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
    )


# kombu's Redis transport keeps each message a consumer took, until its
# acknowledgement, in this hash: tag -> [message, exchange, routing key].
_UNACKED = "unacked"


def _queue_busy(client: t.Any, queue: str) -> int:
    """Messages waiting in ``queue``, plus those taken from it and unacknowledged."""
    taken = sum(
        1
        for value in client.hvals(_UNACKED)
        if queue in json.loads(value)[1:]  # exchange, routing key
    )
    return int(client.llen(queue)) + taken


def _guard_states(
    client: t.Any, intent_ids: list[str]
) -> tuple[dict[str, int], list[str]]:
    """State -> how many of ``intent_ids`` the guard holds in it ("none" for
    no key), and ``"<id> <state>"`` for each whose state is not ``done``."""
    from notifyqueue.celery.guard import state_key

    ids = sorted(set(intent_ids))
    pipeline = client.pipeline(transaction=False)
    for intent_id in ids:
        pipeline.get(state_key(intent_id))
    states = [state or "none" for state in pipeline.execute()]
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    wrong = [
        f"{i} {state}" for i, state in zip(ids, states, strict=True) if state != "done"
    ]
    return counts, wrong


def forget_guard(celery: CeleryRun) -> None:
    """Delete the guard's keys of the run's published intents from the shared Redis."""
    from notifyqueue.celery.guard import attempts_key, state_key

    if not celery.published:
        return
    client = _redis(celery.redis_url)
    try:
        ids = sorted(set(celery.published))
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            client.delete(*(key(i) for i in chunk for key in (state_key, attempts_key)))
    finally:
        client.close()


def commits_of(
    plans: list[Request], commits: list[list[Intent]]
) -> tuple[dict[int, list[list[Intent]]], list[list[Intent]]]:
    """Each request's commits (by number), and the commits that mix requests.

    A commit belongs to the requests its intents' colours name; one that
    names none (a handler's own) belongs to no request.
    """
    owner = {colour: request.number for request in plans for colour in request.colours}
    mine: dict[int, list[list[Intent]]] = {}
    mixed: list[list[Intent]] = []
    for intents in commits:
        numbers = set()
        for intent in intents:
            match = _COLOUR.search(text(intent))
            if match and match.group(1) in owner:
                numbers.add(owner[match.group(1)])
        if len(numbers) > 1:
            mixed.append(intents)
        for number in numbers:
            mine.setdefault(number, []).append(intents)
    return mine, mixed


def check(
    app: Flask,
    plans: list[Request],
    smtp: Mailbox,
    records: LogRecords,
    commits: list[list[Intent]],
    durable: DurableRun | None = None,
    celery: CeleryRun | None = None,
    outage: bool | None = None,
) -> list[str]:
    """Every way the notifications differ from what the requests earned.

    Waits for background delivery to finish (:func:`settle`) before counting
    (the Celery worker must have been waited for already:
    :func:`wait_for_worker`). A failed notification is a problem, unless
    there was an ``outage`` (default: ``smtp`` is an :class:`SMTPOutage`)
    and it is an email of a durable channel, which the drainer then
    delivered (or published).
    """
    problems: list[str] = []
    try:
        settle(app)
    except TimeoutError as exc:
        problems.append(str(exc))
    durable = durable or DurableRun()
    durable_channels = state_of(app).durable
    if outage is None:
        outage = isinstance(smtp, SMTPOutage)
    background = {
        name for name, mode in state_of(app).delivery.items() if mode != "inline"
    }
    pooled = {
        name for name, mode in state_of(app).delivery.items() if mode == "background"
    }
    celery_names = celery_channels(app)
    # Failed on the fast path, with the outbox to retry them.
    retried = {
        intent_id
        for intent_id, channel in durable.failed.items()
        if outage and channel == "mail" and channel in durable_channels
    }
    problems += check_outbox(durable, durable_channels, retried, outage)
    # Channel -> intent id -> (position, text) of each arrival.
    arrivals: dict[str, dict[str, list[tuple[int, str]]]] = {"log": {}, "mail": {}}
    for position, message in enumerate(list(smtp.messages)):
        arrivals["mail"].setdefault(message["X-Notifyqueue-Intent"], []).append(
            (position, message.get_content().strip())
        )
    logged = records.messages()
    for position, (message, intent_id) in enumerate(logged):
        if intent_id is not None:
            arrivals["log"].setdefault(intent_id, []).append((position, message))

    # What was committed, against what each request earned.
    mine, mixed = commits_of(plans, commits)
    for intents in mixed:
        problems.append(
            f"one commit carried several requests' intents: {list(map(text, intents))}"
        )
    for request in plans:
        found = mine.get(request.number, [])
        if not request.committed:
            status = 404 if request.kind == "missing" else 409
            if request.status != status or "notifications" in request.body:
                problems.append(
                    f"request {request.number}: {request.status}, {request.body}"
                )
            if found:
                problems.append(
                    f"rolled-back request {request.number}: committed"
                    f" {[list(map(text, intents)) for intents in found]}"
                )
            continue
        if request.status != 200:
            problems.append(
                f"request {request.number}: {request.status}, {request.body}"
            )
            continue
        if len(found) != 1:
            problems.append(f"request {request.number}: {len(found)} commits")
            continue
        intents = found[0]
        expected = request.expected()
        got = {
            name: [text(i) for i in intents if i.channel == name] for name in expected
        }
        if got != expected or len(intents) != len(request.colours) * len(expected):
            problems.append(
                f"request {request.number}: committed {list(map(text, intents))}"
            )
        # The answer lists the inline channels' intents, and those that failed
        # to be handed off in the request (a publish to a broker that was
        # down); the rest were handed off.
        notifications = request.body["notifications"]
        failed = [item for item in notifications["failed"] if item["id"] not in retried]
        if failed:
            problems.append(f"request {request.number}: failed {failed}")
        answered = sorted(
            item["id"] for item in notifications["dispatched"] + notifications["failed"]
        )
        inline = sorted(
            i.id
            for i in intents
            if i.channel not in background
            or (i.channel in celery_names and i.id in retried)
        )
        if answered != inline:
            problems.append(
                f"request {request.number}: answered {answered} for {inline}"
            )
        # Published to the broker: pending, for the worker to deliver.
        pending = sorted(
            item["id"]
            for item in notifications["pending"]
            if item["channel"] in celery_names
        )
        published = sorted(
            i.id for i in intents if i.channel in celery_names and i.id not in retried
        )
        if pending != published:
            problems.append(
                f"request {request.number}: pending {pending} for {published}"
            )

    # What arrived, against what was committed: every intent once, as rendered,
    # those of one commit in call order; nothing else.
    committed_ids: set[str] = set()
    for intents in commits:
        for name, seen in arrivals.items():
            positions: list[int] = []
            for intent in (i for i in intents if i.channel == name):
                committed_ids.add(intent.id)
                texts = [body for _, body in seen.get(intent.id, [])]
                if texts != [text(intent)]:
                    problems.append(f"{name} intent {intent.id} arrived as {texts}")
                positions.extend(position for position, _ in seen.get(intent.id, []))
            if positions != sorted(positions):
                order = [text(i) for i in intents if i.channel == name]
                problems.append(f"{name} of one commit out of call order: {order}")
    for name, seen in arrivals.items():
        for intent_id in seen.keys() - committed_ids:
            texts = [body for _, body in seen[intent_id]]
            problems.append(f"{name} {intent_id} {texts} arrived; no commit carried it")

    lines = sum(1 for message, _ in logged if message == "Committed DB transaction")
    if lines != len(commits):
        problems.append(
            f"{lines} 'Committed DB transaction' lines for {len(commits)} commits"
        )
    handed_off = sum(
        1 for intents in commits for intent in intents if intent.channel in pooled
    )
    failed_in_pool = sum(1 for i in retried if durable.failed[i] in pooled)
    expected_stats = BackgroundStats(
        handed_off=handed_off,
        delivered=handed_off - failed_in_pool,
        failed=failed_in_pool,
    )
    stats = background_stats(app)
    if stats != expected_stats:
        problems.append(f"background delivery: {stats}, not {expected_stats}")
    if celery is not None:
        problems += check_celery(celery, celery_names, commits)
    return problems


def check_celery(
    celery: CeleryRun, channels: set[str], commits: list[list[Intent]]
) -> list[str]:
    """What went wrong between the commits and the worker.

    Each committed intent of a celery channel was published exactly once
    (the fast path's or the drainer's publish), those of one commit in call
    order, and nothing else was (a rolled-back request publishes nothing);
    the guard holds each as ``done``; the wait for the worker ended well.
    """
    problems = [celery.problem] if celery.problem else []
    times: dict[str, list[int]] = {}
    for position, intent_id in enumerate(celery.published):
        times.setdefault(intent_id, []).append(position)
    committed: set[str] = set()
    for intents in commits:
        mine = [i for i in intents if i.channel in channels]
        positions: list[int] = []
        for intent in mine:
            committed.add(intent.id)
            published = times.get(intent.id, [])
            if len(published) != 1:
                problems.append(
                    f"celery intent {intent.id} ({text(intent)!r}) published"
                    f" {len(published)} times"
                )
            positions.extend(published)
        if positions != sorted(positions):
            problems.append(
                f"celery intents of one commit published out of call order:"
                f" {[text(i) for i in mine]}"
            )
    for intent_id in times.keys() - committed:
        problems.append(f"celery task {intent_id} published; no commit carried it")
    if celery.not_done:
        problems.append(
            f"{len(celery.not_done)} published intents not done in the guard:"
            f" {celery.not_done[:5]}"
        )
    return problems


def check_outbox(
    durable: DurableRun,
    durable_channels: t.Collection[str],
    retried: set[str],
    outage: bool,
) -> list[str]:
    """What went wrong in the outbox: ``retried`` failed on the fast path.

    Each of them must have been retried once (attempt 1, then the drainer's
    2), nothing else failed or was claimed, nothing went dead, and the outbox
    must end empty (delivered rows are deleted).
    """
    problems = [
        f"{channel} intent {intent_id} failed"
        for intent_id, channel in durable.failed.items()
        if intent_id not in retried
    ]
    if outage and not retried:
        problems.append("no email failed during the outage")
    if not durable_channels:
        return problems
    if sorted(durable.retrying) != sorted((intent_id, 1) for intent_id in retried):
        problems.append(
            f"{len(durable.retrying)} retries for {len(retried)} failed emails:"
            f" {sorted(durable.retrying)[:5]}..."
        )
    if durable.dead:
        problems.append(f"dead in the outbox: {durable.dead}")
    waiting = {"pending": len(retried)} if retried else {}
    if durable.before_drain != waiting:
        problems.append(
            f"the outbox held {durable.before_drain} after the requests' delivery,"
            f" not {waiting}"
        )
    drained = DrainStats(claimed=len(retried), delivered=len(retried))
    if durable.drained != drained:
        problems.append(f"the drainer did {durable.drained}, not {drained}")
    if durable.after_drain:
        problems.append(f"the outbox ends with {durable.after_drain}, not empty")
    return problems


_celery_runs: weakref.WeakKeyDictionary[Flask, CeleryRun] = weakref.WeakKeyDictionary()
"""An app of :func:`loaded_app` with a celery channel -> its worker and queue."""


@contextlib.contextmanager
def loaded_app(
    database_url: str,
    smtp: Mailbox,
    delivery: str = "inline",
    *,
    redis_url: str | None = None,
    broker_url: str | None = None,
) -> t.Iterator[tuple[Flask, LogRecords]]:
    """The sample app on a fresh schema, its log collected instead of printed.

    :param delivery: a key of :data:`DELIVERIES`: which channels deliver on
        ``"background"`` or ``"celery"``, which are durable (with
        :data:`DURABLE_RETRY`; the outbox table is then created, and dropped
        with the schema). The pool's threads end with the block.
    :param redis_url: with a celery channel, the Redis of the Celery broker
        and of the guard (default ``NOTIFYQUEUE_TEST_REDIS_URL``). A real
        worker process (``sample_app.make_celery``, solo pool) is started
        with the app's own configuration (as ``FLASK_*`` variables), on a
        queue of its own, and stopped (by pid) with the block; the queue and
        the guard's keys of the run are then deleted.
    :param broker_url: the broker URL the app publishes to, if not
        ``redis_url`` (a :class:`BrokerOutage`'s proxy); the worker always
        reaches ``redis_url`` directly.
    """
    from sample_app import DEFAULT_CONFIG, create_app
    from sample_app.extensions import db
    from sample_app.logs import configure_logging

    extra = DELIVERIES[delivery]
    celery_queue: str | None = None
    if any(options.get("delivery") == "celery" for options in extra.values()):
        from .celery_support import REDIS_URL, unique_name

        redis_url = redis_url or REDIS_URL
        celery_queue = unique_name("nq-load")
    channels = {
        name: options
        | extra[name]
        | (DURABLE_RETRY if extra[name].get("durable") else {})
        | (
            {"celery_queue": celery_queue}
            if extra[name].get("delivery") == "celery"
            else {}
        )
        for name, options in DEFAULT_CONFIG["NOTIFYQUEUE_CHANNELS"].items()
    }
    config = {
        "SQLALCHEMY_DATABASE_URI": database_url,
        "NOTIFYQUEUE_CHANNELS": channels,
        "NOTIFYQUEUE_BACKGROUND_QUEUE": BACKGROUND_QUEUE,
    } | smtp.config()
    worker_config = config
    if celery_queue is not None:
        assert redis_url is not None
        celery_config = DEFAULT_CONFIG["CELERY"] | {
            "broker_url": redis_url,
            "broker_connection_retry_on_startup": True,
        }
        worker_config = config | {
            "CELERY": celery_config,
            "NOTIFYQUEUE_CELERY_GUARD": redis_url,
            "NOTIFYQUEUE_CELERY_RETAIN": CELERY_RETAIN,
        }
        config = worker_config | {
            "CELERY": celery_config | {"broker_url": broker_url or redis_url}
        }
    app = create_app(config)
    if state_of(app).durable:
        with app.app_context():
            outbox.create(db.engine)
    with contextlib.ExitStack() as stack:
        devnull = stack.enter_context(open(os.devnull, "w"))
        configure_logging(app, stream=devnull)
        records = LogRecords()
        app.logger.addHandler(records)

        @stack.callback
        def drop() -> None:
            app.logger.removeHandler(records)
            with app.app_context():
                db.session.remove()
                db.drop_all()
                outbox.metadata.drop_all(db.engine)
                db.engine.dispose()

        if celery_queue is not None:
            assert redis_url is not None
            celery = CeleryRun(redis_url, celery_queue)
            stack.callback(_celery_runs.pop, app, None)
            _celery_runs[app] = celery
            stack.enter_context(celery_worker(celery, worker_config))
        stack.callback(testing.shutdown, app, timeout=SETTLE_TIMEOUT)
        yield app, records


@contextlib.contextmanager
def celery_worker(celery: CeleryRun, config: dict[str, t.Any]) -> t.Iterator[None]:
    """A real worker of the sample app (``sample_app.make_celery``) on
    ``celery.queue``, with ``config``; then the queue and the run's guard
    keys are deleted. The worker is stopped by pid (SIGTERM, then SIGKILL
    after 10 s) whatever happens, even if it never became ready."""
    from .celery_support import Worker, delete_queue

    directory = tempfile.TemporaryDirectory(prefix="nq-load-")
    # Each key as from_prefixed_env reads it: JSON, so dicts and numbers
    # arrive as they are.
    env = {f"FLASK_{key}": json.dumps(value) for key, value in config.items()}
    worker = Worker(
        "sample_app.make_celery:celery_app",
        celery.queue,
        Path(directory.name) / "worker.log",
        env=env,
    )
    celery.worker = worker
    try:
        worker.start(WORKER_START_TIMEOUT)
        yield
    finally:
        try:
            worker.stop()
        finally:
            try:
                delete_queue(celery.redis_url, celery.queue)
                forget_guard(celery)
            finally:
                directory.cleanup()


def redis_unreachable(url: str) -> str | None:
    """Why the Redis at ``url`` cannot be used, or None."""
    try:
        client = _redis(url)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means: not usable here
        return f"Redis at {url} unreachable: {type(exc).__name__}: {exc}"
    return None


def _exit_on_sigterm(signum: int, frame: t.Any) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--delivery",
        choices=DELIVERIES,
        default="inline",
        help="which channels deliver on 'background', and which are durable"
        " (default: none)",
    )
    parser.add_argument(
        "--smtp-down-first-half",
        action="store_true",
        help="the SMTP server is down until half the requests are answered"
        " (a durable --delivery only)",
    )
    parser.add_argument(
        "--broker-down-first-half",
        action="store_true",
        help="the Celery broker (a proxy in front of Redis) is down until half"
        " the requests are answered (celery-durable-mail only)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "NOTIFYQUEUE_TEST_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        ),
    )
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the finally blocks stop the Celery
    # worker (in a session of its own, it would outlive this process).
    os_signal.signal(os_signal.SIGTERM, _exit_on_sigterm)
    durable = any(o.get("durable") for o in DELIVERIES[args.delivery].values())
    celery = any(
        o.get("delivery") == "celery" for o in DELIVERIES[args.delivery].values()
    )
    if args.smtp_down_first_half and (celery or not durable):
        parser.error(
            "--smtp-down-first-half needs a durable --delivery (durable-mail or"
            " durable-background-mail): without the outbox nothing retries the"
            " emails the outage fails"
        )
    if args.broker_down_first_half and not (durable and celery):
        parser.error(
            "--broker-down-first-half needs --delivery celery-durable-mail:"
            " without the outbox nothing publishes the emails the outage fails"
        )
    if args.broker_down_first_half and args.smtp_down_first_half:
        parser.error("one outage at a time")
    redis_url = None
    if celery:
        from .celery_support import REDIS_URL

        redis_url = REDIS_URL
        reason = redis_unreachable(redis_url)
        if reason is not None:
            print(reason, file=sys.stderr)
            return 2
    schema = f"notifyqueue_load_{os.getpid()}"
    engine = sa.create_engine(args.database_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options=-csearch_path%3D{schema}"
    # The outage's failures are expected, and counted in the report: keep
    # notifyqueue's ERROR records (and their tracebacks) out of stderr.
    notifyqueue_log = LogRecords()
    logging.getLogger("notifyqueue").addHandler(notifyqueue_log)
    try:
        with contextlib.ExitStack() as stack:
            smtp: Mailbox
            outage: Outage | None = None
            broker_url = None
            if args.smtp_down_first_half:
                smtp = stack.enter_context(smtp_outage())
            else:
                smtp, stop = start_smtp_server()
                stack.callback(stop)
            if args.broker_down_first_half:
                assert redis_url is not None
                broker = stack.enter_context(broker_outage(redis_url))
                outage, broker_url = broker, broker.url
            app, records = stack.enter_context(
                loaded_app(
                    url,
                    smtp,
                    args.delivery,
                    redis_url=redis_url,
                    broker_url=broker_url,
                )
            )
            report = run(app, smtp, records, args.requests, args.clients, outage=outage)
    finally:
        logging.getLogger("notifyqueue").removeHandler(notifyqueue_log)
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
    print(report.summary())
    errors = [r for r in notifyqueue_log.records if r.levelno >= logging.ERROR]
    if errors:
        print(f"notifyqueue logged {len(errors)} errors; the first:")
        print("  ", errors[0].getMessage())
    for problem in report.problems[:20]:
        print("  ", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
