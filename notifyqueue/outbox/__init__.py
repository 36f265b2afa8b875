"""Durable delivery: a transactional outbox and the drainer that empties it.

A channel configured with ``"durable": True`` has its intents written to the
``notifyqueue_outbox`` table inside the committing transaction (so a row
exists if and only if the data committed), delivered right after the commit
by the channel's delivery mode, and by :func:`drain` whenever that did not
finish: a crash, a failure to retry, an expired lease.
"""

from __future__ import annotations

from .drainer import DrainStats, drain
from .policy import RetryPolicy
from .table import STATES, TABLE_NAME, create, ddl, metadata, table

__all__ = [
    "STATES",
    "TABLE_NAME",
    "DrainStats",
    "RetryPolicy",
    "create",
    "ddl",
    "drain",
    "metadata",
    "table",
]
