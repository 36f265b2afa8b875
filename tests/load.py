"""Load the sample app through a threaded HTTP server; account for each notification.

``tests/test_load.py`` runs it at CI size. For a larger run::

    python -m tests.load --requests 50000 --clients 16

(PostgreSQL from ``NOTIFYQUEUE_TEST_POSTGRES_URL``, default the local one;
``--database-url`` picks another.) ``--delivery background-mail`` puts the
mail channel on ``"delivery": "background"``, ``--delivery background`` every
channel; the checks then wait for the pool to finish first.

Each request changes one froggy's colour to a value no other request uses,
so every log line and email names the request that caused it. One request in
ten changes it twice in one batch (its two emails must arrive in that
order). One request in ten is rolled back instead: a batch that fails on an
unknown froggy (404) or on a taken name at COMMIT (409), after queueing its
own colour change. Each commit's intents are recorded from
``batch_committed``; then every committed request must have committed exactly
its own intents, once, every rolled-back request none, and each committed
intent must have arrived exactly once (counted by intent id at the SMTP server
and in the log), in call order within its commit.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import re
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from notifyqueue import BackgroundStats, Intent, background_stats, signals, testing
from notifyqueue.state import state_of

from .smtp import SMTPServer, start_smtp_server

FROGGIES = 16
KERMIT = "kermit-0"  # a taken name: creating it again fails at COMMIT

DELIVERIES: dict[str, dict[str, str]] = {
    "inline": {"log": "inline", "mail": "inline"},
    "background-mail": {"log": "inline", "mail": "background"},
    "background": {"log": "background", "mail": "background"},
}
"""``--delivery`` choices: each of the sample app's channels -> its delivery mode."""

# More commits than any run makes: a full queue would deliver inline instead,
# which the checks count as a problem.
BACKGROUND_QUEUE = 1_000_000
SETTLE_TIMEOUT = 300.0
"""Seconds the checks wait for background delivery to finish."""

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
        connection.request(
            method, path, json.dumps(payload), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        self.status = response.status
        self.body = json.loads(response.read())


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
class Report:
    requests: int
    clients: int
    delivery: dict[str, str]
    seconds: float
    settled: float
    committed: int
    rolled_back: int
    emails: int
    log_lines: int
    stats: BackgroundStats
    problems: list[str]
    plans: list[Request] = field(repr=False, default_factory=list)
    commits: list[list[Intent]] = field(repr=False, default_factory=list)
    """Each committed batch's intents, as ``batch_committed`` sent them."""

    def summary(self) -> str:
        modes = ", ".join(f"{name} {mode}" for name, mode in self.delivery.items())
        return (
            f"{self.requests} requests from {self.clients} clients ({modes}) in"
            f" {self.seconds:.1f} s ({self.requests / self.seconds:.0f}/s),"
            f" every notification out at {self.settled:.1f} s:"
            f" {self.committed} committed, {self.rolled_back} rolled back;"
            f" {self.emails} emails and {self.log_lines} notification log lines"
            f" counted; background {self.stats}; {len(self.problems)} problems"
        )


def run(
    app: Flask, smtp: SMTPServer, records: LogRecords, requests: int, clients: int
) -> Report:
    """Send the requests from ``clients`` threads and check every notification."""
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

    def record(sender: Flask, *, intents: list[Intent], **kwargs: t.Any) -> None:
        commits.append(list(intents))  # list.append is atomic

    errors: list[BaseException] = []
    signals.batch_committed.connect(record, sender=app, weak=False)
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
        if errors:
            raise errors[0]
        with contextlib.suppress(TimeoutError):  # check() reports it
            settle(app)
        settled = time.perf_counter() - started
        problems = check(app, plans, smtp, records, commits)
    finally:
        signals.batch_committed.disconnect(record, sender=app)
    committed = sum(1 for request in plans if request.committed)
    return Report(
        requests,
        clients,
        dict(state_of(app).delivery),
        seconds,
        settled,
        committed,
        requests - committed,
        len(smtp.messages),
        sum(1 for _, intent_id in records.messages() if intent_id is not None),
        background_stats(app),
        problems,
        plans,
        commits,
    )


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
    smtp: SMTPServer,
    records: LogRecords,
    commits: list[list[Intent]],
) -> list[str]:
    """Every way the notifications differ from what the requests earned.

    Waits for background delivery to finish (:func:`settle`) before counting.
    """
    problems: list[str] = []
    try:
        settle(app)
    except TimeoutError as exc:
        problems.append(str(exc))
    background = {
        name for name, mode in state_of(app).delivery.items() if mode != "inline"
    }
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
        # The answer lists the inline channels' intents; the rest were handed off.
        notifications = request.body["notifications"]
        if notifications["failed"]:
            problems.append(
                f"request {request.number}: failed {notifications['failed']}"
            )
        answered = sorted(item["id"] for item in notifications["dispatched"])
        inline = sorted(i.id for i in intents if i.channel not in background)
        if answered != inline:
            problems.append(
                f"request {request.number}: answered {answered} for {inline}"
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
        1 for intents in commits for intent in intents if intent.channel in background
    )
    expected_stats = BackgroundStats(handed_off=handed_off, delivered=handed_off)
    stats = background_stats(app)
    if stats != expected_stats:
        problems.append(f"background delivery: {stats}, not {expected_stats}")
    return problems


@contextlib.contextmanager
def loaded_app(
    database_url: str, smtp: SMTPServer, delivery: str = "inline"
) -> t.Iterator[tuple[Flask, LogRecords]]:
    """The sample app on a fresh schema, its log collected instead of printed.

    :param delivery: a key of :data:`DELIVERIES`: which channels deliver on
        ``"background"``. The pool's threads end with the block.
    """
    from sample_app import DEFAULT_CONFIG, create_app
    from sample_app.extensions import db
    from sample_app.logs import configure_logging

    modes = DELIVERIES[delivery]
    channels = {
        name: {**options, "delivery": modes[name]}
        for name, options in DEFAULT_CONFIG["NOTIFYQUEUE_CHANNELS"].items()
    }
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": database_url,
            "NOTIFYQUEUE_CHANNELS": channels,
            "NOTIFYQUEUE_BACKGROUND_QUEUE": BACKGROUND_QUEUE,
        }
        | smtp.config()
    )
    with open(os.devnull, "w") as devnull:
        configure_logging(app, stream=devnull)
        records = LogRecords()
        app.logger.addHandler(records)
        try:
            yield app, records
        finally:
            try:
                testing.shutdown(app, timeout=SETTLE_TIMEOUT)
            finally:
                app.logger.removeHandler(records)
                with app.app_context():
                    db.session.remove()
                    db.drop_all()
                    db.engine.dispose()


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
        help="which channels deliver on 'background' (default: none)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "NOTIFYQUEUE_TEST_POSTGRES_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        ),
    )
    args = parser.parse_args(argv)
    schema = f"notifyqueue_load_{os.getpid()}"
    engine = sa.create_engine(args.database_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options=-csearch_path%3D{schema}"
    smtp, stop = start_smtp_server()
    try:
        with loaded_app(url, smtp, args.delivery) as (app, records):
            report = run(app, smtp, records, args.requests, args.clients)
    finally:
        stop()
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
    print(report.summary())
    for problem in report.problems[:20]:
        print("  ", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
