"""Drainers competing for one outbox: processes and threads, PostgreSQL and SQLite.

The due rows are inserted straight into ``notifyqueue_outbox`` in one
transaction (as thousands of request commits would have left them, 1 to 3
rows per commit), then several drainers run ``drain(once=True)`` at once.
What was delivered is counted at the receiving end: the child processes'
channel appends each intent id to a file of its own (tests/outbox_drainer_child.py),
the in-process channel keeps them in memory. Each row must arrive exactly
once, and the table must be empty afterwards (delivered rows are deleted).

The drainer tests print their drain rate in intents per second (``-s`` shows
it); the issue aims at 1,000 intents/s or more. No test asserts it: a busy
machine must not fail the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as t
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from notifyqueue import Intent, outbox
from notifyqueue.outbox import DrainStats, drain, store

from .conftest import require_postgres
from .helpers import db
from .outbox_drainer_child import CHILD, MemoryChannel, make_app

pytestmark = pytest.mark.skipif(
    not hasattr(os, "killpg"), reason="needs POSIX process groups"
)

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ROWS = 10_000
SQLITE_ROWS = 3_000
# Generous: 10,000 rows take a few seconds; the machine may be busy.
READY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 90.0


@dataclasses.dataclass
class Outbox:
    """An empty outbox table on a real database."""

    url: str
    engine: sa.Engine

    def rows(self) -> list[tuple[str | None, str, int]]:
        """``(lease_owner, state, count)`` of every row, grouped."""
        table = outbox.table
        with self.engine.connect() as connection:
            result = connection.execute(
                sa.select(table.c.lease_owner, table.c.state, sa.func.count())
                .group_by(table.c.lease_owner, table.c.state)
                .order_by(table.c.lease_owner, table.c.state)
            )
            return [(owner, state, int(count)) for owner, state, count in result]


@contextlib.contextmanager
def fresh_outbox(url: str) -> t.Iterator[Outbox]:
    engine = sa.create_engine(url)
    if engine.dialect.name == "postgresql":
        # A claim this process makes waits for a row lock 10 s at most (and
        # its thread then ends with an error), never for ever.
        @sa.event.listens_for(engine, "connect")
        def bound_lock_waits(dbapi_connection: t.Any, record: t.Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET lock_timeout = '10s'")
            cursor.close()
            dbapi_connection.commit()

    try:
        outbox.table.drop(engine, checkfirst=True)
        assert outbox.create(engine)
        yield Outbox(url, engine)
    finally:
        outbox.table.drop(engine, checkfirst=True)
        engine.dispose()


@pytest.fixture
def postgres() -> t.Iterator[Outbox]:
    with fresh_outbox(require_postgres()) as box:
        yield box


@pytest.fixture
def sqlite_wal(tmp_path: Path) -> t.Iterator[Outbox]:
    """A SQLite file in WAL mode (set once here: it is kept in the file)."""
    with fresh_outbox(f"sqlite:///{tmp_path / 'outbox.db'}") as box:
        with box.engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
        assert mode == "wal"
        yield box


def insert_due_rows(box: Outbox, count: int, channel: str) -> list[str]:
    """Insert ``count`` pending rows, due already, 1 to 3 per commit; their ids.

    Oldest first: row n is due 1 ms before row n + 1.
    """
    moment = datetime.now(timezone.utc)
    rows: list[dict[str, t.Any]] = []
    sizes = itertools.cycle((1, 2, 3))
    while len(rows) < count:
        size = min(next(sizes), count - len(rows))
        commit_id = ""
        for position in range(size):
            number = len(rows)
            intent = Intent.new(channel, f"row {number}", "tests.outbox_concurrency")
            commit_id = commit_id or intent.id
            due = moment - timedelta(milliseconds=count - number)
            rows.append(
                {
                    "intent_id": intent.id,
                    "commit_id": commit_id,
                    "position": position,
                    "channel": channel,
                    "intent": json.dumps(intent.to_dict()),
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": due,
                    "created_at": due,
                }
            )
    with box.engine.begin() as connection:
        connection.execute(outbox.table.insert(), rows)
    return [row["intent_id"] for row in rows]


# -- drainer processes --------------------------------------------------------


@dataclasses.dataclass
class Drainer:
    """One ``tests.outbox_drainer_child`` process and its files."""

    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def stderr(self) -> str:
        return (self.directory / "stderr.txt").read_text()

    def delivered(self) -> list[str]:
        """The intent ids its channel wrote, in order."""
        path = self.directory / "delivered.txt"
        return path.read_text().split() if path.exists() else []

    def report(self) -> dict[str, t.Any]:
        data: dict[str, t.Any] = json.loads(
            (self.directory / "report.json").read_text()
        )
        return data


@contextlib.contextmanager
def drainer_processes(
    tmp_path: Path, url: str, count: int, *, batch: int
) -> t.Iterator[list[Drainer]]:
    """Start ``count`` drainer children, held at the barrier; kill them at the end."""
    drainers: list[Drainer] = []
    environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for number in range(count):
            directory = tmp_path / f"drainer-{number}"
            directory.mkdir()
            argv = [sys.executable, "-m", CHILD, "--url", url, "--batch", str(batch)]
            for option, name in (
                ("--out", "delivered.txt"),
                ("--ready", "ready"),
                ("--report", "report.json"),
            ):
                argv += [option, str(directory / name)]
            with open(directory / "stderr.txt", "wb") as stderr:
                process = subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=environ,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            drainers.append(Drainer(process, directory))
        yield drainers
    finally:
        for drainer in drainers:
            with contextlib.suppress(ProcessLookupError):  # it has exited
                os.killpg(drainer.process.pid, signal.SIGKILL)
            drainer.process.wait(timeout=10)
            if drainer.process.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    drainer.process.stdin.close()


def run_at_once(drainers: list[Drainer]) -> float:
    """Release every drainer when all are ready; wait for all to exit.

    :return: the drain rate: rows delivered per second, from the first
        child's start to the last one's finish.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    for drainer in drainers:
        while not (drainer.directory / "ready").exists():
            if drainer.process.poll() is not None:
                pytest.fail(
                    f"drainer exited ({drainer.process.returncode}) before the"
                    f" barrier: {drainer.stderr}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"a drainer not ready after {READY_TIMEOUT} s")
            time.sleep(0.01)
    # Every child is blocked reading its stdin: these writes release them
    # within microseconds of each other.
    for drainer in drainers:
        assert drainer.process.stdin is not None
        drainer.process.stdin.write(b"go\n")
        drainer.process.stdin.flush()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    for drainer in drainers:
        drainer.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        assert drainer.process.returncode == 0, drainer.stderr
    reports = [drainer.report() for drainer in drainers]
    started = min(float(report["started_at"]) for report in reports)
    finished = max(float(report["finished_at"]) for report in reports)
    delivered = sum(int(report["stats"]["delivered"]) for report in reports)
    return delivered / (finished - started)


def assert_each_delivered_once_by_competing_drainers(
    drainers: list[Drainer], ids: list[str]
) -> None:
    per_drainer = [drainer.delivered() for drainer in drainers]
    arrived = Counter(itertools.chain.from_iterable(per_drainer))
    doubled = sorted(intent_id for intent_id, n in arrived.items() if n > 1)
    assert doubled == [], f"{len(doubled)} delivered twice or more"
    assert set(arrived) == set(ids)
    assert sum(arrived.values()) == len(ids)
    # They really competed: every one of them got a share.
    assert all(per_drainer), [len(delivered) for delivered in per_drainer]
    # Each child's own count agrees with what its channel wrote; no row was
    # taken over from an expired lease, none was handed back.
    for drainer, delivered in zip(drainers, per_drainer, strict=True):
        stats = drainer.report()["stats"]
        assert stats["delivered"] == stats["claimed"] == len(delivered)
        assert stats["reclaimed"] == stats["released"] == 0


def test_four_drainer_processes_deliver_each_of_10000_rows_exactly_once(
    tmp_path: Path,
    postgres: Outbox,
) -> None:
    ids = insert_due_rows(postgres, POSTGRES_ROWS, "file")

    with drainer_processes(tmp_path, postgres.url, 4, batch=100) as drainers:
        rate = run_at_once(drainers)

    print(f"4 processes, PostgreSQL: {rate:.0f} intents/s")
    assert_each_delivered_once_by_competing_drainers(drainers, ids)
    assert postgres.rows() == []


def test_two_drainer_processes_on_sqlite_wal_never_hit_a_lock_or_double_claim(
    tmp_path: Path,
    sqlite_wal: Outbox,
) -> None:
    ids = insert_due_rows(sqlite_wal, SQLITE_ROWS, "file")

    with drainer_processes(tmp_path, sqlite_wal.url, 2, batch=100) as drainers:
        rate = run_at_once(drainers)

    print(f"2 processes, SQLite WAL: {rate:.0f} intents/s")
    # "database is locked" neither escaped (both exited 0) nor was logged.
    for drainer in drainers:
        assert "locked" not in drainer.stderr.lower(), drainer.stderr
    assert_each_delivered_once_by_competing_drainers(drainers, ids)
    assert sqlite_wal.rows() == []


# -- drainer threads ----------------------------------------------------------


def test_eight_drainer_threads_deliver_each_of_10000_rows_exactly_once(
    postgres: Outbox,
) -> None:
    ids = insert_due_rows(postgres, POSTGRES_ROWS, "mem")
    app = make_app(
        "threads", postgres.url, {"name": "mem", "type": f"{CHILD}:MemoryChannel"}
    )
    channel = app.extensions["notifyqueue"].channels["mem"]
    assert isinstance(channel, MemoryChannel)
    count = 8
    barrier = threading.Barrier(count, timeout=30)
    stop = threading.Event()
    results: dict[int, DrainStats | BaseException] = {}

    def run(number: int) -> None:
        try:
            barrier.wait()
            results[number] = drain(app, once=True, batch=50, stop=stop)
        except BaseException as exc:  # reported by the assert below
            results[number] = exc

    threads = [
        threading.Thread(target=run, args=(number,), name=f"drainer-{number}")
        for number in range(count)
    ]
    try:
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + DRAIN_TIMEOUT
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        assert not [thread.name for thread in threads if thread.is_alive()]
    finally:
        stop.set()  # a drainer still running hands its claim back and returns
        for thread in threads:
            thread.join(timeout=10)
        with app.app_context():
            db.session.remove()
            db.engine.dispose()

    print(f"8 threads, PostgreSQL: {len(ids) / elapsed:.0f} intents/s")
    failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    assert failed == {}
    stats = [r for r in results.values() if isinstance(r, DrainStats)]
    assert len(stats) == count
    arrived = Counter(intent_id for intent_id, _ in channel.delivered)
    assert [intent_id for intent_id, n in arrived.items() if n > 1] == []
    assert set(arrived) == set(ids)
    assert sum(arrived.values()) == len(ids)
    assert sum(s.delivered for s in stats) == sum(s.claimed for s in stats) == len(ids)
    assert sum(s.reclaimed + s.released for s in stats) == 0
    assert postgres.rows() == []


# -- claims -------------------------------------------------------------------


def claim_at_once(
    engine: sa.Engine, owners: t.Sequence[str], *, batch: int, now: datetime
) -> dict[str, list[str]]:
    """``store.claim`` from one thread per owner, released together; ids claimed.

    Any exception in a thread fails the test.
    """
    barrier = threading.Barrier(len(owners), timeout=30)
    results: dict[str, list[str] | BaseException] = {}

    def run(owner: str) -> None:
        try:
            barrier.wait()
            rows = store.claim(engine, owner, batch=batch, lease=60, now=now)
            results[owner] = [row.intent_id for row in rows]
        except BaseException as exc:  # reported by the assert below
            results[owner] = exc

    threads = [threading.Thread(target=run, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not [thread.name for thread in threads if thread.is_alive()]
    claimed = {o: r for o, r in results.items() if not isinstance(r, BaseException)}
    assert claimed.keys() == set(owners), results
    return claimed


def warm_pool(box: Outbox, connections: int) -> None:
    """Open ``connections`` pooled connections, so no claim waits to connect."""
    with contextlib.ExitStack() as stack:
        for _ in range(connections):
            stack.enter_context(box.engine.connect())


OWNERS = ("claimer-a", "claimer-b")


def test_two_claims_at_once_each_lease_exactly_their_batch_of_distinct_rows(
    postgres: Outbox,
) -> None:
    insert_due_rows(postgres, 300, "file")
    warm_pool(postgres, len(OWNERS))
    rounds = 10
    seen: list[str] = []

    for _ in range(rounds):
        claims = claim_at_once(
            postgres.engine, OWNERS, batch=7, now=datetime.now(timezone.utc)
        )
        first, second = (claims[owner] for owner in OWNERS)
        assert len(first) == len(set(first)) == 7
        assert len(second) == len(set(second)) == 7
        assert set(first).isdisjoint(second)
        seen += first + second

    # No row was claimed in two rounds either, and the table agrees: each
    # owner leases exactly what it was given, the rest is still pending.
    assert len(set(seen)) == len(seen) == rounds * 14
    assert postgres.rows() == [
        ("claimer-a", "leased", rounds * 7),
        ("claimer-b", "leased", rounds * 7),
        (None, "pending", 300 - rounds * 14),
    ]


def test_a_claim_skips_rows_another_transaction_locks_and_still_fills_its_batch(
    postgres: Outbox,
) -> None:
    ids = insert_due_rows(postgres, 50, "file")
    warm_pool(postgres, len(OWNERS) + 1)
    locked = ids[:5]  # the five oldest due rows
    table = outbox.table

    with postgres.engine.connect() as locker:
        held = locker.execute(
            sa.select(table.c.intent_id)
            .where(table.c.intent_id.in_(locked))
            .with_for_update()
        ).scalars()
        assert sorted(held) == sorted(locked)
        claims = claim_at_once(
            postgres.engine, OWNERS, batch=7, now=datetime.now(timezone.utc)
        )
        locker.rollback()

    first, second = (claims[owner] for owner in OWNERS)
    assert len(first) == len(second) == 7
    # Past the locked rows, the next fourteen due, split between the two.
    assert sorted(first + second) == sorted(ids[5:19])
