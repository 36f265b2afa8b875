"""Background delivery across real processes: fork, interpreter exit, SIGTERM.

Each test runs ``tests/background_child.py`` in a subprocess against a real
SMTP server in this process, and counts what arrived there by the
``X-Notifyqueue-Intent`` header. Timings are asserted with wide margins: the
subprocess imports Flask and SQLAlchemy, and the machine may be busy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing as t
from collections import Counter
from pathlib import Path

import pytest

from .conftest import SMTPServer

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="needs os.fork and POSIX signals"
)

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
POOL = [f"notifyqueue-background-bgchild-{number}" for number in range(THREADS)]
# Room for a busy machine on top of any timeout under test.
MARGIN = 5.0
LEFT = re.compile(
    r"ERROR notifyqueue Background delivery of app 'bgchild' stopped with"
    r" (\d+) notification\(s\) without an outcome"
    r" \(NOTIFYQUEUE_SHUTDOWN_TIMEOUT=[\d.]+ s\)\."
    r" Never started: ([0-9a-f, ]+|none)\."
    r" Still running, outcome unknown: ([0-9a-f, ]+|none)\."
)


class Child:
    """A running ``tests.background_child`` process and the files it writes."""

    def __init__(self, process: subprocess.Popen[bytes], out: Path) -> None:
        self.process = process
        self.out = out

    def report(self, name: str = "report", timeout: float = 30) -> dict[str, t.Any]:
        """The JSON file ``name`` once the child has written it."""
        path = self.out / f"{name}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None and not path.exists():
                pytest.fail(f"child exited ({self.process.returncode}): {self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {path.name} after {timeout} s: {self.stderr}")
            time.sleep(0.02)
        data: dict[str, t.Any] = json.loads(path.read_text())
        return data

    def wait(self, timeout: float = 30) -> float:
        """Wait for the child to exit; return when it did, on time.monotonic()."""
        self.process.wait(timeout)
        return time.monotonic()

    @property
    def stderr(self) -> str:
        return (self.out / "stderr.txt").read_text()


@contextlib.contextmanager
def child(
    tmp_path: Path, scenario: str, server: SMTPServer, *options: str
) -> t.Iterator[Child]:
    """Start ``python -m tests.background_child``; kill it (by pid) at the end."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "tests.background_child", scenario]
    argv += ["--port", str(server.port), "--out", str(out), "--threads", str(THREADS)]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(out / "stdout.txt", "wb") as stdout,
        open(out / "stderr.txt", "wb") as stderr,
    ):
        # A session of its own: the fork scenario's child joins its process
        # group, so one killpg() ends both.
        process = subprocess.Popen(
            [*argv, *options],
            cwd=ROOT,
            env=environ,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield Child(process, out)
    finally:
        with contextlib.suppress(ProcessLookupError):  # every member has exited
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def left_at_exit(stderr: str) -> tuple[list[str], list[str]]:
    """The ids the exit handler's ERROR names: never started, still running."""
    [(count, never, running)] = LEFT.findall(stderr)
    never_ids = [] if never == "none" else never.split(", ")
    running_ids = [] if running == "none" else running.split(", ")
    assert int(count) == len(never_ids) + len(running_ids)
    return never_ids, running_ids


def test_no_pool_thread_starts_at_import_in_init_app_or_when_queueing(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    with child(tmp_path, "exit", smtp_server, "--commits", "1") as process:
        report = process.report()
        process.wait()

    assert report["threads_at_import"] == []
    assert report["threads_after_init_app"] == []
    assert report["threads_before_commit"] == []
    # The first hand-off starts the whole pool.
    assert report["threads_after_commit"] == POOL
    assert smtp_server.intent_ids() == report["ids"]
    assert process.process.returncode == 0


def test_a_forked_child_delivers_its_own_work_and_never_its_parents(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    # Every DATA takes a second: at the fork, the parent's two threads are
    # busy and the rest of its six commits wait in its queue.
    smtp_server.data_delay = 1.0
    with child(
        tmp_path, "fork", smtp_server, "--commits", "6", "--child-commits", "2"
    ) as process:
        process.wait(timeout=60)
        parent = process.report(timeout=0)
        forked = process.report("child", timeout=0)

    assert process.process.returncode == 0, process.stderr
    assert parent["child_exit_code"] == 0, process.stderr
    # The parent had a pool, and work still queued, when it forked.
    assert parent["threads_at_fork"] == POOL
    assert parent["stats_at_fork"]["pending"] > THREADS
    # The child starts from nothing: no thread, no counts, until it commits;
    # then it has a pool of its own, which delivers just its own emails.
    assert forked["threads_after_fork"] == []
    assert set(forked["stats_after_fork"].values()) == {0}
    assert forked["threads_after_commit"] == POOL
    assert forked["stats"]["handed_off"] == forked["stats"]["delivered"] == 2
    assert parent["stats"]["handed_off"] == parent["stats"]["delivered"] == 6
    # At the server, every email of both processes exactly once: had the child
    # delivered its parent's queued work, those would be there twice.
    arrived = Counter(smtp_server.intent_ids())
    assert arrived == Counter(parent["ids"] + forked["ids"])
    assert set(arrived.values()) == {1}


def test_exit_waits_the_shutdown_timeout_then_logs_every_id_left(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    # The first two emails go through; the next two stall (at MAIL, for far
    # longer than the timeout), holding both threads; four never start.
    smtp_server.faults = {3: "stall", 4: "stall"}
    smtp_server.stall_seconds = 8
    timeout = 1.0
    with child(
        tmp_path, "exit", smtp_server, "--commits", "8", "--timeout", str(timeout)
    ) as process:
        report = process.report()
        exited = process.wait(timeout=timeout + 30)

    assert process.process.returncode == 0, process.stderr
    # Exit waited for the timeout, and not much longer.
    assert timeout - 0.1 <= exited - report["done_at"] < timeout + MARGIN
    never, running = left_at_exit(process.stderr)
    assert never and running and len(running) <= THREADS
    # Nothing silently lost: each email was delivered (arrived, not named),
    # or is named once as left; one never started never arrives.
    arrived = smtp_server.intent_ids()
    assert len(arrived) == len(set(arrived))
    delivered = set(arrived) - set(running)
    assert sorted([*delivered, *never, *running]) == sorted(report["ids"])
    assert len(report["ids"]) == 8


def test_exit_delivers_everything_that_drains_within_the_timeout(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    # Six commits on two threads at half a second each: about 1.5 s of work
    # left when the interpreter starts to exit.
    smtp_server.data_delay = 0.5
    timeout = 20.0
    with child(
        tmp_path, "exit", smtp_server, "--commits", "6", "--timeout", str(timeout)
    ) as process:
        report = process.report()
        exited = process.wait(timeout=timeout + 30)

    assert process.process.returncode == 0, process.stderr
    assert report["stats_after_commit"]["pending"] >= 1
    arrived = Counter(smtp_server.intent_ids())
    assert arrived == Counter(report["ids"])
    assert set(arrived.values()) == {1}
    assert "ERROR" not in process.stderr
    # It exited once the queue was empty, not at the timeout.
    assert exited - report["done_at"] < timeout / 2


def test_sigterm_with_a_handler_that_exits_python_runs_the_exit_handler(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    smtp_server.data_delay = 8
    timeout = 1.0
    with child(
        tmp_path,
        "sleep",
        smtp_server,
        "--commits",
        "4",
        "--timeout",
        str(timeout),
        "--exit-on-sigterm",
    ) as process:
        report = process.report()
        os.kill(process.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        exited = process.wait(timeout=timeout + 30)

    assert process.process.returncode == 0, process.stderr
    assert exited - signalled < timeout + MARGIN
    never, running = left_at_exit(process.stderr)
    assert sorted(never + running) == sorted(report["ids"])
    assert len(running) <= THREADS
    assert not set(never) & set(smtp_server.intent_ids())


def test_sigterm_default_action_skips_the_exit_handler(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    # Background delivery is at most once: killed by a signal's default
    # action, the process neither drains its queue nor logs what it lost.
    smtp_server.data_delay = 8
    timeout = 20.0
    with child(
        tmp_path, "sleep", smtp_server, "--commits", "4", "--timeout", str(timeout)
    ) as process:
        report = process.report()
        os.kill(process.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        exited = process.wait(timeout=30)

    assert process.process.returncode == -signal.SIGTERM
    assert exited - signalled < timeout / 2
    assert "Background delivery" not in process.stderr
    arrived = smtp_server.intent_ids()
    assert set(arrived) <= set(report["ids"])
    assert len(arrived) <= THREADS
