"""``"delivery": "celery"``: publish each intent as a Celery task after COMMIT.

The committing thread publishes one ``notifyqueue.deliver`` task per intent,
``task_id`` the intent id, in call order; a Celery worker running the same
Flask app delivers it (:mod:`notifyqueue.celery.task`). At most once unless
the channel is durable: a crash between COMMIT and the publish loses the
intents, as Django's ``on_commit`` would. With ``"durable": True`` the
intents are in the outbox first, and a row is done only once the broker has
accepted its task.
"""

from __future__ import annotations

import logging
import typing as t

from .. import signals
from ..dispatch import send_isolated
from ..errors import ConfigurationError, TransientFailure
from ..intent import BatchResult
from ..outbox.fast_path import dispatch
from ..settings import seconds
from .base import DeliveryMode

if t.TYPE_CHECKING:
    from flask import Flask

    from ..celery.guard import Guard
    from ..celery.publish import Publisher
    from ..intent import Intent
    from ..state import State

logger = logging.getLogger("notifyqueue")

_GUARD = "NOTIFYQUEUE_CELERY_GUARD"
_LEASE = "NOTIFYQUEUE_CELERY_LEASE"
_RETAIN = "NOTIFYQUEUE_CELERY_RETAIN"
_TIMEOUT = "NOTIFYQUEUE_CELERY_PUBLISH_TIMEOUT"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

GUIDE = "https://flask.palletsprojects.com/en/stable/patterns/celery/"


class CeleryDelivery(DeliveryMode):
    """Publishes committed intents to ``app.extensions["celery"]``'s broker."""

    name = "celery"
    settings: t.ClassVar[dict[str, t.Any]] = {
        _GUARD: None,
        _LEASE: 60,
        _RETAIN: 86400,
        _TIMEOUT: 0.5,
    }

    @classmethod
    def check_settings(cls, settings: t.Mapping[str, t.Any]) -> None:
        guard = settings[_GUARD]
        if guard is not None and (
            not isinstance(guard, str) or not guard.startswith(_REDIS_SCHEMES)
        ):
            raise ConfigurationError(
                f"{_GUARD} is {guard!r}; use a redis:// (or rediss://, unix://) URL"
                " of the Redis that remembers delivered intents, or None for the"
                " Celery broker's own Redis."
            )
        for key in (_LEASE, _RETAIN, _TIMEOUT):
            seconds(settings, key, minimum_above=0)

    def __init__(self, app: Flask, settings: t.Mapping[str, t.Any]) -> None:
        try:
            import celery
        except ImportError as exc:
            raise ConfigurationError(
                "A channel has 'delivery': 'celery', but Celery is not installed;"
                ' install it with `pip install "notifyqueue[celery]"`.'
            ) from exc
        from ..celery.guard import Guard
        from ..celery.publish import Publisher

        celery_app = app.extensions.get("celery")
        if not isinstance(celery_app, celery.Celery):
            raise ConfigurationError(
                f"A channel of app {app.name!r} has 'delivery': 'celery', but"
                " app.extensions['celery'] holds no Celery app"
                f" ({celery_app!r}). Set it up as Flask's Celery guide does"
                f" ({GUIDE}): celery_init_app(app) stores it there; call it before"
                " NotifyQueue(app) / notify.init_app(app)."
            )
        self.celery_app = celery_app
        self.lease: float = float(settings[_LEASE])
        self.retain: float = float(settings[_RETAIN])
        self.guard: Guard = Guard(_guard_url(celery_app, settings[_GUARD]))
        self.publisher: Publisher = Publisher(
            celery_app, timeout=float(settings[_TIMEOUT])
        )

    def init_app(self, app: Flask) -> None:
        # Only once init_app has succeeded: a refused config leaves the
        # Celery app without the task.
        from ..celery.task import link, register

        link(self.celery_app, app)
        register(self.celery_app)

    def deliver(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        published = BatchResult(committed=True)
        # The durable ones are settled in the outbox once published.
        dispatch(app, state, intents, published, send=self.dispatch_now)
        # Published is handed off: the worker decides the outcome.
        result.pending.extend(published.dispatched)
        result.pending.extend(published.pending)
        result.failed.extend(published.failed)

    def dispatch_now(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        """Publish ``intents`` in order: published ones go to ``result.dispatched``.

        After the first failure the rest of the batch fails with it, untried:
        a broker that is down costs the batch one publish timeout, not one
        per intent.
        """
        options = state.options
        published, error = self.publisher.publish_all(
            intents, lambda intent: options.get(intent.channel, {}).get("celery_queue")
        )
        result.dispatched.extend(intents[:published])
        if error is None:
            return
        failure = TransientFailure(
            f"Publishing to the Celery broker {self.broker} failed: {error!r}. Is"
            " the broker running? The notification was not handed to Celery."
        )
        failure.__cause__ = error
        failed = intents[published:]
        logger.error(
            "Publishing %d notification(s) of app %r to the Celery broker %s"
            " failed; they were not handed to Celery: %s.",
            len(failed),
            app.name,
            self.broker,
            ", ".join(intent.id for intent in failed),
            exc_info=failure,
        )
        for intent in failed:
            result.failed.append((intent, failure))
            send_isolated(signals.intent_failed, app, intent=intent, exception=failure)

    @property
    def broker(self) -> str:
        """The broker URL, without its password."""
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.celery_app.conf.broker_url or ""))

    def queue_of(self, state: State, channel: str) -> str:
        """The queue a channel's tasks go to (for the CLI)."""
        queue = state.options[channel].get("celery_queue")
        return str(queue or self.celery_app.conf.task_default_queue)

    def shutdown(self, timeout: float) -> list[Intent]:
        self.publisher.reset()
        return []


def _guard_url(celery_app: t.Any, configured: str | None) -> str:
    if configured is not None:
        return configured
    for key in ("broker_url", "result_backend"):
        url = celery_app.conf.get(key)
        if isinstance(url, str) and url.startswith(_REDIS_SCHEMES):
            return url
    raise ConfigurationError(
        f"Celery delivery keeps the ids of delivered intents in Redis, so that no"
        f" task delivers one twice, but neither the Celery broker nor its result"
        f" backend is Redis. Set {_GUARD} to a redis:// URL both the app and the"
        " workers reach."
    )
