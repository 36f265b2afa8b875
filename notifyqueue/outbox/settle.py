"""Turning a dispatch's result into outbox outcomes: done, retry, dead, uncertain.

Shared by the fast path (right after the commit) and the drainer. Runs after
the channels were called, so it never raises: a database that cannot record
an outcome leaves the rows leased, and a drainer takes them again once the
lease expires.
"""

from __future__ import annotations

import logging
import typing as t
from datetime import datetime, timezone

from .. import signals
from ..dispatch import send_isolated
from ..errors import OutboxError
from . import store
from .policy import PERMANENT, TRANSIENT, RetryPolicy, failure_kind
from .table import DEAD, DONE, PENDING, UNCERTAIN

if t.TYPE_CHECKING:
    import sqlalchemy as sa
    from flask import Flask

    from ..intent import BatchResult, Intent
    from ..state import State

logger = logging.getLogger("notifyqueue")

_ERROR_LENGTH = 2000


def now() -> datetime:
    """The outbox's clock: aware UTC."""
    return datetime.now(timezone.utc)


def describe(exc: BaseException) -> str:
    """An exception as ``last_error`` keeps it."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ raises
        text = f"{type(exc).__name__} (its message cannot be shown)"
    return text if len(text) <= _ERROR_LENGTH else text[: _ERROR_LENGTH - 1] + "…"


def settle_result(
    app: Flask,
    state: State,
    engine: sa.Engine,
    owner: str,
    tried: t.Sequence[tuple[Intent, int]],
    result: BatchResult,
    given_up: t.Sequence[tuple[Intent, int, str]] = (),
    *,
    moment: datetime | None = None,
    commit_of: t.Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Record what became of each ``(intent, attempt)`` that was tried.

    Delivered rows are done; a failure is retried, dead or uncertain, as the
    channel classifies it and its retry policy allows. ``given_up`` rows
    ``(intent, attempt, why)`` go to ``dead`` untried. ``intent_retrying`` and
    ``intent_dead`` are sent for the rows whose outcome was recorded.

    :param moment: the time the outcome is taken at (a retry's delay counts
        from it); default now.
    :param commit_of: intent id -> the commit it came from, when ``tried``
        spans several (a drainer's claim); by default they are one commit.
    :return: state -> how many rows were recorded in it.
    """
    counts: dict[str, int] = {}
    if not tried and not given_up:
        return counts
    dispatched = {intent.id for intent in result.dispatched}
    failed = {intent.id: exc for intent, exc in result.failed}
    moment = moment or now()
    outcomes: list[store.Outcome] = []
    after: list[tuple[str, Intent, dict[str, t.Any]]] = []
    due: dict[tuple[str, str, int], datetime] = {}
    for intent, attempt, why in given_up:
        outcomes.append(store.Outcome(intent.id, attempt, DEAD, None, why))
        after.append(("dead", intent, {"exception": OutboxError(why)}))
    for intent, attempt in tried:
        if intent.id in dispatched:
            outcomes.append(store.Outcome(intent.id, attempt, DONE))
            continue
        exc = failed.get(intent.id)
        if exc is None:
            continue  # no outcome (a crash point stopped it): the lease stands
        channel = state.channels.get(intent.channel)
        try:
            kind = failure_kind(channel, exc)
        except Exception:
            # Runs after the commit: a classifier's bug must not escape it.
            logger.exception(
                "Channel %r's failure_kind() raised on %r; taking the failure of"
                " %s as transient.",
                intent.channel,
                exc,
                intent.id,
            )
            kind = "transient"
        policy = state.retry.get(intent.channel, RetryPolicy())
        error = describe(exc)
        if kind == TRANSIENT and attempt < policy.max_attempts:
            # One draw per commit, channel and attempt: a commit's rows come
            # due together, so a later claim keeps them together, in call
            # order; different commits still spread out.
            commit = commit_of.get(intent.id, "") if commit_of else ""
            key = (commit, intent.channel, attempt)
            when = due.get(key)
            if when is None:
                when = due[key] = moment + policy.delay(attempt)
            outcomes.append(store.Outcome(intent.id, attempt, PENDING, when, error))
            after.append(
                (
                    "retrying",
                    intent,
                    {"attempt": attempt, "exception": exc, "next_attempt_at": when},
                )
            )
        elif kind == TRANSIENT or kind == PERMANENT:
            if kind == TRANSIENT:
                error = f"gave up after {attempt} attempt(s): {error}"
            outcomes.append(store.Outcome(intent.id, attempt, DEAD, None, error))
            after.append(("dead", intent, {"exception": exc}))
        else:
            outcomes.append(store.Outcome(intent.id, attempt, UNCERTAIN, None, error))
    try:
        matched = store.settle(
            engine, owner, outcomes, retain=state.outbox_retain, now=moment
        )
    except Exception:
        logger.exception(
            "Could not record the outcome of %d durable notification(s) of app %r"
            " in the outbox (%s); they stay leased, and a drainer delivers them"
            " again once the lease expires, so a receiver may see them twice.",
            len(outcomes),
            app.name,
            ", ".join(outcome.intent_id for outcome in outcomes),
        )
        return counts
    lapsed = [o.intent_id for o in outcomes if o.intent_id not in matched]
    if lapsed:
        logger.warning(
            "The outbox rows of %d notification(s) of app %r were no longer"
            " leased to this worker when their outcome was to be recorded (the"
            " lease lapsed and another worker took them, or the rows are gone):"
            " %s. They may be delivered twice; keep NOTIFYQUEUE_OUTBOX_LEASE"
            " above the time a delivery takes.",
            len(lapsed),
            app.name,
            ", ".join(lapsed),
        )
    for outcome in outcomes:
        if outcome.intent_id in matched:
            counts[outcome.state] = counts.get(outcome.state, 0) + 1
    for what, intent, kwargs in after:
        if intent.id not in matched:
            continue
        if what == "retrying":
            logger.info(
                "Notification %s to channel %r: attempt %d failed; the outbox tries"
                " it again at %s.",
                intent.id,
                intent.channel,
                kwargs["attempt"],
                kwargs["next_attempt_at"].isoformat(timespec="seconds"),
            )
            send_isolated(signals.intent_retrying, app, intent=intent, **kwargs)
        else:
            logger.error(
                "Notification %s to channel %r is dead in the outbox: %s. Retry it"
                " with `flask notifyqueue outbox retry %s`.",
                intent.id,
                intent.channel,
                kwargs["exception"],
                intent.id,
            )
            send_isolated(signals.intent_dead, app, intent=intent, **kwargs)
    return counts
