"""The per-app state NotifyQueue keeps in ``app.extensions``, and its lookup.

Low in the layering: the queue, the delivery modes, dispatch, the CLI and the
testing helpers read it from here; only :mod:`notifyqueue.extension` builds it.
"""

from __future__ import annotations

import dataclasses
import typing as t

from .context import get_context
from .errors import LifecycleError

if t.TYPE_CHECKING:
    from flask import Flask
    from flask.ctx import AppContext
    from sqlalchemy.orm import Session, scoped_session

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
        context = get_context(None)  # what current_app reads, without its proxy
        if context is None:
            raise LifecycleError(
                "notifyqueue needs an application context: call it inside a request,"
                " a CLI command, or `with app.app_context():`."
            )
        app = context.app
    try:
        return app, app.extensions[EXTENSION_KEY]
    except KeyError:
        raise LifecycleError(
            f"NotifyQueue is not initialised on app {app.name!r}. Did you call"
            " init_app?"
        ) from None


def session_of(state: State, context: AppContext | None) -> Session:
    """The session of ``state`` that is current in ``context`` (the current
    app context); made if there is none yet, as ``scoped_session()`` does."""
    sessions = state.context_sessions
    if sessions is not None and context is not None:
        session = sessions.get(id(context))
        if session is not None:
            return t.cast("Session", session)
    # The registry directly: scoped_session.__call__ adds a frame and checks
    # for keyword arguments we never pass.
    return t.cast("Session", state.session.registry())


def existing_session(state: State, context: AppContext | None) -> Session | None:
    """The session of ``state`` current in ``context``, if one was made."""
    sessions = state.context_sessions
    if sessions is not None and context is not None:
        return t.cast("Session | None", sessions.get(id(context)))
    registry = state.session.registry
    return t.cast("Session", registry()) if registry.has() else None
