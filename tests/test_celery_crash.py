"""Durable Celery delivery across real crashes: a web process SIGKILLed after COMMIT.

Each test runs ``tests/celery_crash_child.py`` in a subprocess, on a real
database (a SQLite file, or this run's PostgreSQL schema) and a real broker
(Redis, RabbitMQ); the child commits, then dies by a real ``SIGKILL`` in its
durable fast path (``crash_at(point, kill=True)``):

- ``after_commit``: the commit's rows are in the outbox, nothing published;
- ``before_ack``: every task published, the rows not marked done.

Then the real drainer (``flask notifyqueue drain --once``, a subprocess)
takes the rows once their lease has expired and publishes them; a real
worker (``celery -A tests.celery_app:celery_app worker --pool=solo``) runs
every task in the queue. Child, drainer and worker build one app from one
config (``NOTIFYQUEUE_TEST_CELERY_CONFIG``). Deliveries are counted where
they arrive: the file the durable :class:`~tests.celery_app.FileChannel`
appends to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from notifyqueue.celery.guard import attempts_key, state_key
from notifyqueue.outbox import table

from .celery_app import CONFIG_ENV, sent_lines
from .celery_support import MakeWorker, broker_kind, wait_until
from .test_celery import TARGET, file_channel, guard_url, make_config

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"
)
pytest_plugins = ["tests.celery_support"]

ROOT = Path(__file__).resolve().parent.parent
FIRST = 2
"""Intents of the commit the fast path publishes and marks done."""
LAST = 3
"""Intents of the commit the child dies in."""
LEASE = 1.0
"""NOTIFYQUEUE_OUTBOX_LEASE: how long the dead child's rows stay leased to it."""
MARGIN = 5.0
DRAINED = (
    "Drained: {n} claimed, {n} delivered, 0 to retry, 0 dead, 0 uncertain,"
    " {n} taken over from expired leases, 0 handed back."
)


@contextlib.contextmanager
def started(
    argv: list[str], environ: dict[str, str], out: Path, name: str
) -> t.Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in a session of its own; kill its group (by pid) at the end."""
    with (
        open(out / f"{name}.stdout", "wb") as stdout,
        open(out / f"{name}.stderr", "wb") as stderr,
    ):
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield popen
    finally:
        with contextlib.suppress(ProcessLookupError):  # it has exited
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)


def output(out: Path, name: str, stream: str = "stderr") -> str:
    return (out / f"{name}.{stream}").read_text(errors="replace")


def journal(out: Path) -> dict[str, list[str]]:
    """Transaction name -> its intent ids, as the child noted them."""
    lines = (out / "intents.jsonl").read_text().splitlines()
    return {entry["name"]: entry["ids"] for entry in map(json.loads, lines)}


@contextlib.contextmanager
def connected(database_url: str) -> t.Iterator[sa.Connection]:
    """A connection of this process's own, closed (with its engine) at the end."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def outbox_rows(database_url: str) -> dict[str, dict[str, t.Any]]:
    """intent_id -> the outbox row, as a dict."""
    with connected(database_url) as connection:
        rows = connection.execute(sa.select(table)).mappings().all()
    return {row["intent_id"]: dict(row) for row in rows}


def committed(database_url: str) -> set[str]:
    """The names of the ``Item`` rows that committed."""
    with connected(database_url) as connection:
        return set(connection.execute(sa.text("SELECT name FROM item")).scalars())


def queued(broker_url: str, queue: str) -> int:
    """How many tasks wait in ``queue`` (no worker consumes it yet)."""
    if broker_kind(broker_url) == "redis":
        client = redis.Redis.from_url(broker_url, socket_timeout=5)
        try:
            return int(client.llen(queue))
        finally:
            client.close()
    from kombu.connection import Connection

    with Connection(  # type: ignore[no-untyped-call]
        broker_url, connect_timeout=5
    ) as connection:
        # Passive: count, without declaring a queue nobody published to.
        declared = connection.default_channel.queue_declare(queue, passive=True)
        return int(declared.message_count)


@pytest.fixture
def forget_guard() -> t.Iterator[list[str]]:
    """Intent ids whose keys in the guard's Redis go after the test."""
    ids: list[str] = []
    yield ids
    if ids:
        client = redis.Redis.from_url(guard_url(), socket_timeout=5)
        try:
            client.delete(*(key(i) for i in ids for key in (state_key, attempts_key)))
        finally:
            client.close()


@pytest.mark.parametrize("point", ["after_commit", "before_ack"])
def test_a_web_process_killed_after_commit_loses_nothing_and_sends_nothing_twice(
    point: str,
    database_url: str,
    broker_url: str,
    celery_queue: str,
    tmp_path: Path,
    make_worker: MakeWorker,
    forget_guard: list[str],
) -> None:
    sent = tmp_path / "sent.txt"
    config = make_config(
        broker_url,
        celery_queue,
        tmp_path,
        {"file": file_channel(sent, durable=True)},
        SQLALCHEMY_DATABASE_URI=database_url,
        NOTIFYQUEUE_OUTBOX_LEASE=LEASE,
    )
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", CONFIG_ENV: json.dumps(config)}
    out = tmp_path / "out"
    out.mkdir()

    argv = [sys.executable, "-m", "tests.celery_crash_child", point, "--out", str(out)]
    argv += ["--first", str(FIRST), "--last", str(LAST)]
    with started(argv, environ, out, "child") as child:
        code = child.wait(timeout=30)
    assert code == -signal.SIGKILL, output(out, "child")
    ids = journal(out)
    forget_guard.extend(i for name in ids for i in ids[name])
    first, last = ids["commit-1"], ids["commit-2"]
    assert (len(first), len(last)) == (FIRST, LAST)
    assert committed(database_url) == {"commit-1", "commit-2"}

    # What the dead process left: the last commit's rows, leased to it, one
    # attempt begun; the first commit's were marked done (deleted) once the
    # broker had them.
    left = outbox_rows(database_url)
    assert sorted(left) == sorted(last)
    assert {row["state"] for row in left.values()} == {"leased"}
    assert {row["attempts"] for row in left.values()} == {1}
    # after_commit: nothing of the last commit published; before_ack: all.
    published = FIRST + (LAST if point == "before_ack" else 0)
    assert queued(broker_url, celery_queue) == published

    # The real drainer, once the dead process's lease has expired.
    latest = max(row["next_attempt_at"] for row in left.values())
    wait = (latest - datetime.now(timezone.utc)).total_seconds() + 0.05
    assert wait < LEASE + MARGIN
    time.sleep(max(0.0, wait))
    drain = [sys.executable, "-m", "flask", "--app", "tests.celery_app:flask_app"]
    drain += ["notifyqueue", "drain", "--once"]
    with started(drain, environ, out, "drain") as drainer:
        code = drainer.wait(timeout=30)
    assert code == 0, output(out, "drain")
    drained = output(out, "drain", "stdout").strip()
    assert drained == DRAINED.format(n=LAST), output(out, "drain")
    assert outbox_rows(database_url) == {}
    assert queued(broker_url, celery_queue) == published + LAST

    worker = make_worker(TARGET, celery_queue, env={CONFIG_ENV: json.dumps(config)})
    tasks = published + LAST
    wait_until(
        lambda: worker.log_text().count("] succeeded in") >= tasks, 30, worker.log_tail
    )
    time.sleep(0.5)  # anything more the worker would send, it has sent by now
    # Every committed intent once, each commit's in call order; the
    # rolled-back one never.
    assert sent_lines(str(sent)) == [
        *(f"{intent_id} commit-1 {n}" for n, intent_id in enumerate(first, 1)),
        *(f"{intent_id} commit-2 {n}" for n, intent_id in enumerate(last, 1)),
    ]
    log = worker.log_text()
    assert log.count("] succeeded in") == tasks
    # before_ack published the last commit twice: the guard sent each once.
    duplicates = LAST if point == "before_ack" else 0
    assert log.count("already delivered") == duplicates
    for intent_id in last:
        copy = f"Notification {intent_id} to channel 'file' was already delivered"
        assert log.count(copy) == (1 if point == "before_ack" else 0)
    assert ids["rolled-back"][0] not in log
    # One outcome each, the worker's: publishing (by the child or the
    # drainer) is no delivery, and a duplicate signals nothing.
    signalled = (tmp_path / "signals.txt").read_text().splitlines()
    assert signalled == [f"intent_dispatched {i}" for i in first + last]
    assert queued(broker_url, celery_queue) == 0
    assert outbox_rows(database_url) == {}
