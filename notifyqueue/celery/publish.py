"""Publishing intents as ``notifyqueue.deliver`` tasks, failing fast on a dead broker.

``delay()`` to a broker that is down can block a request for a long time
(celery #6046): Celery's connection timeout defaults to 4 s, publishes are
retried several times, and a hung Redis has no read timeout at all.
notifyqueue publishes over connections of its own, with their own
connect, read and confirm timeout (``NOTIFYQUEUE_CELERY_PUBLISH_TIMEOUT``):
a broker that refuses costs a request milliseconds, a hung one that timeout
once. On RabbitMQ the connection uses publisher confirms: a publish returns
once the broker has the message, not once it is in a socket buffer.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t

if t.TYPE_CHECKING:
    import celery
    import kombu.messaging

    from ..intent import Intent

logger = logging.getLogger("notifyqueue")

TASK_NAME = "notifyqueue.deliver"
"""The Celery task every intent of a celery channel becomes."""


class Publisher:
    """Publishes to one Celery app's broker, over connections it keeps.

    A commit takes one connection from a shared free list for all its
    intents and gives it back: a server that starts a thread per request
    does not open (and leak, until the garbage collector runs) a connection
    per thread, and a publish costs a round trip, not a connect. At most
    ``idle`` connections wait in the list; more are closed when given back.

    :param celery_app: the Celery app (``app.extensions["celery"]``).
    :param timeout: connect, read and confirm timeout of one try, in seconds.
    :param idle: connections kept open between commits.
    """

    def __init__(
        self, celery_app: celery.Celery, *, timeout: float, idle: int = 16
    ) -> None:
        self.celery_app = celery_app
        self.timeout = timeout
        self.idle = idle
        self._lock = threading.Lock()
        self._free: list[kombu.messaging.Producer] = []
        self._pid = os.getpid()

    def _new_producer(self) -> kombu.messaging.Producer:
        connection = self.celery_app.connection_for_write(
            connect_timeout=self.timeout,
            transport_options={
                # Redis: the socket's timeouts.
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                # RabbitMQ: the socket's timeouts, and wait for the broker's
                # confirmation of each publish.
                "read_timeout": self.timeout,
                "write_timeout": self.timeout,
                "confirm_publish": True,
                # Connecting is tried once; publish_all() decides on a retry.
                "max_retries": 0,
            },
        )
        return t.cast(
            "kombu.messaging.Producer", self.celery_app.amqp.Producer(connection)
        )

    def _acquire(self) -> kombu.messaging.Producer:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the parent's sockets are not ours to use
                # (nor to close: the parent still does).
                self._free = []
                self._pid = os.getpid()
            if self._free:
                return self._free.pop()
        return self._new_producer()

    def _release(self, producer: kombu.messaging.Producer) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._free) < self.idle:
                self._free.append(producer)
                return
        _discard(producer)

    def publish_all(
        self,
        intents: t.Sequence[Intent],
        queue_of: t.Callable[[Intent], str | None],
        **options: t.Any,
    ) -> tuple[int, Exception | None]:
        """Publish each intent as one task, ``task_id`` its id, in order.

        Stops at the first failure. A failed try drops its connection. One
        that failed on a kept connection (which the broker closed while it
        was idle, or a restart reset) is tried once more, on a new one; a try
        that timed out is not: the broker is hung, and a second wait would
        only double the request's.

        :return: how many were published, and the failure that stopped the
            rest (``None`` if none did).
        """
        producer = self._acquire()
        fresh = False
        published = 0
        try:
            while published < len(intents):
                intent = intents[published]
                try:
                    self._send(producer, intent, queue_of(intent), options)
                except Exception as exc:
                    _discard(producer)
                    if fresh or _timed_out(exc):
                        return published, exc
                    producer, fresh = self._new_producer(), True
                    continue
                published += 1
        except BaseException:
            _discard(producer)
            raise
        self._release(producer)
        return published, None

    def publish(self, intent: Intent, queue: str | None, **options: t.Any) -> None:
        """Publish one intent (see :meth:`publish_all`).

        :raises Exception: what kombu raised for the last try.
        """
        _, failure = self.publish_all([intent], lambda _: queue, **options)
        if failure is not None:
            raise failure

    def _send(
        self,
        producer: kombu.messaging.Producer,
        intent: Intent,
        queue: str | None,
        options: t.Mapping[str, t.Any],
    ) -> None:
        self.celery_app.send_task(
            TASK_NAME,
            args=[intent.to_dict()],
            task_id=intent.id,
            queue=queue,
            producer=producer,
            retry=False,
            # A broker that took the connection and went silent: the wait for
            # its confirmation ends too.
            timeout=self.timeout,
            confirm_timeout=self.timeout,
            ignore_result=True,
            # What logs and monitors show of the arguments: not the payload
            # (addresses, text), and Celery's repr() of it was a fifth of the
            # cost of a publish.
            argsrepr=f"[<intent {intent.id}>]",
            kwargsrepr="{}",
            **options,
        )

    def reset(self) -> None:
        """Close the connections kept between commits."""
        with self._lock:
            free, self._free = self._free, []
            mine = self._pid == os.getpid()
        if mine:
            for producer in free:
                _discard(producer)


def _discard(producer: kombu.messaging.Producer) -> None:
    """Release a producer's connection without waiting for the broker."""
    # collect(), not close(): a close waits for the broker's answer, which a
    # hung broker never sends.
    try:
        producer.connection.collect()
    except Exception:  # releasing a connection that already failed
        logger.debug("Releasing a failed broker connection raised.", exc_info=True)


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a timeout."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # socket.timeout is TimeoutError; redis-py and kombu have their own.
        if isinstance(current, TimeoutError) or "Timeout" in type(current).__name__:
            return True
        current = current.__cause__ or current.__context__
    return False
