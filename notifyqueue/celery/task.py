"""The worker side: the ``notifyqueue.deliver`` task.

One task per intent, ``task_id`` the intent id. The task delivers through the
same channel of the same Flask app configuration as the committing process,
inside an app context of that app, guarded so that no intent is delivered
twice (:mod:`notifyqueue.celery.guard`).
"""

from __future__ import annotations

import logging
import typing as t
import weakref
from datetime import datetime, timedelta, timezone

from flask import current_app, has_app_context

from .. import signals
from ..dispatch import dispatch_batch, remove_thread_session, send_isolated
from ..errors import ConfigurationError, OutboxError, PermanentFailure
from ..intent import BatchResult, Intent
from ..outbox.fast_path import new_owner
from ..outbox.policy import PERMANENT, TRANSIENT, RetryPolicy, failure_kind
from ..state import EXTENSION_KEY, state_of
from .publish import TASK_NAME

if t.TYPE_CHECKING:
    import celery
    from flask import Flask

    from ..delivery.celery import CeleryDelivery
    from ..state import State

logger = logging.getLogger("notifyqueue")

# Celery app -> the Flask app whose init_app linked it: the app a task runs
# in when no app context is pushed (a Celery app made without the guide's
# FlaskTask). The last app initialised with a Celery app wins.
_linked: weakref.WeakKeyDictionary[celery.Celery, Flask] = weakref.WeakKeyDictionary()


def link(celery_app: celery.Celery, app: Flask) -> None:
    """Remember ``app`` as the Flask app of ``celery_app``'s tasks."""
    _linked[celery_app] = app


def register(celery_app: celery.Celery) -> celery.Task:
    """Register the ``notifyqueue.deliver`` task on ``celery_app``; return it.

    ``init_app`` calls it for the app's ``app.extensions["celery"]`` when a
    channel is ``"delivery": "celery"``, so a worker that imports the Flask
    app (as Flask's Celery guide sets it up) has the task. Calling it again
    returns the task already registered.

    ``acks_late`` with ``reject_on_worker_lost``: a worker that dies in the
    middle of a task leaves its message to be delivered again, and the guard
    decides whether anything is left to send.
    """
    return t.cast(
        "celery.Task",
        celery_app.task(
            name=TASK_NAME,
            # Only on this Celery app, not on every one the process finalises.
            shared=False,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            max_retries=None,  # the channel's max_attempts decides, in deliver()
        )(deliver),
    )


def deliver(task: celery.Task, data: t.Mapping[str, t.Any]) -> str:
    """Deliver one published intent; return what became of it.

    :return: ``"delivered"``, ``"duplicate"`` (already final: nothing sent),
        ``"deferred"`` (another execution holds the claim: published again to
        run once its lease ends), ``"dead"``.
    :raises celery.exceptions.Retry: a transient failure with attempts left.
    :raises Exception: the channel's failure, when it is permanent or the
        last attempt failed (the task then fails, and is not retried).
    """
    try:
        intent = Intent.from_dict(data)
    except (ValueError, TypeError) as exc:
        # A message nothing can deliver: retrying cannot help.
        logger.error("Task %s carries no readable intent: %s", task.request.id, exc)
        raise PermanentFailure(f"Unreadable intent in task {task.request.id}") from exc
    app = _app_of(task)
    if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
        return _deliver(task, app, intent)
    with app.app_context():
        return _deliver(task, app, intent)


def _app_of(task: celery.Task) -> Flask:
    if has_app_context():
        app = t.cast("Flask", current_app._get_current_object())  # type: ignore[attr-defined]
        if EXTENSION_KEY in app.extensions:
            return app
    linked = _linked.get(task.app)
    if linked is None:
        raise ConfigurationError(
            f"Task {TASK_NAME} ran with no Flask app: the worker's Celery app was"
            " not set up by an app with NotifyQueue. Follow Flask's Celery guide"
            " (celery_init_app(app), whose FlaskTask pushes the app context) and"
            " call NotifyQueue(app) after it, in the module the worker imports."
        )
    return linked


def _mode_of(app: Flask, state: State, intent: Intent) -> CeleryDelivery:
    mode = state.modes.get("celery")
    if intent.channel not in state.channels or mode is None:
        raise ConfigurationError(
            f"Channel {intent.channel!r} of intent {intent.id} is not a configured,"
            f" enabled channel of app {app.name!r} in this worker with 'delivery':"
            " 'celery'. The worker must load the same NOTIFYQUEUE_CHANNELS as the"
            " app that published it."
        )
    return t.cast("CeleryDelivery", mode)


def _deliver(task: celery.Task, app: Flask, intent: Intent) -> str:
    state = state_of(app)
    try:
        mode = _mode_of(app, state, intent)
    except ConfigurationError as exc:
        logger.error("%s", exc)
        send_isolated(signals.intent_dead, app, intent=intent, exception=exc)
        raise
    guard = mode.guard
    token = new_owner()
    policy = state.retry.get(intent.channel, RetryPolicy())
    try:
        claim = guard.claim(intent.id, token, lease=mode.lease, retain=mode.retain)
    except Exception as exc:
        # Without a claim nothing may be sent; failing the task would lose
        # the intent (acks_late acknowledges a failure), so try again later.
        countdown = _backoff(policy, task.request.retries + 1)
        logger.error(
            "The Celery guard at %s cannot be reached (%r); notification %s is"
            " tried again in %d s.",
            guard.display,
            exc,
            intent.id,
            countdown,
        )
        raise task.retry(exc=exc, countdown=countdown) from exc
    if claim.kind == "final":
        logger.info(
            "Notification %s to channel %r was already delivered (%s); task %s"
            " sends nothing.",
            intent.id,
            intent.channel,
            claim.outcome,
            task.request.id,
        )
        return "duplicate"
    if claim.kind == "busy":
        # Another execution is sending it, or died sending it: come back when
        # its lease ends; the guard then says which. Not an attempt.
        wait = claim.wait + 0.5
        logger.info(
            "Notification %s to channel %r is claimed by another execution; task"
            " %s looks again in %.1f s.",
            intent.id,
            intent.channel,
            task.request.id,
            wait,
        )
        task.signature_from_request(
            task.request, countdown=wait, retries=task.request.retries
        ).apply_async()
        return "deferred"
    attempt = claim.attempt
    if attempt > policy.max_attempts:
        why = (
            f"gave up: {attempt - 1} attempt(s) of {policy.max_attempts} never"
            " reported an outcome (the worker died)"
        )
        _finish(guard, intent, "dead", mode.retain)
        gave_up = OutboxError(why)
        logger.error(
            "Notification %s to channel %r is dead: %s.", intent.id, intent.channel, why
        )
        send_isolated(signals.intent_dead, app, intent=intent, exception=gave_up)
        return "dead"
    result = BatchResult(committed=True)
    try:
        # KeyboardInterrupt, SystemExit or a time limit propagates with no
        # outcome: the claim lapses with its lease and a redelivery decides.
        dispatch_batch(app, state, [intent], result)
    finally:
        remove_thread_session(state)
    if not result.failed:
        _finish(guard, intent, "done", mode.retain)
        return "delivered"
    error = result.failed[0][1]
    kind: str
    try:
        kind = failure_kind(state.channels.get(intent.channel), error)
    except Exception:
        logger.exception(
            "Channel %r's failure_kind() raised on %r; taking it as transient.",
            intent.channel,
            error,
        )
        kind = TRANSIENT
    if kind == TRANSIENT and attempt < policy.max_attempts:
        countdown = _backoff(policy, attempt)
        # Released first, so the retry can claim it at once; if that fails,
        # the retry finds the claim held and waits for its lease.
        try:
            guard.release(intent.id, token)
        except Exception:
            logger.exception(
                "Releasing the Celery guard's claim on %s failed; its retry waits"
                " for the claim's lease (NOTIFYQUEUE_CELERY_LEASE) to end.",
                intent.id,
            )
        next_attempt_at = datetime.now(timezone.utc) + timedelta(seconds=countdown)
        logger.info(
            "Notification %s to channel %r: attempt %d failed; Celery tries it"
            " again in %d s.",
            intent.id,
            intent.channel,
            attempt,
            countdown,
        )
        send_isolated(
            signals.intent_retrying,
            app,
            intent=intent,
            attempt=attempt,
            exception=error,
            next_attempt_at=next_attempt_at,
        )
        raise task.retry(exc=error, countdown=countdown)
    if kind == TRANSIENT or kind == PERMANENT:
        _finish(guard, intent, "dead", mode.retain)
        logger.error(
            "Notification %s to channel %r is dead after %d attempt(s): %r.",
            intent.id,
            intent.channel,
            attempt,
            error,
        )
        send_isolated(signals.intent_dead, app, intent=intent, exception=error)
    else:
        # It may have arrived: sending it again could deliver it twice.
        _finish(guard, intent, "uncertain", mode.retain)
        logger.error(
            "Notification %s to channel %r may or may not have been delivered"
            " (%r); it is not tried again.",
            intent.id,
            intent.channel,
            error,
        )
    raise error


def _backoff(policy: RetryPolicy, attempt: int) -> int:
    """Celery's exponential backoff with full jitter, from the channel's options."""
    from celery.utils.time import get_exponential_backoff_interval

    return int(
        get_exponential_backoff_interval(
            factor=round(policy.retry_backoff),
            retries=attempt - 1,
            maximum=round(policy.retry_backoff_max),
            full_jitter=True,
        )
    )


def _finish(guard: t.Any, intent: Intent, outcome: str, retain: float) -> None:
    try:
        guard.finish(intent.id, outcome, retain=retain)
    except Exception:
        # Sent already: the task must not fail (and be retried) over its mark.
        logger.exception(
            "Recording notification %s as %s in the Celery guard failed; a"
            " duplicate task could deliver it again.",
            intent.id,
            outcome,
        )
