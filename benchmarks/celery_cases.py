"""B7: Celery delivery. The request's cost of publishing its email to a local
Redis, against sending it inline (to a local SMTP server) and against
``"delivery": "background"``; the latency of one publish; the throughput of
one real worker process (solo pool) with a do-nothing channel.

Needs Redis (``NOTIFYQUEUE_TEST_REDIS_URL``, default db 5 of the local one,
the tests' own); :func:`redis_unreachable` says why it cannot run. Each run
uses queues of its own and deletes them, with the guard's keys of its
intents, afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import uuid
from pathlib import Path

from flask import Flask
from sqlalchemy import select

from notifyqueue import Intent, enqueue, finalise
from notifyqueue.state import state_of
from sample_app.extensions import db
from sample_app.models import Froggy

from .cases import Spread

REDIS_URL = os.environ.get("NOTIFYQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
RETAIN = 600
"""``NOTIFYQUEUE_CELERY_RETAIN`` here: what the run leaves in Redis expires."""
B7_SIDES = ("inline", "background", "celery")
"""B7's request sides: the sample's mail channel on each delivery mode."""


def redis_unreachable(url: str = REDIS_URL) -> str | None:
    """Why B7 cannot run (Celery or redis-py missing, Redis down), or None."""
    try:
        import celery  # noqa: F401
        import redis
    except ImportError as exc:
        return f"Celery or redis-py not installed ({exc}): pip install -e '.[bench]'"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means: not usable here
        return f"Redis at {url} unreachable: {type(exc).__name__}: {exc}"
    return None


def _queue() -> str:
    return f"nq-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _redis(url: str) -> t.Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def _forget(url: str, queues: t.Iterable[str], intent_ids: t.Iterable[str]) -> None:
    """Delete ``queues`` (with kombu's binding keys) and the guard's keys of
    ``intent_ids`` from the Redis at ``url``."""
    from notifyqueue.celery.guard import attempts_key, state_key

    client = _redis(url)
    try:
        for queue in queues:
            client.delete(
                queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
            )
        ids = sorted(set(intent_ids))
        for start in range(0, len(ids), 1000):
            keys = [
                k(i)
                for i in ids[start : start + 1000]
                for k in (state_key, attempts_key)
            ]
            client.delete(*keys)
    finally:
        client.close()


def _celery_config(url: str, queue: str) -> dict[str, t.Any]:
    return {
        "CELERY": {
            "broker_url": url,
            "task_ignore_result": True,
            "broker_connection_retry_on_startup": True,
        },
        "NOTIFYQUEUE_CELERY_GUARD": url,
        "NOTIFYQUEUE_CELERY_RETAIN": RETAIN,
    }


@contextlib.contextmanager
def _smtp_sink() -> t.Iterator[tuple[int, t.Callable[[], int]]]:
    """A :mod:`benchmarks.smtp_sink` process: its port, and a function that
    stops it and returns how many messages it received."""
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.smtp_sink"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert server.stdin is not None and server.stdout is not None
    received: list[int] = []

    def stop() -> int:
        if not received:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.close()
            received.append(int(server.stdout.readline() or 0))
            server.wait(timeout=30)
        return received[0]

    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("B7: the SMTP server did not start (see its stderr)")
        yield int(line), stop
    finally:
        if not received:
            try:
                stop()
            except Exception:
                server.kill()
                server.wait()


# -- the request's cost ---------------------------------------------------------


def b7_request(
    sqlite_url: str, requests: int, repeats: int, url: str = REDIS_URL
) -> dict[str, t.Any]:
    """The sample's colour endpoint (a log and a mail intent), through the test
    client, with the mail channel ``"inline"`` (sent to a local SMTP server,
    :mod:`benchmarks.smtp_sink`, in a process of its own), ``"background"``
    (the same server; the pool is waited for after each request, untimed)
    and ``"celery"`` (published to the local Redis; no worker runs, the
    queue is deleted afterwards). The three take turns request by request in
    a rotating order; each figure is a spread of ``repeats`` sample medians.

    Every inline and background email must have reached the server, and
    every celery one the queue, once.
    """
    from notifyqueue import signals, testing
    from sample_app import DEFAULT_CONFIG, create_app, logs

    queue = _queue()
    channels = DEFAULT_CONFIG["NOTIFYQUEUE_CHANNELS"]
    mail_options = {
        "inline": {"delivery": "inline"},
        "background": {"delivery": "background"},
        "celery": {"delivery": "celery", "celery_queue": queue},
    }
    published: list[str] = []
    apps: dict[str, Flask] = {}
    with _smtp_sink() as (port, stop_sink):
        try:
            for side in B7_SIDES:
                config: dict[str, t.Any] = {
                    "SQLALCHEMY_DATABASE_URI": sqlite_url,
                    "MAIL_SERVER": "127.0.0.1",
                    "MAIL_PORT": port,
                    "MAIL_SUPPRESS_SEND": False,
                    "NOTIFYQUEUE_CHANNELS": {
                        "log": channels["log"],
                        "mail": channels["mail"] | mail_options[side],
                    },
                }
                if side == "celery":
                    config |= _celery_config(url, queue)
                apps[side] = create_app(config)
            # The apps share one database, and the logger of their name; as
            # in B2, the sample's own receivers are not what is measured.
            app = apps["inline"]
            app.logger.handlers[:] = [logging.NullHandler()]
            app.logger.propagate = False
            signals.batch_committed.disconnect(logs._log_commit)
            signals.intent_dispatched.disconnect(logs._log_email)
            with app.app_context():
                db.drop_all()
                db.create_all()
                db.session.add(Froggy(name="kermit", colour="green", is_jumping=False))
                db.session.commit()
                froggy_id = db.session.scalars(select(Froggy.id)).one()
                db.session.remove()
            path = f"/froggies/{froggy_id}/colour"
            clients = {side: apps[side].test_client() for side in B7_SIDES}
            background = apps["background"]

            def put(side: str, colour: str) -> float:
                started = time.perf_counter()
                response = clients[side].put(path, json={"colour": colour})
                spent = time.perf_counter() - started
                notifications = (response.json or {}).get("notifications", {})
                if response.status_code != 200 or notifications.get("failed"):
                    raise RuntimeError(
                        f"B7: PUT {path} ({side}) answered {response.status_code}:"
                        f" {response.json}"
                    )
                if side == "celery":
                    published.extend(i["id"] for i in notifications["pending"])
                elif side == "background":
                    testing.wait(background)
                return spent

            def sample() -> dict[str, float]:
                times: dict[str, list[float]] = {side: [] for side in B7_SIDES}
                for i in range(requests):
                    for k in range(len(B7_SIDES)):
                        side = B7_SIDES[(i + k) % len(B7_SIDES)]
                        times[side].append(put(side, f"{side} {i}"))
                return {side: statistics.median(spent) for side, spent in times.items()}

            sample()  # warm up: connections, templates, the first publish
            medians: dict[str, list[float]] = {side: [] for side in B7_SIDES}
            ratios: dict[str, list[float]] = {"inline": [], "background": []}
            for _ in range(repeats):
                result = sample()
                for side, median in result.items():
                    medians[side].append(median)
                for other, other_ratios in ratios.items():
                    other_ratios.append(result["celery"] / result[other])
            left = testing.shutdown(background)
            client = _redis(url)
            try:
                queued = int(client.llen(queue))
            finally:
                client.close()
        finally:
            for served in apps.values():
                testing.shutdown(served)
            if apps:
                with apps["inline"].app_context():
                    db.session.remove()
                    db.drop_all()
                for served in apps.values():
                    with served.app_context():
                        db.engine.dispose()
            _forget(url, [queue], [])
        received = stop_sink()
    emails = requests * (repeats + 1)
    if left or received != 2 * emails or queued != emails or len(published) != emails:
        raise RuntimeError(
            f"B7: {received} emails received for {2 * emails} inline and background"
            f" ones, {queued} tasks queued and {len(published)} published for"
            f" {emails} celery ones; left without an outcome: {left}"
        )
    return {
        "requests per sample": requests,
        **{f"mail {side}": Spread.of(medians[side]).as_dict() for side in B7_SIDES},
        "celery to inline ratio": Spread.of(ratios["inline"]).as_dict(),
        "celery to background ratio": Spread.of(ratios["background"]).as_dict(),
    }


# -- publish latency and worker throughput --------------------------------------


def b7_publish(publishes: int, repeats: int, url: str = REDIS_URL) -> dict[str, t.Any]:
    """Seconds per publish of one intent (``Publisher.publish``: the task
    message, ``task_id`` the intent id, to the local Redis) on a kept
    connection, as every commit but the first finds one; and a publish that
    must open a connection first (the first commit of a process, or one
    while all kept connections are in use). The intents carry a short text
    payload. ``publish`` is a spread of ``repeats`` medians of ``publishes``
    each; ``publish opening a connection`` a spread of single ones, each in
    a new thread after the kept connections were closed, ``publishes // 10``
    of them (at least 5). Nothing consumes the queue; it is deleted
    afterwards.
    """
    queue = _queue()
    with tempfile.TemporaryDirectory() as directory:
        app = _throughput_app(url, queue, Path(directory) / "unused")
        publisher = _mode(app).publisher
        warm: list[float] = []
        cold: list[float] = []
        try:
            with app.app_context():
                # Warm up: the connection, and Celery's first message.
                publisher.publish(Intent.new("null", "warm-up", "enqueue"), queue)
                for _ in range(repeats):
                    times = []
                    for n in range(publishes):
                        intent = Intent.new("null", f"Froggy colour {n}", "enqueue")
                        started = time.perf_counter()
                        publisher.publish(intent, queue)
                        times.append(time.perf_counter() - started)
                    warm.append(statistics.median(times))
            for _ in range(max(5, publishes // 10)):
                thread = threading.Thread(target=_first_publish, args=(app, cold))
                thread.start()
                thread.join()
        finally:
            publisher.reset()
            _forget(url, [queue], [])
    return {
        "publishes per sample": publishes,
        "publish": Spread.of(warm).as_dict(),
        "publish opening a connection": Spread.of(cold).as_dict(),
    }


def _first_publish(app: Flask, times: list[float]) -> None:
    publisher = _mode(app).publisher
    intent = Intent.new("null", "Froggy colour updated", "enqueue")
    with app.app_context():
        started = time.perf_counter()
        publisher.publish(intent, _mode(app).queue_of(state_of(app), "null"))
        times.append(time.perf_counter() - started)
        publisher.reset()


def _mode(app: Flask) -> t.Any:
    return state_of(app).modes["celery"]


def _throughput_app(url: str, queue: str, path: Path) -> Flask:
    from .celery_worker import make_app

    return make_app(_throughput_config(url, queue, path))


def _throughput_config(url: str, queue: str, path: Path) -> dict[str, t.Any]:
    return _celery_config(url, queue) | {
        "NOTIFYQUEUE_CHANNELS": {
            "null": {
                "type": "benchmarks.celery_worker:FileChannel",
                "path": str(path),
                "delivery": "celery",
                "celery_queue": queue,
            }
        },
    }


def b7_worker(
    tasks: int, runs: int, per_commit: int = 10, url: str = REDIS_URL
) -> dict[str, t.Any]:
    """Tasks per second one real worker process (solo pool, started before
    and ready) delivers to a do-nothing channel that appends a line per
    intent to a file: ``tasks`` intents committed ``per_commit`` to a commit
    by this process, timed from the first publish to the last line written
    (the worker's clock: ``time.time()``). The worker runs the task as it
    would for any channel: the guard's claim and mark (two Redis round
    trips), the channel's send in an app context. Every intent must have
    been delivered exactly once.
    """
    from .celery_worker import WorkerProcess

    queue = _queue()
    rates: list[float] = []
    publish_rates: list[float] = []
    ids: list[str] = []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "delivered"
        config = _throughput_config(url, queue, path)
        app = _throughput_app(url, queue, path)
        worker = WorkerProcess(config, queue, Path(directory))
        try:
            with worker, app.app_context():
                startup = worker.startup_seconds
                _commits(app, per_commit, per_commit)  # warm up both sides
                _wait_delivered(path, per_commit, worker)
                for _ in range(runs):
                    path.unlink()
                    started = time.time()
                    run_ids = _commits(app, tasks, per_commit)
                    published = time.time()
                    lines = _wait_delivered(path, tasks, worker)
                    ids += run_ids
                    got = [intent_id for intent_id, _ in lines]
                    if sorted(got) != sorted(run_ids):
                        raise RuntimeError(
                            f"B7: {len(got)} deliveries ({len(set(got))} intents)"
                            f" for {tasks} published"
                        )
                    last = max(moment for _, moment in lines)
                    rates.append(tasks / (last - started))
                    publish_rates.append(tasks / (published - started))
        finally:
            _mode(app).publisher.reset()
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            _forget(url, [queue], ids)
    return {
        "tasks": tasks,
        "per commit": per_commit,
        "runs": runs,
        "worker startup seconds": startup,
        "tasks per second": Spread.of(rates).as_dict(),
        "publishes per second": Spread.of(publish_rates).as_dict(),
    }


def _commits(app: Flask, intents: int, per_commit: int) -> list[str]:
    """Commit ``intents`` intents of the celery channel, ``per_commit`` to a
    commit; return their ids, in publish order."""
    ids: list[str] = []
    for start in range(0, intents, per_commit):
        for n in range(start, min(intents, start + per_commit)):
            enqueue("null", "Froggy colour updated: {n}", n=n)
        result = finalise(commit=True)
        if result.failed:
            raise RuntimeError(f"B7: publishing failed: {result.failed[0][1]!r}")
        ids += [intent.id for intent in result.pending]
    return ids


def _wait_delivered(
    path: Path, count: int, worker: t.Any, timeout: float = 120
) -> list[tuple[str, float]]:
    """The lines of ``path`` once there are ``count``. Polled gently (the
    size first), as the worker needs the CPU; the times are the worker's."""
    from .celery_worker import LINE_BYTES, delivered

    deadline = time.monotonic() + timeout
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= count * LINE_BYTES:
            lines = delivered(path)
            if len(lines) >= count:
                return lines
        if worker.exited or time.monotonic() > deadline:
            lines = delivered(path)
            raise RuntimeError(
                f"B7: the worker delivered {len(lines)} of {count} intents"
                f" ({'it exited' if worker.exited else f'in {timeout} s'}); its log"
                f" ends:\n{worker.log_tail()}"
            )
        time.sleep(0.02)
