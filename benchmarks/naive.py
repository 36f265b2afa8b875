"""The baseline: the queue a Flask team hand-rolls instead of using notifyqueue.

A ``deque`` in ``flask.g`` keyed by ``hash(db.session)``; each entry a
function and its kwargs, the message already formatted by the caller; the
last call of a transaction passes ``last=True``, which commits and drains the
queue in call order. It has none of notifyqueue's guarantees (a rollback or a
failed commit leaves its entries behind, a failing entry stops the rest); it
is here only to say what notifyqueue's work costs next to it.
"""

from __future__ import annotations

import typing as t
from collections import deque

from flask import g

Entry = tuple[t.Callable[..., None], dict[str, t.Any]]


def queue(session: t.Any, fn: t.Callable[..., None], **kwargs: t.Any) -> None:
    """Append ``fn(**kwargs)`` to the queue of ``session``'s transaction."""
    queues: dict[int, deque[Entry]] = g.setdefault("naive_queues", {})
    key = hash(session)
    entries = queues.get(key)
    if entries is None:
        entries = queues[key] = deque()
    entries.append((fn, kwargs))


def commit_and_drain(session: t.Any) -> None:
    """Commit, then run every queued entry in call order."""
    session.commit()
    entries: deque[Entry] | None = g.get("naive_queues", {}).get(hash(session))
    while entries:
        fn, kwargs = entries.popleft()
        fn(**kwargs)
