"""The blinker signals notifyqueue sends, in a namespace of its own.

The sender is the Flask app unless a docstring says otherwise. Receivers of
the signals sent after a commit are isolated: one that raises is logged and
stops no other, and never undoes the commit.
"""

from __future__ import annotations

from blinker import Namespace

namespace = Namespace()
"""The :class:`blinker.Namespace` that holds notifyqueue's signals."""

intent_queued = namespace.signal(
    "intent-queued",
    doc="""Sent when an intent joins a batch. Sender: the app. Keyword: ``intent``.""",
)

batch_committed = namespace.signal(
    "batch-committed",
    doc="""Sent once the root transaction of a non-empty batch has committed,
    before anything is dispatched. Sender: the app. Keyword: ``intents``.""",
)

dispatch = namespace.signal(
    "dispatch",
    doc="""Sent once per channel batch after the commit, from the thread the
    channel's delivery mode dispatches in (the committing thread for
    ``"inline"``, a pool thread for ``"background"``), inside an app context.
    Sender: the channel name. Keywords: ``app``, ``intents``. The configured
    channels are its receivers; connect another to observe or extend
    delivery. A receiver that raises :class:`~notifyqueue.DeliveryError`
    fails the intents it names; any other exception fails the whole channel
    batch.""",
)

intent_dispatched = namespace.signal(
    "intent-dispatched",
    doc="""Sent for each intent every ``dispatch`` receiver handled without
    error. Sender: the app. Keyword: ``intent``.""",
)

intent_failed = namespace.signal(
    "intent-failed",
    doc="""Sent for each intent that failed to dispatch. Sender: the app.
    Keywords: ``intent``, ``exception``.""",
)

intent_retrying = namespace.signal(
    "intent-retrying",
    doc="""Sent when a durable channel's intent failed transiently and the
    outbox will try it again. Sender: the app. Keywords: ``intent``,
    ``attempt`` (the attempt that failed, the first is 1), ``exception``,
    ``next_attempt_at`` (an aware UTC datetime).""",
)

intent_dead = namespace.signal(
    "intent-dead",
    doc="""Sent when a durable channel's intent will not be tried again: a
    permanent failure, or its last attempt failed. Sender: the app.
    Keywords: ``intent``, ``exception``.""",
)

batch_discarded = namespace.signal(
    "batch-discarded",
    doc="""Sent when intents are dropped without dispatch. Sender: the app.
    Keywords: ``intents``, ``reason`` (one of ``"rollback"``,
    ``"savepoint rollback"``, ``"close"``, ``"teardown"``,
    ``"commit failed"``).""",
)

__all__ = [
    "batch_committed",
    "batch_discarded",
    "dispatch",
    "intent_dispatched",
    "intent_failed",
    "intent_dead",
    "intent_queued",
    "intent_retrying",
    "namespace",
]
