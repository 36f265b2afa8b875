"""The outbox's SQL: writing rows, claiming them, and settling what became of them.

Every statement but the write runs in a short transaction of its own on the
app's engine, never in the request's session, and none stays open while a
channel sends. Claims lease rows to an owner; every later statement on a
claimed row is fenced by that owner and the row's attempt number, so a
worker whose lease lapsed cannot overwrite the row another worker owns now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import typing as t
import weakref
from datetime import datetime, timedelta

import sqlalchemy as sa

from ..errors import OutboxError
from .table import DEAD, DONE, DUE_STATES, LEASED, PENDING, TABLE_NAME, UNCERTAIN, table

_DIALECTS = ("postgresql", "sqlite")
_DUE = sa.text(f"{TABLE_NAME}.state IN {DUE_STATES!r}")
# Bound parameters per statement stay well under SQLite's limit (32,766).
_CHUNK = 500

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Claimed:
    """One row a claim leased: the fields a drainer needs, and what it was before.

    :param previous_state: ``pending``, or ``leased`` for a row whose earlier
        lease expired (its owner died, or overran the lease).
    """

    intent_id: str
    commit_id: str
    position: int
    channel: str
    intent: str
    attempts: int
    next_attempt_at: datetime
    previous_state: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one claimed row: its next state, fenced by its attempt."""

    intent_id: str
    attempt: int
    state: str
    """``done``, ``pending`` (retry at ``next_attempt_at``), ``dead``, ``uncertain``."""
    next_attempt_at: datetime | None = None
    last_error: str | None = None


_checked: weakref.WeakKeyDictionary[sa.Engine, bool] = weakref.WeakKeyDictionary()


def engine_of(state: t.Any) -> sa.Engine:
    """The engine of the app's session (current app context), for the outbox's
    own transactions. A session bound to a connection gives that
    connection's engine."""
    bind = state.session.get_bind()
    return bind if isinstance(bind, sa.Engine) else bind.engine


def check_database(connection: sa.Connection) -> None:
    """Refuse a database the outbox cannot work on, once per engine.

    :raises OutboxError: the table is missing, or the database is not
        PostgreSQL or SQLite 3.35+.
    """
    engine = connection.engine
    if engine in _checked:
        return
    name = connection.dialect.name
    if name not in _DIALECTS:
        raise OutboxError(
            f"Durable delivery works on PostgreSQL and SQLite; the session's"
            f" database is {name!r}. Use 'durable': False for this app's channels."
        )
    if name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        raise OutboxError(
            f"Durable delivery needs SQLite 3.35 or later (for RETURNING); this"
            f" Python has SQLite {sqlite3.sqlite_version}."
        )
    inspector: t.Any = sa.inspect(connection)
    if not inspector.has_table(TABLE_NAME):
        raise OutboxError(
            f"The outbox table {TABLE_NAME!r} does not exist in"
            f" {engine.url.render_as_string(hide_password=True)}, so the outbox"
            " cannot be used: a commit with durable notifications fails until"
            " it exists. Create the table with `flask notifyqueue outbox"
            " create` (or add notifyqueue.outbox.metadata to your migrations'"
            " target_metadata)."
        )
    _checked[engine] = True


def require_table(engine: sa.Engine) -> None:
    """:func:`check_database` on a connection of ``engine`` of its own.

    :raises OutboxError: as :func:`check_database`.
    """
    if engine in _checked:
        return
    with engine.connect() as connection:
        check_database(connection)


def write(connection: sa.Connection, rows: list[dict[str, t.Any]]) -> None:
    """Insert ``rows`` on ``connection``, inside the caller's transaction."""
    # One executemany: SQLAlchemy sends it as one multi-row INSERT
    # ("insertmanyvalues") where the driver allows.
    connection.execute(_INSERT, rows)


_INSERT = table.insert()


@contextlib.contextmanager
def transaction(
    engine: sa.Engine, *, settling: bool = False
) -> Iterator[sa.Connection]:
    """A short write transaction of the outbox's own on ``engine``.

    On SQLite it begins with ``BEGIN IMMEDIATE``: a deferred transaction that
    reads and then writes fails at once with ``SQLITE_BUSY_SNAPSHOT`` under
    WAL when another writer went first, without waiting for the busy timeout.

    ``settling`` (recording outcomes, handing rows back): on PostgreSQL the
    COMMIT does not wait for the WAL flush (``synchronous_commit = off``).
    Only a crash of the database server can lose such a write, and what it
    loses is an acknowledgement: the row is delivered again, which
    at-least-once allows. It halves what a durable request pays after its
    commit, and what the drainer pays per commit.
    """
    with engine.connect() as connection:
        name = connection.dialect.name
        if name == "postgresql":
            # Whatever the app's engine uses: under REPEATABLE READ or
            # SERIALIZABLE, claims and acknowledgements would fail with
            # serialization errors and leave delivered rows leased.
            connection = connection.execution_options(isolation_level="READ COMMITTED")
        # SQLAlchemy's own BEGIN first: with the pysqlite recipe for
        # savepoints (isolation_level=None and a "begin" event), the event
        # emits a deferred BEGIN here.
        connection.begin()
        if name == "sqlite":
            dbapi = connection.connection.dbapi_connection
            if not getattr(dbapi, "in_transaction", False):
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                # A deferred BEGIN that has read nothing yet: a first
                # statement that writes takes the write lock (waiting for it
                # as BEGIN IMMEDIATE would), so later reads cannot go stale.
                connection.execute(_TAKE_WRITE_LOCK)
        elif settling and name == "postgresql":
            connection.exec_driver_sql("SET LOCAL synchronous_commit = off")
        yield connection
        connection.commit()


_TAKE_WRITE_LOCK = sa.update(table).where(sa.false()).values(state=table.c.state)


def claim(
    engine: sa.Engine,
    owner: str,
    *,
    batch: int,
    lease: float,
    now: datetime,
    channels: Sequence[str] | None = None,
    due_by: datetime | None = None,
) -> list[Claimed]:
    """Lease up to ``batch`` due rows to ``owner`` until ``now`` + ``lease``;
    count the attempt now.

    Due: ``pending`` or ``leased`` (an expired lease) with ``next_attempt_at``
    at or before ``due_by`` (default ``now``). Committed before anything is
    sent. Returned in the order to deliver them: by due time, then commit,
    then call order.
    """
    until = now + timedelta(seconds=lease)
    cutoff = now if due_by is None else due_by
    # The states as literals, the index's own predicate: a generic plan with
    # them as parameters could not use the partial index.
    due: list[t.Any] = [_DUE, table.c.next_attempt_at <= cutoff]
    if channels:
        due.append(table.c.channel.in_(list(channels)))
    values = {
        "state": LEASED,
        "attempts": table.c.attempts + 1,
        "lease_owner": owner,
        "lease_expires_at": until,
        "next_attempt_at": until,
    }
    columns = (
        table.c.intent_id,
        table.c.commit_id,
        table.c.position,
        table.c.channel,
        table.c.intent,
        table.c.attempts,
    )
    with transaction(engine) as connection:
        if connection.dialect.name == "postgresql":
            # SKIP LOCKED in a MATERIALIZED CTE: the planner cannot turn the
            # subquery into a join that locks and updates more than the batch.
            chosen = (
                sa.select(table.c.intent_id, table.c.state, table.c.next_attempt_at)
                .where(*due)
                .order_by(table.c.next_attempt_at, table.c.commit_id, table.c.position)
                .limit(batch)
                .with_for_update(skip_locked=True)
                .cte("due")
                .prefix_with("MATERIALIZED")
            )
            statement = (
                sa.update(table)
                .where(table.c.intent_id == chosen.c.intent_id)
                .values(values)
                .returning(*columns, chosen.c.state, chosen.c.next_attempt_at)
            )
            rows = [tuple(row) for row in connection.execute(statement)]
        else:
            # BEGIN IMMEDIATE holds SQLite's write lock: no other claim runs
            # between choosing the rows and leasing them.
            chosen_rows = connection.execute(
                sa.select(table.c.intent_id, table.c.state, table.c.next_attempt_at)
                .where(*due)
                .order_by(table.c.next_attempt_at, table.c.commit_id, table.c.position)
                .limit(batch)
            ).all()
            before = {row[0]: (row[1], row[2]) for row in chosen_rows}
            rows = []
            if before:
                statement = (
                    sa.update(table)
                    .where(table.c.intent_id.in_(list(before)))
                    .values(values)
                    .returning(*columns)
                )
                rows = [
                    (*row, *before[row[0]]) for row in connection.execute(statement)
                ]
    claimed = [
        Claimed(
            intent_id=row[0],
            commit_id=row[1],
            position=row[2],
            channel=row[3],
            intent=row[4],
            attempts=row[5],
            previous_state=row[6],
            next_attempt_at=row[7],
        )
        for row in rows
    ]
    # RETURNING's order is unspecified.
    claimed.sort(key=lambda row: (row.next_attempt_at, row.commit_id, row.position))
    return claimed


def settle(
    engine: sa.Engine,
    owner: str,
    outcomes: Sequence[Outcome],
    *,
    retain: float,
    now: datetime,
) -> set[str]:
    """Record ``outcomes`` of rows leased to ``owner``, in one transaction.

    Delivered rows are deleted (``retain`` 0) or marked ``done``. Each
    statement is fenced by owner and attempt.

    :return: the intent ids whose row matched the fence; a missing one was
        taken over by another worker after its lease expired.
    """
    matched: set[str] = set()
    done: dict[int, list[str]] = {}
    others = []
    for outcome in outcomes:
        if outcome.state == DONE:
            done.setdefault(outcome.attempt, []).append(outcome.intent_id)
        else:
            others.append(outcome)
    if not done and not others:
        return matched
    with transaction(engine, settling=True) as connection:
        for attempt, ids in done.items():
            for chunk in _chunks(ids):
                fence = _fence(owner, attempt, chunk)
                if retain > 0:
                    statement: t.Any = (
                        sa.update(table)
                        .where(*fence)
                        .values(
                            state=DONE,
                            finished_at=now,
                            lease_owner=None,
                            lease_expires_at=None,
                            last_error=None,
                        )
                    )
                else:
                    statement = sa.delete(table).where(*fence)
                matched.update(
                    connection.execute(statement.returning(table.c.intent_id)).scalars()
                )
        for outcome in others:
            finished = None if outcome.state == PENDING else now
            next_attempt_at = outcome.next_attempt_at or now
            statement = (
                sa.update(table)
                .where(*_fence(owner, outcome.attempt, [outcome.intent_id]))
                .values(
                    state=outcome.state,
                    next_attempt_at=next_attempt_at,
                    finished_at=finished,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=outcome.last_error,
                )
                .returning(table.c.intent_id)
            )
            matched.update(connection.execute(statement).scalars())
    return matched


def renew(
    engine: sa.Engine,
    owner: str,
    leases: Sequence[tuple[str, int]],
    *,
    until: datetime,
) -> set[str]:
    """Extend the leases of ``(intent id, attempt)`` rows still held by ``owner``.

    :return: the ids still held (and now leased until ``until``); the others
        were taken over, or are gone.
    """
    return _update_held(
        engine, owner, leases, {"lease_expires_at": until, "next_attempt_at": until}
    )


def release(
    engine: sa.Engine, owner: str, rows: Sequence[Claimed], *, now: datetime
) -> set[str]:
    """Hand back claimed rows that were never tried: due now, the attempt undone."""
    return _update_held(
        engine,
        owner,
        [(row.intent_id, row.attempts) for row in rows],
        {
            "state": PENDING,
            "attempts": table.c.attempts - 1,
            "next_attempt_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )


def _update_held(
    engine: sa.Engine,
    owner: str,
    leases: Sequence[tuple[str, int]],
    values: dict[str, t.Any],
) -> set[str]:
    """Set ``values`` on the ``(intent id, attempt)`` rows ``owner`` still holds."""
    matched: set[str] = set()
    by_attempt: dict[int, list[str]] = {}
    for intent_id, attempt in leases:
        by_attempt.setdefault(attempt, []).append(intent_id)
    if not by_attempt:
        return matched
    with transaction(engine, settling=True) as connection:
        for attempt, ids in by_attempt.items():
            for chunk in _chunks(ids):
                statement = (
                    sa.update(table)
                    .where(*_fence(owner, attempt, chunk))
                    .values(values)
                    .returning(table.c.intent_id)
                )
                matched.update(connection.execute(statement).scalars())
    return matched


def _fence(owner: str, attempt: int, ids: Sequence[str]) -> list[t.Any]:
    return [
        table.c.intent_id.in_(list(ids)),
        table.c.state == LEASED,
        table.c.lease_owner == owner,
        table.c.attempts == attempt,
    ]


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


@dataclasses.dataclass(frozen=True)
class StatusRow:
    """The outbox rows of one channel in one state."""

    channel: str
    state: str
    count: int
    oldest_due_age: timedelta | None
    """For ``pending``: how long the oldest due row has existed; else None."""
    expired_leases: int
    """For ``leased``: rows whose lease has expired (their owner is gone)."""


def status(engine: sa.Engine, now: datetime) -> list[StatusRow]:
    """Counts per channel and state, the oldest due row's age, expired leases."""
    due = sa.and_(table.c.state == PENDING, table.c.next_attempt_at <= now)
    expired = sa.and_(table.c.state == LEASED, table.c.next_attempt_at <= now)
    statement = (
        sa.select(
            table.c.channel,
            table.c.state,
            sa.func.count(),
            sa.func.min(sa.case((due, table.c.created_at))),
            sa.func.sum(sa.case((expired, 1), else_=0)),
        )
        .group_by(table.c.channel, table.c.state)
        .order_by(table.c.channel, table.c.state)
    )
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    result = []
    for channel, state, count, oldest, expired_count in rows:
        if isinstance(oldest, str):  # SQLite: min() of a CASE loses the type
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=now.tzinfo)
        result.append(
            StatusRow(
                channel,
                state,
                int(count),
                None if oldest is None else now - oldest,
                int(expired_count or 0),
            )
        )
    return result


def make_due(
    engine: sa.Engine,
    now: datetime,
    *,
    ids: Sequence[str] = (),
    states: Sequence[str] = (),
) -> tuple[set[str], dict[str, str]]:
    """Make rows due again, with their attempts counted from zero.

    ``ids`` must be ``dead``, ``uncertain`` or ``pending`` rows; ``states``
    selects every row in those states (``dead``, ``uncertain``).

    :return: the ids made due, and each refused id -> why.
    """
    retryable = (DEAD, UNCERTAIN, PENDING)
    values = {
        "state": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "finished_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    made: set[str] = set()
    refused: dict[str, str] = {}
    with transaction(engine) as connection:
        for chunk in _chunks(list(dict.fromkeys(ids))):
            found = dict(
                connection.execute(
                    sa.select(table.c.intent_id, table.c.state).where(
                        table.c.intent_id.in_(list(chunk))
                    )
                ).all()
            )
            for intent_id in chunk:
                state = found.get(intent_id)
                if state is None:
                    refused[intent_id] = "no such row"
                elif state not in retryable:
                    refused[intent_id] = f"it is {state}"
            chosen = [i for i in chunk if found.get(i) in retryable]
            if chosen:
                made.update(
                    connection.execute(
                        sa.update(table)
                        .where(
                            table.c.intent_id.in_(chosen),
                            table.c.state.in_(retryable),
                        )
                        .values(values)
                        .returning(table.c.intent_id)
                    ).scalars()
                )
        if states:
            made.update(
                connection.execute(
                    sa.update(table)
                    .where(table.c.state.in_(list(states)))
                    .values(values)
                    .returning(table.c.intent_id)
                ).scalars()
            )
    return made, refused


def prune(
    engine: sa.Engine,
    finished_before: datetime,
    *,
    states: Sequence[str] = (DONE,),
    batch: int = 1000,
) -> int:
    """Delete rows in ``states`` finished before ``finished_before``, in batches.

    Each batch is a short transaction, so pruning a large table never pins
    PostgreSQL's MVCC horizon for long. :return: the number of rows deleted.
    """
    deleted = 0
    while True:
        with transaction(engine) as connection:
            chosen = (
                sa.select(table.c.intent_id)
                .where(
                    table.c.state.in_(list(states)),
                    table.c.finished_at < finished_before,
                )
                .limit(batch)
                .scalar_subquery()
            )
            count = len(
                connection.execute(
                    sa.delete(table)
                    .where(table.c.intent_id.in_(chosen))
                    .returning(table.c.intent_id)
                ).all()
            )
        deleted += count
        if count < batch:
            return deleted
