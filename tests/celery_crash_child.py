"""A web process with a durable Celery channel that dies, for test_celery_crash.py.

Run as ``python -m tests.celery_crash_child POINT --out DIR`` from the
checkout, with ``NOTIFYQUEUE_TEST_CELERY_CONFIG`` set: it builds the app of
:mod:`tests.celery_app` from that config, as the drainer
(``flask --app tests.celery_app:flask_app notifyqueue drain``) and the worker
(``celery -A tests.celery_app:celery_app worker``) do, so all three share one
database, one broker queue and one channel (a durable
:class:`~tests.celery_app.FileChannel` named ``file``).

It resets the tables (``item`` and the outbox), then runs one transaction
that rolls back (an ``Item`` row and one intent), one that commits (an
``Item`` row and ``--first`` intents: the fast path publishes them and marks
their rows done), and a last one (an ``Item`` row and ``--last`` intents)
under ``crash_at(POINT, kill=True)``: the process dies by ``SIGKILL`` at
POINT, ``after_commit`` (committed, nothing published) or ``before_ack``
(published, the rows not marked). Before each transaction ends it appends
``{"name": ..., "ids": [...], "commit": bool}`` to ``DIR/intents.jsonl`` in
one ``write()``, so the line survives the kill. Still alive after the last
commit, it exits 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flask import Flask

from notifyqueue import enqueue
from notifyqueue.outbox.fast_path import CRASH_POINTS
from notifyqueue.testing import crash_at

from . import celery_app
from .helpers import Item, db
from .outbox_child import Journal, reset_tables

POINTS = tuple(point for point in CRASH_POINTS if point != "mid_send")


def transaction(
    app: Flask, journal: Journal, name: str, intents: int, commit: bool = True
) -> None:
    """An ``Item`` row and ``intents`` durable intents ``"<name> <n>"``."""
    with app.app_context():
        db.session.add(Item(name=name))
        ids = []
        for number in range(1, intents + 1):
            intent = enqueue("file", f"{name} {number}")
            assert intent is not None
            ids.append(intent.id)
        journal.note(name, ids, commit)
        if commit:
            db.session.commit()
        else:
            db.session.rollback()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("point", choices=POINTS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--first", type=int, default=2)
    parser.add_argument("--last", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    # The app tests.celery_app built from NOTIFYQUEUE_TEST_CELERY_CONFIG at import.
    app = celery_app.flask_app
    reset_tables(app)
    journal = Journal(args.out / "intents.jsonl")
    transaction(app, journal, "rolled-back", 1, commit=False)
    transaction(app, journal, "commit-1", args.first)
    with crash_at(args.point, app, kill=True):
        transaction(app, journal, "commit-2", args.last)
    raise SystemExit(2)  # still alive: the crash never came


if __name__ == "__main__":
    main()
