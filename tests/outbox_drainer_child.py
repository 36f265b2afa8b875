"""A drainer process, for tests/test_outbox_concurrency.py; and the channels it uses.

Run as ``python -m tests.outbox_drainer_child --url URL --out FILE --ready FILE
--report FILE`` from the checkout. The child builds an app whose one channel,
``file`` (a durable :class:`FileChannel`), appends each delivered intent id to
``--out``; opens a database connection; creates ``--ready``; then blocks on
its stdin until the test writes a line (the start barrier: every child is
released by the same few writes, with nothing left to import or connect).
It then runs ``notifyqueue.outbox.drain(app, once=True, batch=--batch)`` and
writes ``--report`` (JSON, written whole): its pid, the drain's stats, and
when the drain started and finished on ``time.monotonic()`` (system-wide
CLOCK_MONOTONIC, so the test can compare children). End of stdin without a
line means the test gave up: the child exits 1 without draining.

Log records of WARNING and above go to stderr, where the test looks for any
"database is locked".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import typing as t
from pathlib import Path

import sqlalchemy as sa
from flask import Flask

from notifyqueue import Channel, Intent, NotifyQueue
from notifyqueue.outbox import drain

from .helpers import db

CHILD = "tests.outbox_drainer_child"


class FileChannel(Channel):
    """Appends each intent id it is sent to ``path``, one line each.

    The file is opened with ``O_APPEND`` and each line is one ``write()``
    (unbuffered: nothing waits in the process), so what the test reads is
    what was delivered, even from a process killed right after.

    :param path: the file to append to; created if missing.
    """

    def __init__(self, name: str, *, path: str) -> None:
        super().__init__(name)
        self.path = path
        self._fd: int | None = None

    def send(self, intents: t.Sequence[Intent]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for intent in intents:
            line = f"{intent.id}\n".encode()
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path}: {written} of {len(line)}")


class MemoryChannel(Channel):
    """Keeps each delivered intent id with the thread that delivered it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lock = threading.Lock()
        self.delivered: list[tuple[str, int]] = []

    def send(self, intents: t.Sequence[Intent]) -> None:
        thread = threading.get_ident()
        with self._lock:
            self.delivered.extend((intent.id, thread) for intent in intents)


def make_app(name: str, url: str, channel: dict[str, t.Any]) -> Flask:
    """An app on ``url`` whose one channel, ``channel["name"]``, is durable.

    The outbox table is the test's to create; this creates no table.
    """
    options = dict(channel)
    channel_name = options.pop("name")
    app = Flask(name)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        NOTIFYQUEUE_CHANNELS={channel_name: {**options, "durable": True}},
    )
    db.init_app(app)
    NotifyQueue(app)
    return app


def write_json(path: Path, data: dict[str, t.Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD}")
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    app = make_app(
        "drainer_child",
        args.url,
        {"name": "file", "type": f"{CHILD}:FileChannel", "path": str(args.out)},
    )
    # Connect before the barrier, so that no child spends its start on it.
    with app.app_context(), db.engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    args.ready.touch()
    if not sys.stdin.readline():
        print("the test closed stdin without a start line", file=sys.stderr)
        return 1
    started_at = time.monotonic()
    stats = drain(app, once=True, batch=args.batch)
    finished_at = time.monotonic()
    write_json(
        args.report,
        {
            "pid": os.getpid(),
            "stats": dataclasses.asdict(stats),
            "started_at": started_at,
            "finished_at": finished_at,
        },
    )
    with app.app_context():
        db.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
