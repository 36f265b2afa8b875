"""The :class:`DeliveryMode` base class: where a committed batch is dispatched."""

from __future__ import annotations

import typing as t

from ..dispatch import dispatch_batch

if t.TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import Session

    from ..intent import BatchResult, Intent
    from ..state import State


class DeliveryMode:
    """One way of getting committed intents to their channels.

    Each app builds one object per mode its channels use. The route of a
    committed batch (:func:`notifyqueue.delivery.deliver_committed`) hands each
    mode the intents of its channels; the mode decides where and when they
    reach :func:`notifyqueue.dispatch.dispatch_batch`.
    """

    name: t.ClassVar[str]
    """The value of the ``"delivery"`` option that selects this mode."""

    settings: t.ClassVar[dict[str, t.Any]] = {}
    """The config keys this mode reads, with their defaults."""

    @classmethod
    def check_settings(cls, settings: t.Mapping[str, t.Any]) -> None:
        """Check this mode's config keys in ``settings`` (every app's, used or not).

        :raises ConfigurationError: naming the key, its value and what to use.
        """

    def __init__(self, app: Flask, settings: t.Mapping[str, t.Any]) -> None:
        """Built once per app that has a channel in this mode, at ``init_app``.

        Nothing may start here (no thread, no connection): ``init_app`` runs at
        import in many apps, before a server forks its workers.
        """

    def init_app(self, app: Flask) -> None:
        """Called once ``init_app`` has checked everything and registered the
        app: where a mode hooks into other extensions. The base class does
        nothing."""

    def before_commit(
        self, app: Flask, state: State, session: Session, intents: list[Intent]
    ) -> None:
        """Called inside the root transaction, just before it commits.

        A mode that keeps intents in the database writes them here, in the
        same COMMIT as the data. The base class does nothing.
        """

    def deliver(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        """Dispatch committed ``intents`` now, or hand them off.

        Runs in the committing thread, inside an app context of ``app``, once
        the root transaction has committed. Intents dispatched here go to
        ``result.dispatched``/``result.failed``; those handed off to
        ``result.pending``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement deliver().")

    def dispatch_now(
        self, app: Flask, state: State, intents: list[Intent], result: BatchResult
    ) -> None:
        """Deliver ``intents`` in this thread, now: what a drainer does with the
        outbox rows it claimed of this mode's channels.

        The base class calls the channels; a mode that hands intents to
        another system (Celery) hands them off here, and an intent in
        ``result.dispatched`` is then done as far as the outbox is concerned.
        """
        dispatch_batch(app, state, intents, result)

    def wait(self, deadline: float) -> None:
        """Block until what was handed off so far has an outcome.

        :param deadline: a :func:`time.monotonic` value.
        :raises TimeoutError: past ``deadline``. The base class returns at once.
        """

    def shutdown(self, timeout: float) -> list[Intent]:
        """Finish what was handed off, for up to ``timeout`` seconds; stop.

        :return: the intents left without an outcome. The base class has none.
        """
        return []
