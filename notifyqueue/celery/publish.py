"""Publishing intents as ``notifyqueue.deliver`` tasks, failing fast on a dead broker.

``delay()`` to a broker that is down can block a request for a long time
(celery #6046): Celery's connection timeout defaults to 4 s, publishes are
retried several times, and a hung Redis has no read timeout at all.
notifyqueue publishes over a connection of its own per thread, with its own
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
    """Publishes to one Celery app's broker.

    :param celery_app: the Celery app (``app.extensions["celery"]``).
    :param timeout: connect and read timeout of one try, in seconds.
    """

    def __init__(self, celery_app: celery.Celery, *, timeout: float) -> None:
        self.celery_app = celery_app
        self.timeout = timeout
        self._local = threading.local()
        self._pid = os.getpid()

    def _producer(self) -> kombu.messaging.Producer:
        if self._pid != os.getpid():
            # A forked child: the parent's sockets are not ours to use.
            self._local = threading.local()
            self._pid = os.getpid()
        producer: kombu.messaging.Producer | None = getattr(
            self._local, "producer", None
        )
        if producer is None:
            connection = self.celery_app.connection_for_write(
                connect_timeout=self.timeout,
                transport_options={
                    # Redis: the socket's timeouts.
                    "socket_timeout": self.timeout,
                    "socket_connect_timeout": self.timeout,
                    # RabbitMQ: the socket's timeouts, and wait for the
                    # broker's confirmation of each publish.
                    "read_timeout": self.timeout,
                    "write_timeout": self.timeout,
                    "confirm_publish": True,
                    # Connecting is tried once; publish() decides on a retry.
                    "max_retries": 0,
                },
            )
            producer = self.celery_app.amqp.Producer(connection)
            self._local.producer = producer
        return producer

    def publish(self, intent: Intent, queue: str | None, **options: t.Any) -> None:
        """Publish ``intent`` as one task, ``task_id`` its id.

        A failed try drops the connection. A connection that failed (one the
        broker closed while it was idle, say) is retried once on a new one;
        a try that timed out is not: the broker is hung, and a second wait
        would only double the request's.

        :raises Exception: whatever kombu raised for the last try.
        """
        for last in (False, True):
            producer = self._producer()
            try:
                self.celery_app.send_task(
                    TASK_NAME,
                    args=[intent.to_dict()],
                    task_id=intent.id,
                    queue=queue,
                    producer=producer,
                    retry=False,
                    # A broker that took the connection and went silent:
                    # the wait for its confirmation ends too.
                    timeout=self.timeout,
                    confirm_timeout=self.timeout,
                    ignore_result=True,
                    **options,
                )
                return
            except Exception as exc:
                self.reset()
                if last or _timed_out(exc):
                    raise
            except BaseException:
                self.reset()
                raise

    def reset(self) -> None:
        """Drop this thread's connection, without waiting for the broker."""
        producer = getattr(self._local, "producer", None)
        self._local.producer = None
        if producer is not None:
            # collect(), not close(): a close waits for the broker's answer,
            # which a hung broker never sends.
            try:
                producer.connection.collect()
            except Exception:  # releasing a connection that already failed
                logger.debug(
                    "Releasing a failed broker connection raised.", exc_info=True
                )


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
