"""Durable delivery across real crashes: SIGKILL at each point, SIGTERM to a drainer.

Each test runs ``tests/outbox_child.py`` in a subprocess against a real SMTP
server in this process and a real database (a SQLite file, or this run's
PostgreSQL schema), kills it with a real signal, then runs the real drainer
(``flask notifyqueue drain``) in another subprocess. What arrived is counted
at the SMTP server by Message-ID; what is left is read from the outbox table.

The child commits a transaction that rolls back, then ``COMMITS``
transactions of ``EMAILS`` durable emails each; every commit but the last is
delivered and acknowledged by the fast path, and the process dies in the
last one's. Timings are asserted with wide margins: each subprocess imports
Flask and SQLAlchemy, and the machine may be busy.
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
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from notifyqueue.outbox import table

from .conftest import SMTPServer

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"
)

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.outbox_child:create_app()"
COMMITS = 3
EMAILS = 2
LEASE = 1.0
# Seconds the server holds the DATA in flight when the child is killed.
HOLD = 1.5
# Room for a busy machine on top of any time under test.
MARGIN = 5.0
DRAINED = (
    "Drained: {claimed} claimed, {delivered} delivered, 0 to retry, 0 dead,"
    " 0 uncertain, {reclaimed} taken over from expired leases, {released}"
    " handed back."
)


class Process:
    """A subprocess started by :func:`started`, and the files it writes to."""

    def __init__(self, popen: subprocess.Popen[bytes], out: Path, name: str) -> None:
        self.popen = popen
        self.out = out
        self.name = name

    @property
    def stdout(self) -> str:
        return (self.out / f"{self.name}.stdout").read_text()

    @property
    def stderr(self) -> str:
        return (self.out / f"{self.name}.stderr").read_text()

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited (at most ``timeout`` s)."""
        return self.popen.wait(timeout)


@contextlib.contextmanager
def started(
    argv: list[str], environ: dict[str, str], out: Path, name: str
) -> t.Iterator[Process]:
    """Start ``argv`` in a session of its own; kill its group (by pid) at the end."""
    with (
        open(out / f"{name}.stdout", "wb") as stdout,
        open(out / f"{name}.stderr", "wb") as stderr,
    ):
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environ,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield Process(popen, out, name)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it has exited
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)


def environment(
    database_url: str, server: SMTPServer, shutdown_timeout: float = 10.0
) -> dict[str, str]:
    """The environment :func:`tests.outbox_child.create_app` builds the app from."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OUTBOX_CHILD_DATABASE_URL": database_url,
        "OUTBOX_CHILD_SMTP_PORT": str(server.port),
        "OUTBOX_CHILD_LEASE": str(LEASE),
        "OUTBOX_CHILD_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
    }


def child_argv(scenario: str, out: Path, commits: int = COMMITS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.outbox_child",
        scenario,
        "--out",
        str(out),
        "--commits",
        str(commits),
        "--emails",
        str(EMAILS),
    ]


def drain_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", APP, "notifyqueue", "drain"] + [
        *options
    ]


def drain_once(environ: dict[str, str], out: Path, name: str) -> Process:
    """Run ``flask notifyqueue drain --once`` to its end; it must exit 0."""
    with started(drain_argv("--once"), environ, out, name) as process:
        code = process.wait(timeout=30)
    assert code == 0, process.stderr
    return process


def wait_until(condition: t.Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(0.01)


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


def wait_past_leases(database_url: str) -> None:
    """Sleep until every row in the outbox is due (its lease, if any, expired)."""
    latest = max(row["next_attempt_at"] for row in outbox_rows(database_url).values())
    left = (latest - datetime.now(timezone.utc)).total_seconds() + 0.05
    assert left < LEASE + MARGIN
    time.sleep(max(0.0, left))


def message_id(intent_id: str) -> str:
    return f"<{intent_id}@example.com>"


def arrivals(server: SMTPServer) -> Counter[str]:
    """How many times each intent arrived, counted by Message-ID.

    Every message's Message-ID is its ``X-Notifyqueue-Intent`` at the sender's
    domain: a copy carries the same Message-ID as the first.
    """
    counts: Counter[str] = Counter()
    for message in server.messages:
        intent_id = message["X-Notifyqueue-Intent"]
        assert message["Message-ID"] == message_id(intent_id)
        counts[message["Message-ID"]] += 1
    return counts


def by_message_id(ids: t.Iterable[str], times: int = 1) -> Counter[str]:
    return Counter({message_id(intent_id): times for intent_id in ids})


class Crash:
    """What a crash scenario left: before and after the drainer ran."""

    def __init__(
        self,
        ids: dict[str, list[str]],
        committed: set[str],
        before: Counter[str],
        left: dict[str, dict[str, t.Any]],
        drainer: Process,
        after: Counter[str],
        remaining: dict[str, dict[str, t.Any]],
    ) -> None:
        self.ids = ids
        self.committed = committed
        self.before = before
        self.left = left
        self.drainer = drainer
        self.after = after
        self.remaining = remaining

    def of(self, *names: str) -> list[str]:
        return [intent_id for name in names for intent_id in self.ids[name]]

    def check_at_least_once(self) -> None:
        """Every committed intent arrived; the rolled-back one never did; a copy
        only of what had arrived before the drainer ran; the outbox is empty."""
        assert self.committed == {f"commit-{n}" for n in range(1, COMMITS + 1)}
        committed_ids = self.of(*sorted(self.committed))
        assert set(self.after) == {message_id(i) for i in committed_ids}
        assert message_id(self.ids["rolled-back"][0]) not in self.after
        repeated = {key for key, count in self.after.items() if count > 1}
        assert repeated <= set(self.before)
        assert max(self.after.values()) <= 2
        assert self.remaining == {}
        # What the killed process left: its last commit's rows, still leased
        # to it (the attempt it began), never acknowledged.
        last = self.of(f"commit-{COMMITS}")
        assert sorted(self.left) == sorted(last)
        assert {row["state"] for row in self.left.values()} == {"leased"}
        assert {row["attempts"] for row in self.left.values()} == {1}
        assert self.drainer.stdout.strip() == DRAINED.format(
            claimed=EMAILS, delivered=EMAILS, reclaimed=EMAILS, released=0
        )


def crash_and_drain(
    tmp_path: Path,
    database_url: str,
    server: SMTPServer,
    scenario: str,
    *,
    stored: bool = False,
) -> Crash:
    """Run the child until it dies by SIGKILL, then ``drain --once`` past the lease.

    ``stored`` (for ``during-data``): the server stores the message in flight
    at once and holds only its answer, instead of holding the DATA itself.
    """
    out = tmp_path / "out"
    out.mkdir()
    environ = environment(database_url, server)
    with started(child_argv(scenario, out), environ, out, "child") as child:
        if scenario == "during-data":
            wait_until(
                lambda: (out / "ready").exists() or child.popen.poll() is not None,
                30,
                "the child's first commits",
            )
            assert child.popen.poll() is None, child.stderr
            # Only the last commit's emails stall: the server holds each DATA
            # for HOLD seconds before it stores the message and answers.
            if stored:
                server.answer_delay = HOLD
            else:
                server.data_delay = HOLD
            (out / "go").touch()
            in_flight = EMAILS * (COMMITS - 1) + 1
            wait_until(
                lambda: server.mail_commands >= in_flight,
                20,
                "the last commit's first MAIL",
            )
            held = time.monotonic()
            # The message's data follows at once on loopback; the server is
            # then holding its answer to the final ".".
            time.sleep(0.5)
            os.kill(child.popen.pid, signal.SIGKILL)
            server.data_delay = server.answer_delay = 0.0
            code = child.wait(timeout=10)
            # Past the hold: a message the server was to store would be there.
            time.sleep(max(0.0, held + HOLD + 0.3 - time.monotonic()))
        else:
            code = child.wait(timeout=30)
    assert code == -signal.SIGKILL, child.stderr
    before = arrivals(server)
    left = outbox_rows(database_url)
    names = committed(database_url)
    wait_past_leases(database_url)
    drainer = drain_once(environ, out, "drain")
    return Crash(
        journal(out),
        names,
        before,
        left,
        drainer,
        arrivals(server),
        outbox_rows(database_url),
    )


def test_a_kill_right_after_commit_loses_nothing_and_repeats_nothing(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    crash = crash_and_drain(tmp_path, database_url, smtp_server, "after-commit")

    crash.check_at_least_once()
    # Nothing of the last commit had gone out; the drainer sent each email of
    # it once, and nothing acknowledged again.
    assert crash.before == by_message_id(crash.of("commit-1", "commit-2"))
    assert crash.after == by_message_id(crash.of("commit-1", "commit-2", "commit-3"))


def test_a_kill_during_an_emails_data_loses_it_and_repeats_nothing_acknowledged(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    crash = crash_and_drain(tmp_path, database_url, smtp_server, "during-data")

    crash.check_at_least_once()
    first, second = crash.of("commit-3")
    # The client died before the server's answer to the last commit's first
    # email, so the server (aiosmtpd) dropped it; its second was never sent.
    assert crash.before == by_message_id(crash.of("commit-1", "commit-2"))
    assert message_id(first) not in crash.before
    # The drainer sent both once; the acknowledged commits were not repeated.
    assert crash.after == by_message_id(crash.of("commit-1", "commit-2", "commit-3"))


def test_a_kill_after_an_emails_data_repeats_it_once_with_its_message_id(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    crash = crash_and_drain(
        tmp_path, database_url, smtp_server, "during-data", stored=True
    )

    crash.check_at_least_once()
    first, second = crash.of("commit-3")
    # The server had stored the last commit's first email when the client
    # died waiting for its answer; the second was never sent.
    assert crash.before == by_message_id(crash.of("commit-1", "commit-2")) + (
        by_message_id([first])
    )
    # The drainer sent both: the first is the one copy, with its Message-ID.
    assert crash.after == by_message_id(
        crash.of("commit-1", "commit-2")
    ) + by_message_id([first], times=2) + by_message_id([second])


def test_a_kill_before_the_acknowledgement_repeats_only_the_unacknowledged_emails(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    crash = crash_and_drain(tmp_path, database_url, smtp_server, "before-ack")

    crash.check_at_least_once()
    everything = crash.of("commit-1", "commit-2", "commit-3")
    assert crash.before == by_message_id(everything)
    # The last commit's two emails arrived twice each, with their Message-ID.
    assert crash.after == by_message_id(
        crash.of("commit-1", "commit-2")
    ) + by_message_id(crash.of("commit-3"), times=2)


# -- SIGTERM to a polling drainer -------------------------------------------------

SEEDED = 4  # commits of EMAILS rows each, left to the drainer


def seed(tmp_path: Path, environ: dict[str, str], database_url: str) -> Path:
    """Commit SEEDED transactions whose rows nobody delivered; wait until due."""
    out = tmp_path / "out"
    out.mkdir()
    argv = child_argv("seed", out, commits=SEEDED)
    with started(argv, environ, out, "seed") as child:
        code = child.wait(timeout=30)
    assert code == 0, child.stderr
    assert len(outbox_rows(database_url)) == SEEDED * EMAILS
    wait_past_leases(database_url)
    return out


def test_sigterm_finishes_the_commit_in_flight_and_hands_the_rest_back(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    timeout = 5.0
    environ = environment(database_url, smtp_server, shutdown_timeout=timeout)
    out = seed(tmp_path, environ, database_url)
    ids = journal(out)
    seeded = outbox_rows(database_url)
    smtp_server.data_delay = 1.0
    argv = drain_argv("--poll", "0.2", "--batch", "50", "--lease", "30")
    with started(argv, environ, out, "drainer") as drainer:
        wait_until(lambda: smtp_server.mail_commands >= 1, 30, "the first MAIL")
        os.kill(drainer.popen.pid, signal.SIGTERM)
        stopped = time.monotonic()
        code = drainer.wait(timeout=timeout + MARGIN)
        took = time.monotonic() - stopped

    assert code == 0, drainer.stderr
    assert took < timeout + MARGIN
    assert drainer.stdout.strip() == DRAINED.format(
        claimed=SEEDED * EMAILS,
        delivered=EMAILS,
        reclaimed=SEEDED * EMAILS,
        released=(SEEDED - 1) * EMAILS,
    )
    # The commit in flight was delivered, every email of it, and settled.
    assert arrivals(smtp_server) == by_message_id(ids["commit-1"])
    rows = outbox_rows(database_url)
    assert sorted(rows) == sorted(set(seeded) - set(ids["commit-1"]))
    # The rest went back untried: pending, due, unowned, the attempt undone.
    now = datetime.now(timezone.utc)
    for intent_id, row in rows.items():
        assert row["state"] == "pending"
        assert row["attempts"] == seeded[intent_id]["attempts"]
        assert row["lease_owner"] is None
        assert row["next_attempt_at"] <= now

    smtp_server.data_delay = 0.0
    second = drain_once(environ, out, "drain")
    assert second.stdout.strip() == DRAINED.format(
        claimed=len(rows), delivered=len(rows), reclaimed=0, released=0
    )
    everything = [i for name in sorted(ids) if name != "rolled-back" for i in ids[name]]
    assert arrivals(smtp_server) == by_message_id(everything)
    assert outbox_rows(database_url) == {}


class Stopped:
    """A polling drainer stopped by SIGTERM while a DATA stalls past its grace."""

    def __init__(
        self, code: int, took: float, pid: int, stdout: str, stderr: str
    ) -> None:
        self.code = code
        self.took = took
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr


GRACE = 0.5
STALL = 3.0


def stop_past_the_grace(
    tmp_path: Path, database_url: str, server: SMTPServer
) -> tuple[dict[str, list[str]], dict[str, dict[str, t.Any]], Stopped]:
    """Seed, start a polling drainer with NOTIFYQUEUE_SHUTDOWN_TIMEOUT=GRACE, and
    SIGTERM it during its first DATA, which the server holds for STALL s."""
    environ = environment(database_url, server, shutdown_timeout=GRACE)
    out = seed(tmp_path, environ, database_url)
    server.data_delay = STALL
    seeded = outbox_rows(database_url)
    argv = drain_argv("--poll", "0.2", "--batch", "50", "--lease", "30")
    with started(argv, environ, out, "drainer") as drainer:
        wait_until(lambda: server.mail_commands >= 1, 30, "the first MAIL")
        os.kill(drainer.popen.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code = drainer.wait(timeout=STALL + MARGIN)
        took = time.monotonic() - signalled
    stopped = Stopped(code, took, drainer.popen.pid, drainer.stdout, drainer.stderr)
    return journal(out), seeded, stopped


def test_sigterm_past_the_shutdown_timeout_exits_1_leaving_the_commit_in_flight_leased(
    tmp_path: Path, database_url: str, smtp_server: SMTPServer
) -> None:
    ids, seeded, stopped = stop_past_the_grace(tmp_path, database_url, smtp_server)

    assert stopped.code == 1, stopped.stderr
    assert "Drained:" not in stopped.stdout
    assert (
        "Stopped before the delivery in flight finished (NOTIFYQUEUE_SHUTDOWN_TIMEOUT"
        " (0.5 s) passed); its rows stay leased and are retried when the lease"
        " expires." in stopped.stderr
    )
    rows = outbox_rows(database_url)
    assert sorted(rows) == sorted(seeded)
    now = datetime.now(timezone.utc)
    # The commit in flight stays leased to the stopped drainer, its attempt
    # counted, until the lease (30 s) expires.
    for intent_id in ids["commit-1"]:
        row = rows[intent_id]
        assert row["state"] == "leased"
        assert row["lease_owner"].split(":")[1] == str(stopped.pid)
        assert row["attempts"] == seeded[intent_id]["attempts"] + 1
        assert row["next_attempt_at"] > now + timedelta(seconds=20)
    # The rest went back untried at once.
    for intent_id in set(rows) - set(ids["commit-1"]):
        row = rows[intent_id]
        assert row["state"] == "pending"
        assert row["attempts"] == seeded[intent_id]["attempts"]
        assert row["lease_owner"] is None
        assert row["next_attempt_at"] <= now


def test_sigterm_past_the_shutdown_timeout_exits_without_waiting_for_the_server(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    # The mail channel, not the database, decides this: SQLite only.
    database_url = f"sqlite:///{tmp_path / 'test.db'}"
    _, _, stopped = stop_past_the_grace(tmp_path, database_url, smtp_server)

    assert stopped.code == 1, stopped.stderr
    # "Past that timeout ... it exits 1 at once": well before the server's
    # answer to the DATA in flight.
    assert stopped.took < STALL - 0.5
