"""Publishing intents as ``notifyqueue.deliver`` tasks, failing fast on a dead broker.

``delay()`` to a broker that is down can block a request for a long time
(celery #6046): Celery's connection timeout defaults to 4 s and publishes are
retried several times. notifyqueue publishes over a connection of its own per
thread, with its own connect and read timeout and at most two tries, so a
dead or hung broker costs a request about a second at most. On RabbitMQ the
connection uses publisher confirms: a publish returns once the broker has the
message, not once it is in a socket buffer.
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
                    "max_retries": 1,
                },
            )
            producer = self.celery_app.amqp.Producer(connection)
            self._local.producer = producer
        return producer

    def publish(self, intent: Intent, queue: str | None, **options: t.Any) -> None:
        """Publish ``intent`` as one task, ``task_id`` its id.

        :raises Exception: whatever kombu raised, once two tries failed (the
            connection is then dropped; the next publish opens a new one).
        """
        producer = self._producer()
        try:
            self.celery_app.send_task(
                TASK_NAME,
                args=[intent.to_dict()],
                task_id=intent.id,
                queue=queue,
                producer=producer,
                retry=True,
                retry_policy=_RETRY_POLICY,
                # A broker that took the connection and went silent: the
                # wait for its confirmation ends too.
                timeout=self.timeout,
                confirm_timeout=self.timeout,
                ignore_result=True,
                **options,
            )
        except BaseException:
            self.reset()
            raise

    def reset(self) -> None:
        """Drop this thread's connection."""
        producer = getattr(self._local, "producer", None)
        self._local.producer = None
        if producer is not None:
            try:
                producer.connection.close()
            except Exception:  # closing a connection that already failed
                logger.debug(
                    "Closing a failed broker connection raised.", exc_info=True
                )


# One retry, at once: enough for a connection the broker closed while idle,
# not enough to hold a request while a dead broker refuses.
_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.1,
    "interval_max": 0.1,
}
