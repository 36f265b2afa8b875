"""A process with a ``"background"`` mail channel, for tests/test_delivery_process.py.

Run as ``python -m tests.background_child SCENARIO --port P --out DIR`` from
the checkout. Each scenario commits emails (one per commit, each with an
``Item`` row in a SQLite file) to the SMTP server on ``--port``, and writes
what it saw as JSON files in ``--out`` (``report.json``; with ``fork`` also
``child.json``), each written whole (a reader never sees half of one):

- ``exit``: commit, write the report, then let the interpreter exit normally
  (its exit handler drains the pool for ``--timeout`` seconds);
- ``sleep``: commit, write the report, then sleep until a signal ends the
  process (``--exit-on-sigterm`` installs a SIGTERM handler that exits
  Python normally; without it SIGTERM's default action kills the process);
- ``fork``: commit (so the pool has threads and queued work), fork; the
  child commits emails of its own, waits for them and exits normally; the
  parent waits for the child, then for its own emails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import typing as t
from pathlib import Path

from flask import Flask
from flask_mail import Mail

from notifyqueue import NotifyQueue, background_stats, enqueue
from notifyqueue.testing import wait

from .helpers import Item, db

PREFIX = "notifyqueue-background-"
TEMPLATE = {"subject": "Saved {name}", "body": "Item {name} was saved."}


def pool_threads() -> list[str]:
    """Names of this process's live background pool threads, sorted."""
    return sorted(
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith(PREFIX) and thread.is_alive()
    )


def write_json(path: Path, data: dict[str, t.Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def make_app(args: argparse.Namespace) -> Flask:
    app = Flask("bgchild")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{args.out / 'app.db'}",
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=args.port,
        MAIL_SUPPRESS_SEND=False,
        MAIL_DEFAULT_SENDER="notify@example.com",
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "recipients": ["ops@example.com"],
                "delivery": "background",
            }
        },
        NOTIFYQUEUE_BACKGROUND_THREADS=args.threads,
        NOTIFYQUEUE_SHUTDOWN_TIMEOUT=args.timeout,
    )
    db.init_app(app)
    Mail(app)
    NotifyQueue(app)
    with app.app_context():
        db.create_all()
    return app


def commit_emails(app: Flask, tag: str, count: int) -> list[str]:
    """Commit ``count`` emails, one commit each; return their intent ids."""
    ids = []
    with app.app_context():
        for number in range(count):
            name = f"{tag}-{number}"
            db.session.add(Item(name=name))
            intent = enqueue("mail", TEMPLATE, name=name)
            assert intent is not None
            db.session.commit()
            ids.append(intent.id)
    return ids


def stats(app: Flask) -> dict[str, int]:
    return dataclasses.asdict(background_stats(app))


def run_child(app: Flask, args: argparse.Namespace) -> None:
    report: dict[str, t.Any] = {
        "pid": os.getpid(),
        "threads_after_fork": pool_threads(),
        "stats_after_fork": stats(app),
    }
    # SQLAlchemy's advice for a fork: never reuse the parent's connections.
    with app.app_context():
        db.engine.dispose(close=False)
    report["ids"] = commit_emails(app, "child", args.child_commits)
    report["threads_after_commit"] = pool_threads()
    wait(app, timeout=20)
    report["stats"] = stats(app)
    write_json(args.out / "child.json", report)


def wait_for_child(pid: int, timeout: float) -> int:
    """The child's wait status; kill it (by pid) if it is not done in time."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.05)
        raise TimeoutError(f"forked child {pid} still running after {timeout} s")
    finally:
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # already reaped above


def run_fork(app: Flask, args: argparse.Namespace, report: dict[str, t.Any]) -> None:
    report["ids"] = commit_emails(app, "parent", args.commits)
    report["threads_at_fork"] = pool_threads()
    report["stats_at_fork"] = stats(app)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run_child(app, args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
        # Exit Python normally, so the child's own exit handler runs too.
        sys.exit(code)
    report["child_pid"] = pid
    status = wait_for_child(pid, timeout=40)
    report["child_exit_code"] = os.waitstatus_to_exitcode(status)
    wait(app, timeout=30)
    report["stats"] = stats(app)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["exit", "sleep", "fork"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--commits", type=int, default=4)
    parser.add_argument("--child-commits", type=int, default=2)
    parser.add_argument("--exit-on-sigterm", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    if args.exit_on_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    report: dict[str, t.Any] = {"threads_at_import": pool_threads()}
    app = make_app(args)
    report["threads_after_init_app"] = pool_threads()
    if args.scenario == "fork":
        run_fork(app, args, report)
        write_json(args.out / "report.json", report)
        return
    with app.app_context():
        # Queued, not committed yet: still no thread.
        enqueue("mail", TEMPLATE, name="never-committed")
        report["threads_before_commit"] = pool_threads()
        db.session.rollback()
    report["ids"] = commit_emails(app, "email", args.commits)
    report["threads_after_commit"] = pool_threads()
    report["stats_after_commit"] = stats(app)
    # CLOCK_MONOTONIC is system-wide: the test compares it with its own clock.
    report["done_at"] = time.monotonic()
    write_json(args.out / "report.json", report)
    if args.scenario == "sleep":
        time.sleep(60)


if __name__ == "__main__":
    main()
