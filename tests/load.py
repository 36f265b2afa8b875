"""Load the sample app through a threaded HTTP server; account for each notification.

``tests/test_load.py`` runs it at CI size. For a larger run::

    python -m tests.load --requests 50000 --clients 16

(PostgreSQL from ``NOTIFYQUEUE_TEST_POSTGRES_URL``, default the local one;
``--database-url`` picks another.)

Each request changes one froggy's colour to a value no other request uses,
so every log line and email names the request that caused it. One request in
ten is rolled back instead: a batch that fails on an unknown froggy (404) or
on a taken name at COMMIT (409), after queueing its own colour change.
Then every committed request must have produced exactly its own log line and
its own email, once, and every rolled-back request nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from .smtp import SMTPServer, start_smtp_server

FROGGIES = 16
KERMIT = "kermit-0"  # a taken name: creating it again fails at COMMIT


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
    kind: str  # "commit", "missing" (404) or "conflict" (409)
    status: int | None = None
    body: dict[str, t.Any] = field(default_factory=dict)

    @property
    def colour(self) -> str:
        return f"c{self.number}"

    def send(self, connection: http.client.HTTPConnection) -> None:
        if self.kind == "commit":
            method, path = "PUT", f"/froggies/{self.froggy_id}/colour"
            payload: dict[str, t.Any] = {"colour": self.colour}
        else:
            second = (
                {"op": "jump", "id": 10**9, "jump_height": "1 m"}
                if self.kind == "missing"
                else {"op": "create", "name": KERMIT}
            )
            method, path = "POST", "/batch"
            payload = {
                "operations": [
                    {"op": "colour", "id": self.froggy_id, "colour": self.colour},
                    second,
                ]
            }
        connection.request(
            method, path, json.dumps(payload), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        self.status = response.status
        self.body = json.loads(response.read())


def plan(requests: int, froggy_ids: list[int]) -> list[Request]:
    """Nine commits in ten; the tenth alternates between a 404 and a 409."""
    plans = []
    for number in range(requests):
        if number % 10 < 9:
            kind = "commit"
        else:
            kind = "missing" if number // 10 % 2 == 0 else "conflict"
        plans.append(Request(number, froggy_ids[number % len(froggy_ids)], kind))
    return plans


@dataclass
class Report:
    requests: int
    clients: int
    seconds: float
    committed: int
    rolled_back: int
    emails: int
    log_lines: int
    problems: list[str]
    plans: list[Request] = field(repr=False, default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.requests} requests from {self.clients} clients in"
            f" {self.seconds:.1f} s ({self.requests / self.seconds:.0f}/s):"
            f" {self.committed} committed, {self.rolled_back} rolled back;"
            f" {self.emails} emails and {self.log_lines} notification log lines"
            f" counted; {len(self.problems)} problems"
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
    errors: list[BaseException] = []
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
    problems = check(plans, smtp, records)
    committed = sum(1 for request in plans if request.kind == "commit")
    return Report(
        requests,
        clients,
        seconds,
        committed,
        requests - committed,
        len(smtp.messages),
        sum(1 for _, intent_id in records.messages() if intent_id is not None),
        problems,
        plans,
    )


def check(plans: list[Request], smtp: SMTPServer, records: LogRecords) -> list[str]:
    """Every way the notifications differ from what the requests earned."""
    problems: list[str] = []
    emails: dict[str, list[str]] = {}
    for message in smtp.messages:
        body = message.get_content().strip()
        emails.setdefault(message["X-Notifyqueue-Intent"], []).append(body)
    logged = records.messages()
    lines: dict[str, list[str]] = {}
    for message, intent_id in logged:
        if intent_id is not None:
            lines.setdefault(intent_id, []).append(message)
    expected_emails: set[str] = set()
    expected_lines: set[str] = set()
    for request in plans:
        if request.kind != "commit":
            status = 404 if request.kind == "missing" else 409
            if request.status != status or "notifications" in request.body:
                problems.append(
                    f"request {request.number}: {request.status}, {request.body}"
                )
            continue
        if request.status != 200:
            problems.append(
                f"request {request.number}: {request.status}, {request.body}"
            )
            continue
        notifications = request.body["notifications"]
        if notifications["failed"]:
            problems.append(
                f"request {request.number}: failed {notifications['failed']}"
            )
        ids = {n["channel"]: n["id"] for n in notifications["dispatched"]}
        mail, log = ids.get("mail"), ids.get("log")
        expected_emails.add(str(mail))
        expected_lines.add(str(log))
        body = f"Froggy: {request.froggy_id}; new colour: {request.colour}"
        line = (
            f"Froggy colour updated: {request.froggy_id}; new value: {request.colour}"
        )
        if emails.get(str(mail)) != [body]:
            problems.append(f"request {request.number}: emails {emails.get(str(mail))}")
        if lines.get(str(log)) != [line]:
            problems.append(
                f"request {request.number}: log lines {lines.get(str(log))}"
            )
    for intent_id in emails.keys() - expected_emails:
        problems.append(f"an email no committed request earned: {emails[intent_id]}")
    for intent_id in lines.keys() - expected_lines:
        problems.append(f"a log line no committed request earned: {lines[intent_id]}")
    commits = sum(1 for message, _ in logged if message == "Committed DB transaction")
    committed = sum(1 for request in plans if request.kind == "commit")
    if commits != committed:
        problems.append(
            f"{commits} 'Committed DB transaction' lines for {committed} commits"
        )
    return problems


@contextlib.contextmanager
def loaded_app(
    database_url: str, smtp: SMTPServer
) -> t.Iterator[tuple[Flask, LogRecords]]:
    """The sample app on a fresh schema, its log collected instead of printed."""
    from sample_app import create_app
    from sample_app.extensions import db
    from sample_app.logs import configure_logging

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url} | smtp.config())
    with open(os.devnull, "w") as devnull:
        configure_logging(app, stream=devnull)
        records = LogRecords()
        app.logger.addHandler(records)
        try:
            yield app, records
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
        with loaded_app(url, smtp) as (app, records):
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
