"""A process with a durable mail channel, for tests/test_outbox_crash.py.

Run as ``python -m tests.outbox_child SCENARIO --out DIR`` from the checkout;
the drainer runs as ``python -m flask --app "tests.outbox_child:create_app()"
notifyqueue drain ...``. Both build the app from the environment (see
:func:`create_app`), so the test gives the child and the drainer one
database and one SMTP server.

Every scenario first resets the tables (``item`` and the outbox), then runs
one transaction that rolls back (an ``Item`` row and an email), then
``--commits`` transactions that each add an ``Item`` row and ``--emails``
durable emails. Before each transaction ends it appends a line to
``DIR/intents.jsonl``: ``{"name": ..., "ids": [...], "commit": bool}``, one
``write()`` each, so a line survives a ``SIGKILL`` that follows it. The
``Item`` rows in the database then tell which transactions committed.

- ``after-commit``, ``before-ack``: every commit but the last is delivered
  and acknowledged by the fast path; the last runs under
  ``crash_at(point, kill=True)``, so the process dies by ``SIGKILL`` there;
- ``during-data``: before the last commit, creates ``DIR/ready`` and waits
  (up to 30 s) for the test to create ``DIR/go``; then commits, and the test
  kills the process while the SMTP server holds that commit's first DATA;
- ``seed``: every commit runs under ``crash_at("after_commit")`` (no kill):
  nothing is delivered, the rows stay leased for ``NOTIFYQUEUE_OUTBOX_LEASE``
  seconds; then the process exits normally, leaving the rows to a drainer.

A scenario that should have died and did not exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from flask import Flask
from flask_mail import Mail

from notifyqueue import NotifyQueue, enqueue, outbox
from notifyqueue.testing import crash_at

from .helpers import Item, db

SCENARIOS = ("after-commit", "before-ack", "during-data", "seed")
TEMPLATE = {"subject": "Saved {name} ({part})", "body": "Item {name}, part {part}."}
SENDER = "notify@example.com"
DATABASE_URL = "OUTBOX_CHILD_DATABASE_URL"
SMTP_PORT = "OUTBOX_CHILD_SMTP_PORT"
LEASE = "OUTBOX_CHILD_LEASE"
SHUTDOWN_TIMEOUT = "OUTBOX_CHILD_SHUTDOWN_TIMEOUT"


def create_app() -> Flask:
    """The app, from ``OUTBOX_CHILD_DATABASE_URL``, ``OUTBOX_CHILD_SMTP_PORT``,
    ``OUTBOX_CHILD_LEASE`` (NOTIFYQUEUE_OUTBOX_LEASE, default 1 s) and
    ``OUTBOX_CHILD_SHUTDOWN_TIMEOUT`` (NOTIFYQUEUE_SHUTDOWN_TIMEOUT, default
    10 s). Creates no table."""
    app = Flask("outboxchild")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ[DATABASE_URL],
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=int(os.environ[SMTP_PORT]),
        MAIL_SUPPRESS_SEND=False,
        MAIL_DEFAULT_SENDER=SENDER,
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "recipients": ["ops@example.com"],
                "delivery": "inline",
                "durable": True,
            }
        },
        NOTIFYQUEUE_OUTBOX_LEASE=float(os.environ.get(LEASE, "1")),
        NOTIFYQUEUE_SHUTDOWN_TIMEOUT=float(os.environ.get(SHUTDOWN_TIMEOUT, "10")),
    )
    db.init_app(app)
    Mail(app)
    NotifyQueue(app)
    return app


def reset_tables(app: Flask) -> None:
    """Fresh ``item`` and outbox tables (a PostgreSQL schema outlives a test)."""
    with app.app_context():
        db.drop_all()
        outbox.metadata.drop_all(db.engine)
        db.create_all()
        outbox.create(db.engine)
        db.engine.dispose()


class Journal:
    """``intents.jsonl``: one line per transaction, each in a single write()."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(self, name: str, ids: list[str], commit: bool) -> None:
        line = json.dumps({"name": name, "ids": ids, "commit": commit}) + "\n"
        os.write(self.fd, line.encode())


def transaction(
    app: Flask, journal: Journal, name: str, emails: int, commit: bool = True
) -> None:
    """An ``Item`` row and ``emails`` durable emails; committed or rolled back."""
    with app.app_context():
        db.session.add(Item(name=name))
        ids = []
        for part in range(1, emails + 1):
            intent = enqueue("mail", TEMPLATE, name=name, part=part)
            assert intent is not None
            ids.append(intent.id)
        journal.note(name, ids, commit)
        if commit:
            db.session.commit()
        else:
            db.session.rollback()


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout} s")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commits", type=int, default=3)
    parser.add_argument("--emails", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    app = create_app()
    reset_tables(app)
    journal = Journal(args.out / "intents.jsonl")
    transaction(app, journal, "rolled-back", 1, commit=False)
    names = [f"commit-{number}" for number in range(1, args.commits + 1)]
    if args.scenario == "seed":
        with crash_at("after_commit", app):
            for name in names:
                transaction(app, journal, name, args.emails)
        return
    for name in names[:-1]:
        transaction(app, journal, name, args.emails)
    if args.scenario == "during-data":
        (args.out / "ready").touch()
        wait_for(args.out / "go", timeout=30)
        transaction(app, journal, names[-1], args.emails)
    else:
        point = args.scenario.replace("-", "_")
        with crash_at(point, app, kill=True):
            transaction(app, journal, names[-1], args.emails)
    raise SystemExit(2)  # still alive: the crash never came


if __name__ == "__main__":
    main()
