"""The outbox table, ``notifyqueue_outbox``, on :data:`metadata`.

One row per durable intent, written in the same COMMIT as the data that
caused it. Add :data:`metadata` to Alembic's (or Flask-Migrate's)
``target_metadata`` to manage it with your migrations, or create it with
``flask notifyqueue outbox create``.
"""

from __future__ import annotations

import typing as t
from datetime import datetime, timezone

import sqlalchemy as sa

TABLE_NAME = "notifyqueue_outbox"

PENDING = "pending"
"""Due at ``next_attempt_at``: never tried, or waiting for a retry."""
LEASED = "leased"
"""Claimed by ``lease_owner`` until ``lease_expires_at`` (also ``next_attempt_at``)."""
DONE = "done"
"""Delivered; kept for ``NOTIFYQUEUE_OUTBOX_RETAIN`` seconds, then pruned."""
DEAD = "dead"
"""Failed for good: a permanent failure, or out of attempts."""
UNCERTAIN = "uncertain"
"""The outcome is unknown (a connection lost after the message data went out)."""
STATES = (PENDING, LEASED, DONE, DEAD, UNCERTAIN)
DUE_STATES = (PENDING, LEASED)
"""The states a drainer claims from, once ``next_attempt_at`` has passed."""


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware UTC datetime in, an aware UTC datetime out, on every database.

    SQLite has no time zones: it stores the UTC wall time, and the zone is put
    back on the way out, so comparisons on either database are in UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: sa.Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"The outbox stores aware datetimes, got {value!r}.")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime | None, dialect: sa.Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()
"""The :class:`~sqlalchemy.MetaData` that holds :data:`table`."""

table = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("intent_id", sa.String(32), primary_key=True),
    sa.Column("commit_id", sa.String(32), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("intent", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("last_error", sa.Text),
    sa.CheckConstraint(
        f"state IN ({', '.join(repr(state) for state in STATES)})",
        name="ck_notifyqueue_outbox_state",
    ),
    # What a drainer claims: a partial index, so it stays as small as the
    # backlog however many finished rows are kept.
    sa.Index(
        "ix_notifyqueue_outbox_due",
        "next_attempt_at",
        postgresql_where=sa.text(f"state IN {DUE_STATES!r}"),
        sqlite_where=sa.text(f"state IN {DUE_STATES!r}"),
    ),
    sa.Index("ix_notifyqueue_outbox_state_channel", "state", "channel"),
)
"""``notifyqueue_outbox``: one row per durable intent.

``intent_id`` is the idempotency key; ``commit_id`` and ``position`` give a
commit's rows in call order; ``intent`` is :meth:`Intent.to_dict` as JSON
text; ``attempts`` counts claims (the fast path's is the first);
``next_attempt_at`` is when a ``pending`` row is due, and for a ``leased`` row
when its lease expires and another drainer may take it.
"""


def ddl(bind: sa.Engine | sa.Connection) -> str:
    """The ``CREATE TABLE`` and ``CREATE INDEX`` statements for ``bind``'s database."""
    dialect = bind.dialect
    statements = [sa.schema.CreateTable(table).compile(dialect=dialect)]
    statements += [
        sa.schema.CreateIndex(index).compile(dialect=dialect)
        for index in sorted(table.indexes, key=lambda index: str(index.name))
    ]
    return "".join(f"{str(statement).strip()};\n\n" for statement in statements)


def create(bind: sa.Engine | sa.Connection) -> bool:
    """Create the outbox table and its indexes if missing; return whether it did."""
    inspector: t.Any = sa.inspect(bind)
    if inspector.has_table(TABLE_NAME):
        return False
    metadata.create_all(bind)
    return True
