"""The per-app state NotifyQueue keeps in ``app.extensions``, and its lookup.

Low in the layering: the queue, the delivery modes, dispatch, the CLI and the
testing helpers read it from here; only :mod:`notifyqueue.extension` builds it.
"""

from __future__ import annotations

import dataclasses
import typing as t

from flask import current_app

from .errors import LifecycleError

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import scoped_session

    from .channels import Channel
    from .delivery.base import DeliveryMode
    from .intent import Intent
    from .outbox.policy import RetryPolicy

EXTENSION_KEY = "notifyqueue"


@dataclasses.dataclass
class Capture:
    """One active :func:`notifyqueue.testing.capture` block."""

    intents: list[Intent]
    dispatch: bool


@dataclasses.dataclass(frozen=True, eq=False)
class State:
    """What NotifyQueue keeps for one app, read from its config in ``init_app``."""

    session: scoped_session[t.Any]
    channels: dict[str, Channel]
    """Configured and enabled channels, in dispatch order."""
    options: dict[str, dict[str, t.Any]]
    """Each channel's options as configured (for the CLI)."""
    order: str
    strict: bool
    delivery: dict[str, str]
    """Enabled channel name -> the name of its delivery mode."""
    modes: dict[str, DeliveryMode]
    """Delivery mode name -> this app's mode object, for the modes in use:
    those that hand intents off first, then ``inline``."""
    preparing: tuple[DeliveryMode, ...] = ()
    """The modes among ``modes`` that override
    :meth:`~notifyqueue.delivery.DeliveryMode.before_commit`."""
    captures: list[Capture] = dataclasses.field(default_factory=list)
    disabled: frozenset[str] = frozenset()
    """Channels configured with ``"enabled": False``: named, never queued to."""
    durable: frozenset[str] = frozenset()
    """Enabled channels whose intents go through the outbox (``"durable": True``)."""
    retry: dict[str, RetryPolicy] = dataclasses.field(default_factory=dict)
    """Durable or Celery channel name -> its retry options."""
    outbox_lease: float = 60.0
    """``NOTIFYQUEUE_OUTBOX_LEASE``: seconds a claim (or the fast path) holds a row."""
    outbox_retain: float = 0.0
    """``NOTIFYQUEUE_OUTBOX_RETAIN``: seconds a delivered row is kept; 0 deletes it."""
    context_sessions: dict[int, t.Any] | None = None
    """Flask-SQLAlchemy's sessions by ``id()`` of their app context, where
    ``session`` is scoped that way
    (:func:`~notifyqueue.context.sessions_by_context`)."""
    bound: dict[t.Any, t.Any] = dataclasses.field(default_factory=dict)
    """A decorated function's plan -> what its usual call queues in this app,
    worked out at its first call here (see :mod:`notifyqueue.decorators`)."""

    @property
    def single_mode(self) -> DeliveryMode | None:
        """The one delivery mode every channel uses, or ``None`` if they differ."""
        if len(self.modes) == 1:
            return next(iter(self.modes.values()))
        return None


def state_of(app: Flask) -> State:
    """Return ``app``'s state; the app must be initialised."""
    return t.cast("State", app.extensions[EXTENSION_KEY])


def get_state(app: Flask | None = None) -> tuple[Flask, State]:
    """Return the app (the current one by default) and its NotifyQueue state.

    :raises LifecycleError: outside an app context, or before ``init_app``.
    """
    if app is None:
        try:
            app = t.cast("Flask", current_app._get_current_object())  # type: ignore[attr-defined]
        except RuntimeError:
            raise LifecycleError(
                "notifyqueue needs an application context: call it inside a request,"
                " a CLI command, or `with app.app_context():`."
            ) from None
    try:
        return app, app.extensions[EXTENSION_KEY]
    except KeyError:
        raise LifecycleError(
            f"NotifyQueue is not initialised on app {app.name!r}. Did you call"
            " init_app?"
        ) from None
