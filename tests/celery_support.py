"""Real brokers and real Celery worker processes for tests: no eager mode.

A test module uses the fixtures with ``pytest_plugins = ["tests.celery_support"]``
(it may import names from here too: a test module is imported before pytest
loads its plugins, so this module is marked PYTEST_DONT_REWRITE, or pytest
would warn that it cannot rewrite its asserts; it has none that need it).

- :func:`require_redis` / :func:`require_rabbitmq`: the broker's URL, or a skip
  (a failure under ``NOTIFYQUEUE_REQUIRE_SERVICES=1``) saying why; each broker
  is checked once per run.
- ``broker_url``: parametrised over ``redis`` and ``rabbitmq``.
- ``celery_queue``: a queue name of the test's own, deleted from the broker
  afterwards with whatever was left in it (on Redis also its unacknowledged
  messages, so no later worker restores them).
- ``broker_proxy``: a started :class:`~tests.tcp_proxy.TCPProxy` in front of
  the broker; :func:`proxied_url` points a URL at it.
- ``make_worker``: starts :class:`Worker` processes and ends each at teardown.
- :func:`transport_options` keeps a test's unacknowledged Redis messages out
  of other runs' reach; :func:`redelivery_options` makes Redis hand a dead
  worker's task out again within seconds instead of an hour.

Celery workers are run as in Flask's guide, ``celery -A <target> worker``, with
``--pool=solo`` (the worker is one process: its pid is all of it) and without
mingle, gossip and worker event heartbeats (nothing to wait for at start-up,
nothing shared between tests). On this machine a worker is ready 0.5 to 1.5 s
after it is started, almost all of it imports; a warm shutdown takes about
0.7 s on RabbitMQ and 1 to 2 s on Redis (its consumer blocks in BRPOP for up
to 1 s before it sees the signal).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import typing as t
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from .tcp_proxy import TCPProxy

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

REDIS_URL = os.environ.get("NOTIFYQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
AMQP_URL = os.environ.get(
    "NOTIFYQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
REQUIRE_SERVICES = os.environ.get("NOTIFYQUEUE_REQUIRE_SERVICES") == "1"

BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}

_unreachable: dict[str, str | None] = {}

# The Redis transport's own keys (kombu.transport.redis.Channel), in the
# broker's database: messages taken by a consumer and not yet acknowledged.
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"
# kombu stores priority ``p`` of queue ``q`` under ``q + sep + str(p)`` (0 is ``q``).
_REDIS_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def _check(kind: str) -> str | None:
    """Why the ``kind`` broker cannot be used, or None; checked once per run."""
    if kind not in _unreachable:
        url = BROKERS[kind]
        try:
            if kind == "redis":
                import redis

                client = redis.Redis.from_url(
                    url, socket_timeout=2, socket_connect_timeout=2
                )
                try:
                    client.ping()
                finally:
                    client.close()
            else:
                from kombu import Connection

                with Connection(url, connect_timeout=2) as connection:
                    connection.ensure_connection(max_retries=0)
            _unreachable[kind] = None
        except Exception as exc:  # any failure means: not usable here
            _unreachable[kind] = f"{kind} at {url} unreachable: {exc!r}"
    return _unreachable[kind]


def _require(kind: str) -> str:
    reason = _check(kind)
    if reason is not None:
        print(reason)
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (NOTIFYQUEUE_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return BROKERS[kind]


def require_redis() -> str:
    """The Redis broker URL (``NOTIFYQUEUE_TEST_REDIS_URL``), or skip (or fail)."""
    return _require("redis")


def require_rabbitmq() -> str:
    """The RabbitMQ broker URL (``NOTIFYQUEUE_TEST_AMQP_URL``), or skip (or fail)."""
    return _require("rabbitmq")


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"rabbitmq"``, from a broker URL's scheme."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "rabbitmq"
    raise ValueError(f"Unknown broker URL scheme {scheme!r} in {url!r}.")


def broker_address(url: str) -> tuple[str, int]:
    """The host and port of a broker URL (with the transport's default port)."""
    parts = urlsplit(url)
    default = 6379 if broker_kind(url) == "redis" else 5672
    return parts.hostname or "127.0.0.1", parts.port or default


def proxied_url(url: str, proxy: TCPProxy) -> str:
    """``url`` with its host and port replaced by ``proxy``'s."""
    parts = urlsplit(url)
    credentials, _, _ = parts.netloc.rpartition("@")
    netloc = f"{proxy.host}:{proxy.port}"
    if credentials:
        netloc = f"{credentials}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def unique_name(prefix: str = "nq-test") -> str:
    """A name no other test (of this run or another) uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    message: str | Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Return once ``predicate()`` is true; after ``timeout`` s raise AssertionError.

    :param message: what did not happen; a callable is called for it only on
        failure (to include, say, a worker's log).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout} s)")
        time.sleep(interval)


def transport_options(url: str, queue: str) -> dict[str, t.Any]:
    """Broker transport options that keep a test's Redis bookkeeping to itself.

    The Redis transport keeps the messages a consumer took and has not yet
    acknowledged in one hash per database, and any consumer of the database
    hands those older than *its own* visibility timeout back to their queue.
    Runs on one machine share the database, so a worker with a short
    visibility timeout would redeliver another run's task while that run's
    worker is still executing it. With these options (give them to the
    worker's app and the publisher's) a test's unacknowledged messages live
    under keys named after its queue, and :func:`delete_queue` deletes them.
    RabbitMQ needs none: there, unacknowledged means held by a connection.
    """
    if broker_kind(url) != "redis":
        return {}
    return {
        "unacked_key": f"{queue}.unacked",
        "unacked_index_key": f"{queue}.unacked_index",
        "unacked_mutex_key": f"{queue}.unacked_mutex",
    }


def redelivery_options(visibility_timeout: float) -> dict[str, t.Any]:
    """Redis transport options under which a worker hands back, within about
    ``visibility_timeout`` + 1 s, a task a dead worker took (default: 1 h).

    The worker's sweep runs every ``unacked_restore_interval`` s but scans
    only every ``unacked_restore_throttle``-th time (10 s and 10 by default).
    Mind that a task still running after ``visibility_timeout`` is handed out
    again too: that is the Redis transport's duplicate.
    """
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }


def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` and every message it holds from the broker at ``url``.

    On Redis also its unacknowledged messages, in the keys of
    :func:`transport_options` and in kombu's shared ``unacked`` hash (where a
    later worker of any queue would restore them after the visibility
    timeout), and the queue's binding tables.
    """
    if broker_kind(url) == "redis":
        _delete_redis_queue(url, queue)
    else:
        _delete_amqp_queue(url, queue)


def _delete_redis_queue(url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = [queue, *(f"{queue}{_REDIS_SEP}{step}" for step in _PRIORITY_STEPS)]
        keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        keys += transport_options(url, queue).values()
        client.delete(*keys)
        tags = []
        for tag, value in client.hscan_iter(_UNACKED):
            _message, exchange, routing_key = json.loads(value)
            if queue in (exchange, routing_key):
                tags.append(tag)
        if tags:
            client.hdel(_UNACKED, *tags)
            client.zrem(_UNACKED_INDEX, *tags)
    finally:
        client.close()


def _delete_amqp_queue(url: str, queue: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as connection:
        channel = connection.default_channel
        # RabbitMQ deletes a queue or exchange that does not exist without
        # complaint, so a test that never declared its queue costs nothing.
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The URL of a real broker: Redis, then RabbitMQ; skips an unreachable one."""
    return _require(request.param)


@pytest.fixture
def _celery_workers() -> list[Worker]:
    """The workers ``make_worker`` started in this test."""
    return []


@pytest.fixture
def celery_queue(broker_url: str, _celery_workers: list[Worker]) -> Iterator[str]:
    """A queue name of this test's own; the queue is deleted from the broker after.

    The test's workers are stopped first, whatever the order of the fixtures:
    a worker still consuming would declare the queue again, or (Redis, warm
    shutdown) push its unacknowledged task back into it.
    """
    queue = unique_name()
    yield queue
    for worker in _celery_workers:
        worker.stop()
    try:
        delete_queue(broker_url, queue)
    except Exception:
        # The test's outcome stands; a leftover queue of a unique name
        # disturbs no other test, but it is worth knowing about.
        logger.exception("Could not delete the test queue %r at %s", queue, broker_url)


@pytest.fixture
def broker_proxy(broker_url: str) -> Iterator[TCPProxy]:
    """A started proxy in front of the broker, stopped (and joined) after the test."""
    with TCPProxy(*broker_address(broker_url)) as proxy:
        yield proxy


class Worker:
    """A real Celery worker process: ``celery -A <target> worker``, one pool process.

    :param target: the Celery app, as ``-A`` takes it (``module:attribute``).
    :param queue: the one queue it consumes.
    :param log_path: where its stdout and stderr go.
    :param env: added to this process's environment.
    :param args: more worker options.

    It runs in a session of its own (a Ctrl-C in the terminal does not reach
    it: the test ends it). Use it in a ``with`` block, or through the
    ``make_worker`` fixture, so it is always ended.
    """

    def __init__(
        self,
        target: str,
        queue: str,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.target = target
        self.queue = queue
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.name = unique_name("worker")
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            target,
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
            "--loglevel=INFO",
            # Celery config from the command line. The worker's event loop
            # polls for up to 10 s when no timer is due sooner, and notices a
            # SIGTERM only then: on RabbitMQ (60 s heartbeats negotiated)
            # this check every half second makes a warm shutdown take about
            # a second instead of 10. The heartbeat itself is unchanged.
            "broker_heartbeat_checkrate=120",
            *args,
        ]
        self.popen: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError("The worker was not started.")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (``-9`` for SIGKILL), else None."""
        return None if self.popen is None else self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self, timeout: float = 30) -> Worker:
        """Start the process; return once it consumes its queue.

        Raises ``RuntimeError`` with the log's tail if it exits first, or
        (after ending it) if it is not ready within ``timeout`` seconds.
        """
        if self.popen is not None:
            raise RuntimeError(f"The worker {self.name} was already started.")
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # celery.apps.worker logs "<name>@<host> ready." once it consumes.
        ready = re.compile(rf"{re.escape(self.name)}@\S* ready\.")
        deadline = started + timeout
        while not ready.search(self.log_text()):
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"The worker exited with {self.popen.returncode} before it"
                    f" was ready; its log ends:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"The worker was not ready within {timeout} s; its log ends:"
                    f"\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started
        return self

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def search() -> bool:
            match = regex.search(self.log_text())
            if match:
                found.append(match)
            return match is not None

        wait_until(
            search,
            timeout,
            lambda: f"{pattern!r} not in the worker's log:\n{self.log_tail()}",
        )
        return found[0]

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM (Celery's warm shutdown: the task in hand finishes), then
        SIGKILL after ``timeout`` seconds; return the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "Worker %s (pid %s) ignored SIGTERM for %s s; killing it",
                    self.name,
                    self.pid,
                    timeout,
                )
                self.kill()
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the process (a crash: nothing is acknowledged); wait for it."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGKILL)
            self.popen.wait(10)
        return self.popen.returncode

    def _signal(self, signum: int) -> None:
        assert self.popen is not None
        try:
            os.kill(self.popen.pid, signum)
        except ProcessLookupError:
            pass  # it exited (unreaped) between poll() and kill()

    def __enter__(self) -> Worker:
        if self.popen is None:
            self.start()
        return self

    def __exit__(self, *exc_info: t.Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self.popen.pid if self.popen else None
        return f"<Worker {self.name} pid={pid} queue={self.queue!r}>"


MakeWorker = Callable[..., Worker]


@pytest.fixture
def make_worker(tmp_path: Path, _celery_workers: list[Worker]) -> Iterator[MakeWorker]:
    """Start workers: ``make_worker(target, queue, env={...})``; all end at teardown.

    Keyword arguments go to :class:`Worker` (``args=``) and to
    :meth:`Worker.start` (``timeout=``). Each worker's log is
    ``tmp_path / "worker-<n>.log"``. Teardown stops each (SIGTERM, then
    SIGKILL after 10 s); a worker the test already ended is left as it is.
    """
    workers = _celery_workers

    def start(
        target: str,
        queue: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        timeout: float = 30,
    ) -> Worker:
        worker = Worker(
            target,
            queue,
            tmp_path / f"worker-{len(workers)}.log",
            env=env,
            args=args,
        )
        workers.append(worker)
        return worker.start(timeout)

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()
