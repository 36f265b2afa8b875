"""The Celery test infrastructure itself, against the real brokers (no notifyqueue).

A real worker process runs ``tests/celery_echo_app.py``; the test publishes to
it, directly or through a :class:`~tests.tcp_proxy.TCPProxy` that it stops or
stalls to play a broker that is down or hung.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import typing as t
from pathlib import Path

import pytest
from celery import Celery
from kombu.exceptions import OperationalError

from .celery_echo_app import TASK, fast_fail_options, make_app
from .celery_support import (
    MakeWorker,
    Worker,
    broker_address,
    broker_kind,
    delete_queue,
    proxied_url,
    redelivery_options,
    require_redis,
    transport_options,
    unique_name,
    wait_until,
)
from .tcp_proxy import TCPProxy

pytest_plugins = ["tests.celery_support"]

ECHO = "tests.celery_echo_app:celery_app"
TIMEOUT = 0.5
"""Connect and read timeout of a fast-failing publisher, in seconds."""


@contextlib.contextmanager
def publisher(url: str, **settings: t.Any) -> t.Iterator[Celery]:
    """An echo app to publish with; its broker connections are closed after."""
    app = make_app(url, **settings)
    try:
        yield app
    finally:
        app.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_worker_runs_a_task_published_through_the_proxy(
    broker_url: str,
    celery_queue: str,
    broker_proxy: TCPProxy,
    make_worker: MakeWorker,
    tmp_path: Path,
) -> None:
    worker = make_worker(ECHO, celery_queue, env={"ECHO_BROKER_URL": broker_url})
    out = tmp_path / "out"
    with publisher(proxied_url(broker_url, broker_proxy)) as app:
        app.send_task(TASK, args=[str(out), "one"], queue=celery_queue)
        app.send_task(TASK, args=[str(out), "two"], queue=celery_queue)
    wait_until(lambda: len(lines(out)) == 2, 10, worker.log_tail)
    assert lines(out) == ["one", "two"]
    assert broker_proxy.connections >= 1
    assert worker.stop() == 0


def test_a_publish_to_a_stopped_broker_fails_fast_and_works_once_it_is_back(
    broker_url: str, celery_queue: str, broker_proxy: TCPProxy
) -> None:
    url = proxied_url(broker_url, broker_proxy)
    with publisher(url, **fast_fail_options(url, TIMEOUT)) as app:
        app.send_task(TASK, args=["unused", "before"], queue=celery_queue)
        broker_proxy.stop()
        for _ in range(2):  # on the reset connection, then on a refused one
            started = time.monotonic()
            with pytest.raises(OperationalError):
                app.send_task(TASK, args=["unused", "down"], queue=celery_queue)
            assert time.monotonic() - started < 2 * TIMEOUT + 0.5
        broker_proxy.start()
        app.send_task(TASK, args=["unused", "after"], queue=celery_queue)


def test_a_publish_to_a_hung_broker_times_out(
    broker_url: str, celery_queue: str, broker_proxy: TCPProxy
) -> None:
    url = proxied_url(broker_url, broker_proxy)
    broker_proxy.stall()
    with publisher(url, **fast_fail_options(url, TIMEOUT)) as app:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            app.send_task(TASK, args=["unused", "hung"], queue=celery_queue)
        elapsed = time.monotonic() - started
    assert TIMEOUT * 0.9 <= elapsed < 4 * TIMEOUT + 0.5


def test_a_killed_workers_task_is_redelivered_to_the_next_worker(
    broker_url: str, celery_queue: str, make_worker: MakeWorker, tmp_path: Path
) -> None:
    # Redis hands an unacknowledged task out again only after its visibility
    # timeout (1 h by default; 1 s here); RabbitMQ as the connection drops.
    options = transport_options(broker_url, celery_queue)
    if broker_kind(broker_url) == "redis":
        options |= redelivery_options(visibility_timeout=1)
    env = {"ECHO_BROKER_URL": broker_url, "ECHO_TRANSPORT_OPTIONS": json.dumps(options)}
    first = make_worker(ECHO, celery_queue, env=env)
    out = tmp_path / "out"
    started = tmp_path / "out.started"
    with publisher(broker_url, broker_transport_options=options) as app:
        app.send_task(TASK, args=[str(out), "once", 30.0], queue=celery_queue)
    wait_until(lambda: len(lines(started)) == 1, 10, first.log_tail)
    assert first.kill() == -9
    killed = time.monotonic()
    second = make_worker(ECHO, celery_queue, env=env)
    wait_until(lambda: len(lines(started)) == 2, 10, second.log_tail)
    print(f"{broker_kind(broker_url)}: redelivered {time.monotonic() - killed:.2f} s")
    assert lines(out) == []  # the second execution is still holding
    assert second.kill() == -9


def test_a_short_visibility_timeout_leaves_other_queues_tasks_alone(
    make_worker: MakeWorker, tmp_path: Path
) -> None:
    # With kombu's shared "unacked" hash, the second worker would hand the
    # first one's running task back to its queue after 1 s, and it would run
    # twice (checked by hand: it does).
    url = require_redis()
    busy, other = unique_name(), unique_name()
    busy_options = transport_options(url, busy)
    other_options = transport_options(url, other) | redelivery_options(1)
    workers: list[Worker] = []
    out = tmp_path / "out"
    try:
        env = {
            "ECHO_BROKER_URL": url,
            "ECHO_TRANSPORT_OPTIONS": json.dumps(busy_options),
        }
        workers.append(make_worker(ECHO, busy, env=env))
        with publisher(url, broker_transport_options=busy_options) as app:
            app.send_task(TASK, args=[str(out), "once", 3.0], queue=busy)
        wait_until(lambda: lines(tmp_path / "out.started"), 10, workers[0].log_tail)
        env = {
            "ECHO_BROKER_URL": url,
            "ECHO_TRANSPORT_OPTIONS": json.dumps(other_options),
        }
        workers.append(make_worker(ECHO, other, env=env))
        wait_until(lambda: lines(out) == ["once"], 10, workers[0].log_tail)
        time.sleep(1)  # time for a copy to be fetched, had one been restored
        assert lines(tmp_path / "out.started") == ["started once"]
    finally:
        for worker in workers:  # before their queues go: see celery_queue
            worker.stop()
        for queue in (busy, other):
            delete_queue(url, queue)


@pytest.mark.parametrize("isolated", [True, False], ids=["own-keys", "shared-keys"])
def test_deleting_a_queue_leaves_nothing_of_it_on_the_broker(
    broker_url: str, isolated: bool, make_worker: MakeWorker, tmp_path: Path
) -> None:
    queue = unique_name()
    options = transport_options(broker_url, queue) if isolated else {}
    env = {"ECHO_BROKER_URL": broker_url, "ECHO_TRANSPORT_OPTIONS": json.dumps(options)}
    worker = make_worker(ECHO, queue, env=env)
    out = tmp_path / "out"
    with publisher(broker_url, broker_transport_options=options) as app:
        app.send_task(TASK, args=[str(out), "held", 30.0], queue=queue)
        wait_until(lambda: (tmp_path / "out.started").exists(), 10, worker.log_tail)
        worker.kill()  # its task stays unacknowledged
        app.send_task(TASK, args=[str(out), "waiting"], queue=queue)
    delete_queue(broker_url, queue)
    assert queue_leftovers(broker_url, queue) == []


def queue_leftovers(url: str, queue: str) -> list[str]:
    """What the broker at ``url`` still holds of ``queue``."""
    if broker_kind(url) == "redis":
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = [key.decode() for key in client.scan_iter(f"*{queue}*")]
            unacked = [
                tag.decode()
                for tag, value in client.hscan_iter("unacked")
                if queue.encode() in value
            ]
            unacked += [
                tag.decode()
                for tag, _ in client.zscan_iter("unacked_index")
                if tag.decode() in unacked
            ]
            return keys + unacked
        finally:
            client.close()
    from kombu import Connection

    with Connection(url, connect_timeout=5) as connection:
        try:
            connection.default_channel.queue_declare(queue, passive=True)
        except connection.channel_errors:
            return []  # 404 NOT_FOUND: the queue is gone
        return [queue]


def test_a_worker_that_cannot_start_raises_with_its_log(
    make_worker: MakeWorker,
) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with \d+.*no_such_module"):
        make_worker("tests.no_such_module:celery_app", unique_name())


def test_the_proxy_refuses_resets_and_comes_back_on_the_same_port() -> None:
    url = require_redis()
    with TCPProxy(*broker_address(url)) as proxy:
        old = socket.create_connection(proxy.address, timeout=5)
        old.sendall(b"PING\r\n")
        assert old.recv(100) == b"+PONG\r\n"
        proxy.stop()
        with pytest.raises(ConnectionResetError):
            old.sendall(b"PING\r\n")
            old.recv(100)
        old.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=5).close()
        port = proxy.port
        proxy.start()
        assert proxy.port == port
        with socket.create_connection(proxy.address, timeout=5) as new:
            new.sendall(b"PING\r\n")
            assert new.recv(100) == b"+PONG\r\n"
        assert proxy.connections == 2


def test_a_stalled_proxy_holds_the_conversation_until_it_resumes() -> None:
    url = require_redis()
    with TCPProxy(*broker_address(url)) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
            proxy.stall()
            sock.sendall(b"PING\r\n")
            with socket.create_connection(proxy.address, timeout=5) as late:
                late.sendall(b"PING\r\n")
                late.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    late.recv(100)
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(100)
                proxy.resume()
                late.settimeout(5)
                sock.settimeout(5)
                assert late.recv(100) == b"+PONG\r\n"
                assert sock.recv(100) == b"+PONG\r\n"
