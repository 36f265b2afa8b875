"""``"delivery": "background"``: a bounded per-process thread pool, one task per commit.

At most once: what is queued here lives in this process's memory only. A
crash, ``kill -9`` or a shutdown past ``NOTIFYQUEUE_SHUTDOWN_TIMEOUT`` loses it
(the last is logged with the intent ids).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
import time
import typing as t
import weakref

from .. import signals
from ..dispatch import remove_thread_session, send_isolated
from ..errors import ConfigurationError, LifecycleError
from ..intent import BatchResult
from ..outbox.fast_path import dispatch
from ..settings import seconds
from ..state import state_of
from .base import DeliveryMode

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import Intent
    from ..state import State

logger = logging.getLogger("notifyqueue")

_THREADS = "NOTIFYQUEUE_BACKGROUND_THREADS"
_QUEUE = "NOTIFYQUEUE_BACKGROUND_QUEUE"
_TIMEOUT = "NOTIFYQUEUE_SHUTDOWN_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class BackgroundStats:
    """Counts of one app's background delivery in this process.

    :param handed_off: intents handed to the pool.
    :param delivered: of those, intents every channel receiver handled.
    :param failed: of those, intents that failed (logged at ERROR and sent as
        ``intent_failed``).
    :param pending: of those, intents without an outcome yet.
    :param abandoned: of those, intents left without an outcome by a shutdown
        (logged at ERROR with their ids).
    :param inline_fallbacks: commits delivered inline, in the committing
        thread, because the queue was full or shutting down.
    """

    handed_off: int = 0
    delivered: int = 0
    failed: int = 0
    pending: int = 0
    abandoned: int = 0
    inline_fallbacks: int = 0


class BackgroundDelivery(DeliveryMode):
    """Hands each commit's intents to a thread pool; the commit returns at once.

    The pool is made at the first hand-off in each process (and again in a
    forked child, which never delivers its parent's work), so nothing starts
    at import or in ``init_app``. Each task delivers one commit's intents
    inside ``app.app_context()`` of the real app, then removes the session it
    used.
    """

    name = "background"
    settings: t.ClassVar[dict[str, t.Any]] = {
        _THREADS: 4,
        _QUEUE: 1000,
        _TIMEOUT: 10,
    }

    @classmethod
    def check_settings(cls, settings: t.Mapping[str, t.Any]) -> None:
        for key, what in ((_THREADS, "threads"), (_QUEUE, "commits waiting")):
            value = settings[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(
                    f"{key} is {value!r}; use a whole number of {what}, 1 or more."
                )
        seconds(settings, _TIMEOUT, minimum_above=None)

    def __init__(self, app: Flask, settings: t.Mapping[str, t.Any]) -> None:
        self.app_name = app.name
        self.threads: int = settings[_THREADS]
        self.capacity: int = settings[_QUEUE]
        self.shutdown_timeout: float = settings[_TIMEOUT]
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        """Start from nothing: at construction, and in a forked child."""
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # a task, or a stop
        self._ended = threading.Condition(self._lock)  # a task ended
        self._tasks: collections.deque[tuple[int, Flask, list[Intent]]] = (
            collections.deque()
        )
        # Sequence number -> intents, for every task queued or running; in
        # hand-off order (dicts keep insertion order).
        self._outstanding: dict[int, list[Intent]] = {}
        self._sequence = 0
        # The last sequence number a task handed off from a pool thread (a
        # channel that committed): wait() waits for those too.
        self._nested = 0
        self._local = threading.local()
        self._workers: list[threading.Thread] = []
        # Bumped by a shutdown: a worker of an older generation exits.
        self._generation = 0
        self._closing = False
        self._final = False
        self._counts = dict.fromkeys(
            ("handed_off", "delivered", "failed", "abandoned", "inline_fallbacks"), 0
        )

    def stats(self) -> BackgroundStats:
        with self._lock:
            pending = sum(len(intents) for intents in self._outstanding.values())
            return BackgroundStats(pending=pending, **self._counts)

    def deliver(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        with self._lock:
            refused = self._closing or len(self._tasks) >= self.capacity
            if refused:
                self._counts["inline_fallbacks"] += 1
            else:
                if not self._workers:
                    self._start()
                self._sequence += 1
                if getattr(self._local, "worker", False):
                    self._nested = self._sequence
                self._tasks.append((self._sequence, app, intents))
                self._outstanding[self._sequence] = intents
                self._counts["handed_off"] += len(intents)
                self._queued.notify()
        if not refused:
            result.pending.extend(intents)
            return
        if self._closing:
            why = "is shutting down"
        else:
            why = f"queue is full ({self.capacity} commits waiting, {_QUEUE})"
        logger.warning(
            "Background delivery of app %r %s: delivering this commit's %d"
            " notification(s) inline, in the committing thread.",
            self.app_name,
            why,
            len(intents),
        )
        dispatch(app, state, intents, result)

    def _start(self) -> None:
        """Start the workers (the lock is held)."""
        _register_exit_handler()
        generation = self._generation
        for number in range(self.threads):
            worker = threading.Thread(
                target=self._work,
                args=(generation,),
                name=f"notifyqueue-background-{self.app_name}-{number}",
                daemon=True,  # the exit handler, not the interpreter, joins them
            )
            worker.start()
            self._workers.append(worker)

    def _work(self, generation: int) -> None:
        self._local.worker = True
        while True:
            with self._lock:
                while not self._tasks or self._generation != generation:
                    if self._generation != generation:
                        return
                    self._queued.wait()
                sequence, app, intents = self._tasks.popleft()
            result = _run_task(app, intents)
            with self._lock:
                if self._outstanding.pop(sequence, None) is not None:
                    self._counts["delivered"] += len(result.dispatched)
                    self._counts["failed"] += len(result.failed)
                self._ended.notify_all()

    def _refuse_in_worker(self, what: str) -> None:
        if getattr(self._local, "worker", False):
            raise LifecycleError(
                f"{what} was called inside a background delivery task of app"
                f" {self.app_name!r}; it would wait for itself. Call it from the"
                " code that committed."
            )

    def wait(self, deadline: float) -> None:
        self._refuse_in_worker("wait()")
        with self._lock:
            last = self._sequence

            def settled() -> bool:
                return all(sequence > last for sequence in self._outstanding)

            while True:
                remaining = max(0.0, deadline - time.monotonic())
                if not self._ended.wait_for(settled, remaining):
                    break
                if self._nested <= last:
                    return
                # A task handed off more while we waited: wait for that too.
                last = self._sequence
            left = [
                intent.id
                for sequence, intents in self._outstanding.items()
                if sequence <= last
                for intent in intents
            ]
        raise TimeoutError(
            f"Background delivery of app {self.app_name!r} still has"
            f" {len(left)} notification(s) without an outcome:"
            f" {', '.join(left)}. Is a channel stalled?"
        )

    def shutdown(self, timeout: float) -> list[Intent]:
        self._refuse_in_worker("shutdown()")
        return self._shutdown(time.monotonic() + timeout, final=False)

    def _shutdown(self, deadline: float, *, final: bool) -> list[Intent]:
        """Let the workers finish until ``deadline``, then stop them.

        New hand-offs meanwhile are delivered inline. ``final`` (at exit)
        keeps it that way; otherwise the next hand-off starts a new pool.
        """
        with self._lock:
            if not self._workers:
                self._final = self._final or final
                self._closing = self._final
                return []
            self._closing = True
            self._ended.wait_for(
                lambda: not self._outstanding,
                max(0.0, deadline - time.monotonic()),
            )
            not_started = [
                intent for _, _, intents in self._tasks for intent in intents
            ]
            waiting = {sequence for sequence, _, _ in self._tasks}
            running = [
                intent
                for sequence, intents in self._outstanding.items()
                if sequence not in waiting
                for intent in intents
            ]
            self._tasks.clear()
            self._outstanding.clear()
            self._counts["abandoned"] += len(not_started) + len(running)
            self._generation += 1
            self._queued.notify_all()
            workers, self._workers = self._workers, []
            self._final = self._final or final
            self._closing = self._final
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if not_started or running:
            logger.error(
                "Background delivery of app %r stopped with %d notification(s)"
                " without an outcome (%s=%s s). Never started: %s. Still running,"
                " outcome unknown: %s. Background delivery is at most once; use"
                " durable delivery for what must survive a shutdown (a durable"
                " channel's intents stay in the outbox, for the drainer).",
                self.app_name,
                len(not_started) + len(running),
                _TIMEOUT,
                self.shutdown_timeout,
                ", ".join(intent.id for intent in not_started) or "none",
                ", ".join(intent.id for intent in running) or "none",
            )
        return not_started + running


def _run_task(app: Flask, intents: list[Intent]) -> BatchResult:
    """Deliver one commit's intents in an app context of ``app``; never raises."""
    state = state_of(app)
    result = BatchResult(committed=True)
    try:
        with app.app_context():
            dispatch(app, state, intents, result)
    except BaseException as exc:  # noqa: B036 - a worker must outlive any task
        decided = {intent.id for intent in result.dispatched}
        decided.update(intent.id for intent, _ in result.failed)
        undecided = [intent for intent in intents if intent.id not in decided]
        logger.error(
            "Background delivery of %d notification(s) of app %r raised outside"
            " the channels; %d of them failed: %s.",
            len(intents),
            app.name,
            len(undecided),
            ", ".join(intent.id for intent in undecided) or "none",
            exc_info=exc,
        )
        for intent in undecided:
            result.failed.append((intent, exc))
            send_isolated(signals.intent_failed, app, intent=intent, exception=exc)
    finally:
        remove_thread_session(state)
    return result


_pools: weakref.WeakSet[BackgroundDelivery] = weakref.WeakSet()
_exit_handler: list[bool] = []


def _register_exit_handler() -> None:
    # Registered at the first start, after logging's own handler, so it runs
    # before logging shuts down (atexit runs newest first).
    if not _exit_handler:
        _exit_handler.append(True)
        atexit.register(_finish_at_exit)


def _finish_at_exit() -> None:
    """At interpreter exit, give every pool its shutdown timeout, counted from now."""
    start = time.monotonic()
    for pool in list(_pools):
        pool._shutdown(start + pool.shutdown_timeout, final=True)


def _after_fork_in_child() -> None:
    # The parent's threads are gone and its locks may be held; its queued
    # work is the parent's to deliver, never the child's.
    for pool in list(_pools):
        pool._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
