"""B7's Celery side: the Flask app a worker runs, and the worker process itself.

The benchmark builds its app with :func:`make_app` from a JSON-able config
and starts a :class:`WorkerProcess` with the same config in
``NOTIFYQUEUE_BENCH_CELERY_CONFIG``; the worker imports this module
(``celery -A benchmarks.celery_worker:celery_app worker``), which builds the
same app: the same channels, the same broker and guard. Set up as Flask's
Celery guide does, ``celery_init_app`` before ``NotifyQueue(app)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t
import uuid
from pathlib import Path

from flask import Flask

from notifyqueue import Channel, NotifyQueue
from sample_app.celery_app import celery_init_app
from sample_app.extensions import db

if t.TYPE_CHECKING:
    from notifyqueue import Intent

CONFIG_ENV = "NOTIFYQUEUE_BENCH_CELERY_CONFIG"
READY_ENV = "NOTIFYQUEUE_BENCH_CELERY_READY"
"""A path the worker creates once it consumes its queue."""
ROOT = Path(__file__).resolve().parent.parent


def make_app(config: t.Mapping[str, t.Any]) -> Flask:
    """The benchmark's app: no tables (an in-memory SQLite database), the
    channels and Celery settings of ``config``."""
    app = Flask("benchmarks_celery")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://")
    app.config.update(config)
    db.init_app(app)
    celery_init_app(app)
    NotifyQueue(app)
    return app


class FileChannel(Channel):
    """The do-nothing channel of the worker: appends ``<intent id> <time.time()>``
    to ``path``, one line per intent, so the benchmark can tell when the last
    one was delivered and that each was delivered once."""

    def __init__(self, name: str, *, path: str) -> None:
        super().__init__(name)
        self.path = path

    def send(self, intents: t.Sequence[Intent]) -> None:
        with open(self.path, "a", encoding="ascii") as file:
            for intent in intents:
                file.write(f"{intent.id} {time.time():.6f}\n")


LINE_BYTES = 32 + 1 + 17 + 1
"""The length of a :class:`FileChannel` line (an intent id of 32 characters,
a time of 17 until 2286); at least this many bytes for each intent."""


def delivered(path: Path) -> list[tuple[str, float]]:
    """``(intent id, time.time() of its delivery)`` of each line a
    :class:`FileChannel` wrote (a line being written is left out)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            intent_id, moment = line.split()
            lines.append((intent_id, float(moment)))
    return lines


class WorkerProcess:
    """A real Celery worker of :func:`make_app`'s app, one process (solo pool).

    :param config: the app's config (JSON-able), as the benchmark's own app has it.
    :param queue: the one queue it consumes.
    :param directory: where its log and ready file go.

    Celery's default log level (WARNING), so that per-task log lines are not
    what is measured. Use it in a ``with`` block: it is stopped by pid
    (SIGTERM, then SIGKILL) however the block ends.
    """

    def __init__(self, config: t.Mapping[str, t.Any], queue: str, directory: Path):
        self.name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log_path = directory / f"{self.name}.log"
        self.ready_path = directory / f"{self.name}.ready"
        self.env = {
            **os.environ,
            CONFIG_ENV: json.dumps(config),
            READY_ENV: str(self.ready_path),
        }
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.celery_worker:celery_app",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "-Q",
            queue,
            "-n",
            f"{self.name}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
        self.popen: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 60) -> WorkerProcess:
        """Start it; return once it consumes its queue (or raise, after ending it)."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not self.ready_path.exists():
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"B7: the Celery worker exited with {self.popen.returncode}"
                    f" before it was ready; its log ends:\n{self.log_tail()}"
                )
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(
                    f"B7: the Celery worker was not ready within {timeout} s; its"
                    f" log ends:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started
        return self

    @property
    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout`` seconds."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(popen.pid, signum)
            except ProcessLookupError:
                pass  # it exited (unreaped) between poll() and kill()
            try:
                popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc_info: t.Any) -> None:
        self.stop()


# The worker's app: built when the worker imports this module.
if CONFIG_ENV in os.environ:
    from celery.signals import worker_ready

    flask_app = make_app(json.loads(os.environ[CONFIG_ENV]))
    celery_app = flask_app.extensions["celery"]

    def _ready(**kwargs: t.Any) -> None:
        Path(os.environ[READY_ENV]).touch()

    worker_ready.connect(_ready, weak=False)
