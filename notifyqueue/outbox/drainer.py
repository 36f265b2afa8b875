"""The drainer: claims due outbox rows, delivers them, settles what became of them.

It delivers what the fast path could not: rows of a process that died after
its COMMIT, rows whose delivery failed and is due for a retry, and rows whose
lease expired. Any number of drainers may run at once, in threads or
processes: a claim leases each row to one of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import typing as t
from datetime import datetime, timedelta

import sqlalchemy as sa

from ..dispatch import dispatch_by_mode, remove_thread_session
from ..errors import ConfigurationError
from ..intent import BatchResult, Intent
from ..state import get_state
from . import store
from .fast_path import new_owner
from .policy import RetryPolicy
from .settle import now as clock
from .settle import settle_result
from .table import DEAD, DONE, LEASED, PENDING, UNCERTAIN

if t.TYPE_CHECKING:
    from collections.abc import Sequence

    from flask import Flask

    from ..state import State

logger = logging.getLogger("notifyqueue")

_PRUNE_EVERY = 60.0  # seconds between prunes of done rows, when retained

_active = threading.local()


def delivering() -> bool:
    """Whether a drainer in this thread is delivering a commit right now.

    What a stopping CLI drainer's grace timer asks before it interrupts.
    """
    return bool(getattr(_active, "delivering", False))


@dataclasses.dataclass
class DrainStats:
    """What one :func:`drain` call did.

    :param claimed: rows claimed (each counts an attempt).
    :param delivered: of those, delivered and marked done.
    :param retrying: failed transiently, due again later.
    :param dead: failed permanently, or out of attempts.
    :param uncertain: outcome unknown, not retried automatically.
    :param reclaimed: claimed after an earlier lease had expired (its
        worker died or overran the lease: a possible duplicate).
    :param released: handed back untried when the drainer was stopped.
    """

    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    uncertain: int = 0
    reclaimed: int = 0
    released: int = 0


def drain(
    app: Flask,
    *,
    once: bool = False,
    channels: Sequence[str] | None = None,
    batch: int = 100,
    lease: float | None = None,
    poll: float = 1.0,
    stop: threading.Event | None = None,
    now: datetime | None = None,
) -> DrainStats:
    """Deliver what is due in ``app``'s outbox.

    Claims up to ``batch`` due rows in a short transaction, delivers them
    grouped by commit (each channel batch in call order, one ``send()`` per
    channel batch, inside an app context, with the same signals as the fast
    path), then records their outcomes in another; no transaction is open
    while a channel sends.

    :param once: deliver what is due, then return; otherwise poll until
        ``stop`` is set.
    :param channels: only these channels; default every channel ``app``
        configures (rows of other channels are left alone).
    :param batch: rows per claim: fewer means fewer deliveries repeated after
        a crash, more means fewer transactions.
    :param lease: seconds a claim holds its rows; default
        ``NOTIFYQUEUE_OUTBOX_LEASE``. Keep it well above the longest send of
        one commit; a claim that runs past half of it renews it.
    :param poll: seconds to wait when nothing is due.
    :param stop: set it to stop: no new claim, the commit being delivered is
        finished, and the rest of the claim handed back.
    :param now: for tests: the time taken as now (a later one makes retries
        and expired leases due; leases and retry delays count from it).
    :raises ConfigurationError: a bad argument, or an unknown channel.
    :raises OutboxError: the outbox table is missing.
    """
    _, state = get_state(app)
    _check_arguments(state, channels, batch, lease, poll)
    names = list(channels) if channels else list(state.channels)
    lease_seconds = state.outbox_lease if lease is None else float(lease)
    stop = stop or threading.Event()
    owner = new_owner()
    with app.app_context():
        engine = store.engine_of(state)
    store.require_table(engine)
    stats = DrainStats()
    last_prune = 0.0
    logger.debug("Draining the outbox of app %r as %s.", app.name, owner)
    # --once delivers what is due when it starts: a row it retries is not
    # due again within the same run, however short its backoff.
    cutoff = (now or clock()) if once else None
    while not stop.is_set():
        moment = now or clock()
        try:
            rows = store.claim(
                engine,
                owner,
                batch=batch,
                lease=lease_seconds,
                now=moment,
                channels=names,
                due_by=cutoff,
            )
        except sa.exc.DBAPIError:
            if once:
                raise
            # A polling drainer outlives a database restart: try again later.
            logger.exception(
                "Claiming from the outbox of app %r failed; trying again in %g s.",
                app.name,
                poll,
            )
            stop.wait(poll)
            continue
        if rows:
            _deliver_claim(
                app, state, engine, owner, rows, stop, stats, now, lease_seconds
            )
            continue
        if state.outbox_retain > 0 and time.monotonic() - last_prune > _PRUNE_EVERY:
            last_prune = time.monotonic()
            try:
                store.prune(engine, clock() - timedelta(seconds=state.outbox_retain))
            except sa.exc.DBAPIError:
                if once:
                    raise
                logger.exception("Pruning the outbox of app %r failed.", app.name)
        if once:
            break
        stop.wait(poll)
    return stats


def _check_arguments(
    state: State,
    channels: Sequence[str] | None,
    batch: int,
    lease: float | None,
    poll: float,
) -> None:
    if channels is not None and isinstance(channels, str):
        raise ConfigurationError(
            f"channels is the str {channels!r}; pass a list of channel names."
        )
    for name in channels or ():
        if name not in state.channels:
            raise ConfigurationError(
                f"Unknown channel {name!r}; this app's channels are"
                f" {', '.join(state.channels)}."
            )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigurationError(f"batch is {batch!r}; use a whole number, 1 or more.")
    for what, value in (("lease", lease), ("poll", poll)):
        if value is None and what == "lease":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(
                f"{what} is {value!r}; use a number of seconds above 0."
            )


@dataclasses.dataclass
class _Settlement:
    """What a claim's deliveries came to, recorded in one transaction at its end."""

    tried: list[tuple[Intent, int]] = dataclasses.field(default_factory=list)
    given_up: list[tuple[Intent, int, str]] = dataclasses.field(default_factory=list)
    unreadable: list[store.Outcome] = dataclasses.field(default_factory=list)
    result: BatchResult = dataclasses.field(
        default_factory=lambda: BatchResult(committed=True)
    )
    commit_of: dict[str, str] = dataclasses.field(default_factory=dict)


def _deliver_claim(
    app: Flask,
    state: State,
    engine: sa.Engine,
    owner: str,
    rows: list[store.Claimed],
    stop: threading.Event,
    stats: DrainStats,
    moment: datetime | None,
    lease: float,
) -> None:
    """Deliver one claim commit by commit, then record every outcome at once.

    One settling transaction per claim rather than per commit: with a row or
    two per commit that transaction was nine tenths of a drainer's time. A
    crash before it repeats the claim's deliveries (at least once allows it;
    ``batch`` bounds it). A claim that takes more than half its lease records
    what it has done and renews the lease of the rest, so no other drainer
    takes rows this one is still to send. A stop hands back the commits not
    started.
    """
    stats.claimed += len(rows)
    reclaimed = [row for row in rows if row.previous_state == LEASED]
    if reclaimed:
        stats.reclaimed += len(reclaimed)
        logger.warning(
            "Took over %d outbox row(s) of app %r whose lease had expired (their"
            " worker died, or overran NOTIFYQUEUE_OUTBOX_LEASE): %s.",
            len(reclaimed),
            app.name,
            ", ".join(row.intent_id for row in reclaimed),
        )
    commits: dict[str, list[store.Claimed]] = {}
    for row in rows:
        commits.setdefault(row.commit_id, []).append(row)
    groups = list(commits.values())
    settlement = _Settlement()
    renewed_at = time.monotonic()
    try:
        number = 0
        while number < len(groups):
            if stop.is_set():
                _hand_back(app, engine, owner, groups[number:], stats)
                break
            if time.monotonic() - renewed_at > lease / 2:
                _settle(app, state, engine, owner, settlement, stats, moment)
                settlement = _Settlement()
                groups = groups[:number] + _renew(
                    app, engine, owner, groups[number:], moment, lease
                )
                renewed_at = time.monotonic()
                if number >= len(groups):
                    break
            try:
                _active.delivering = True
                _deliver_commit(app, state, groups[number], settlement)
            except BaseException:
                # KeyboardInterrupt, or a stop past its grace period: what
                # was being sent keeps its lease; the rest goes back at once.
                _hand_back(app, engine, owner, groups[number + 1 :], stats)
                raise
            finally:
                _active.delivering = False
            number += 1
    finally:
        _settle(app, state, engine, owner, settlement, stats, moment)


def _renew(
    app: Flask,
    engine: sa.Engine,
    owner: str,
    groups: list[list[store.Claimed]],
    moment: datetime | None,
    lease: float,
) -> list[list[store.Claimed]]:
    """Renew the lease of the rows of ``groups``; return the groups still held."""
    rows = [row for group in groups for row in group]
    try:
        held = store.renew(
            engine,
            owner,
            [(row.intent_id, row.attempts) for row in rows],
            until=(moment or clock()) + timedelta(seconds=lease),
        )
    except Exception:
        logger.exception(
            "Renewing the lease of %d claimed outbox row(s) of app %r failed;"
            " they are left for their lease to expire.",
            len(rows),
            app.name,
        )
        return []
    lost = [row.intent_id for row in rows if row.intent_id not in held]
    if lost:
        logger.warning(
            "%d claimed outbox row(s) of app %r were taken over before this"
            " drainer got to them; it leaves them: %s.",
            len(lost),
            app.name,
            ", ".join(lost),
        )
    kept = [[row for row in group if row.intent_id in held] for group in groups]
    return [group for group in kept if group]


def _deliver_commit(
    app: Flask, state: State, group: list[store.Claimed], settlement: _Settlement
) -> None:
    """Dispatch one commit's claimed rows; note what is to be recorded."""
    group.sort(key=lambda row: row.position)
    tried: list[tuple[Intent, int]] = []
    for row in group:
        try:
            intent = Intent.from_dict(json.loads(row.intent))
        except (ValueError, TypeError) as exc:
            settlement.unreadable.append(
                store.Outcome(
                    row.intent_id,
                    row.attempts,
                    DEAD,
                    None,
                    f"the stored intent cannot be read: {exc}",
                )
            )
            continue
        settlement.commit_of[intent.id] = row.commit_id
        policy = state.retry.get(row.channel, RetryPolicy())
        if row.attempts > policy.max_attempts:
            # Counted at claim: a row whose every attempt killed its worker
            # still runs out of attempts.
            settlement.given_up.append(
                (
                    intent,
                    row.attempts,
                    f"gave up: {row.attempts - 1} attempt(s) of"
                    f" {policy.max_attempts} never reported an outcome (the"
                    " worker died or overran its lease)",
                )
            )
        else:
            tried.append((intent, row.attempts))
    if not tried:
        return
    try:
        with app.app_context():
            dispatch_by_mode(
                app, state, [intent for intent, _ in tried], settlement.result
            )
    finally:
        remove_thread_session(state)
    settlement.tried.extend(tried)


def _settle(
    app: Flask,
    state: State,
    engine: sa.Engine,
    owner: str,
    settlement: _Settlement,
    stats: DrainStats,
    moment: datetime | None,
) -> None:
    if settlement.unreadable:
        try:
            stats.dead += len(
                store.settle(
                    engine,
                    owner,
                    settlement.unreadable,
                    retain=state.outbox_retain,
                    now=clock(),
                )
            )
        except Exception:
            logger.exception(
                "Recording %d unreadable outbox row(s) of app %r as dead failed.",
                len(settlement.unreadable),
                app.name,
            )
        for outcome in settlement.unreadable:
            logger.error(
                "Outbox row %s of app %r is dead: %s.",
                outcome.intent_id,
                app.name,
                outcome.last_error,
            )
    if not settlement.tried and not settlement.given_up:
        return
    try:
        with app.app_context():
            counts = settle_result(
                app,
                state,
                engine,
                owner,
                settlement.tried,
                settlement.result,
                settlement.given_up,
                moment=moment,
                commit_of=settlement.commit_of,
            )
    finally:
        remove_thread_session(state)
    stats.delivered += counts.get(DONE, 0)
    stats.retrying += counts.get(PENDING, 0)
    stats.dead += counts.get(DEAD, 0)
    stats.uncertain += counts.get(UNCERTAIN, 0)


def _hand_back(
    app: Flask,
    engine: sa.Engine,
    owner: str,
    groups: list[list[store.Claimed]],
    stats: DrainStats,
) -> None:
    rows = [row for group in groups for row in group]
    if not rows:
        return
    try:
        released = store.release(engine, owner, rows, now=clock())
    except Exception:
        logger.exception(
            "Handing back %d untried outbox row(s) of app %r failed; they are"
            " taken again once their lease expires.",
            len(rows),
            app.name,
        )
        return
    stats.released += len(released)
    logger.info(
        "Handed back %d untried outbox row(s) of app %r.", len(released), app.name
    )
