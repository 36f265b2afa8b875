"""Dispatching committed intents: grouping, isolated receivers, the result.

The last step of a committed batch's route (transaction end -> delivery ->
dispatch -> channel), the same for every delivery mode.
"""

from __future__ import annotations

import logging
import typing as t

from . import signals
from .errors import DeliveryError
from .state import state_of

if t.TYPE_CHECKING:
    from blinker import NamedSignal
    from flask import Flask

    from .intent import BatchResult, Intent
    from .state import State

logger = logging.getLogger("notifyqueue")


def dispatch_batch(
    app: Flask, state: State, intents: list[Intent], result: BatchResult
) -> None:
    """Hand committed intents to their channels, recording each outcome in ``result``.

    Runs inside an app context of ``app``, in whichever thread the intents'
    delivery mode chose, once their root transaction has ended (so receivers
    may use the session again). Every receiver is isolated: an ``Exception``
    is logged and reported per intent; ``KeyboardInterrupt`` and
    ``SystemExit`` propagate.
    """
    for name, group in _groups(intents, state):
        _dispatch_group(app, state, name, group, result)


def dispatch_by_mode(
    app: Flask, state: State, intents: list[Intent], result: BatchResult
) -> None:
    """Deliver ``intents`` now, in this thread, each as its delivery mode does
    (:meth:`~notifyqueue.delivery.DeliveryMode.dispatch_now`): the drainer's
    way of sending claimed rows, whose channels may be delivered differently.
    """
    modes = state.modes
    if len(modes) == 1:
        next(iter(modes.values())).dispatch_now(app, state, intents, result)
        return
    by_mode: dict[str, list[Intent]] = {}
    delivery = state.delivery
    for intent in intents:
        by_mode.setdefault(delivery.get(intent.channel, "inline"), []).append(intent)
    for name, mode in modes.items():
        part = by_mode.pop(name, None)
        if part:
            mode.dispatch_now(app, state, part, result)
    for part in by_mode.values():  # a channel this app no longer configures
        dispatch_batch(app, state, part, result)


def record_batch(state: State, intents: list[Intent], result: BatchResult) -> bool:
    """Record ``intents`` as dispatched without delivering them, if a capture asks.

    :return: whether a ``capture(dispatch=False)`` block is active (and the
        intents were recorded in every active block).
    """
    captures = state.captures
    if not captures or all(capture.dispatch for capture in captures):
        return False
    for _, group in _groups(intents, state):
        result.dispatched.extend(group)
        for capture in list(captures):
            capture.intents.extend(group)
    return True


def _groups(intents: list[Intent], state: State) -> list[tuple[str, list[Intent]]]:
    """Split a batch into channel batches, per ``NOTIFYQUEUE_ORDER``."""
    if len(state.channels) == 1:
        # Only the app's enabled channels' intents reach dispatch: the queue
        # refuses any other channel, the drainer claims only their rows and
        # the Celery task refuses any other. With one, they are all its.
        return [(next(iter(state.channels)), intents)]
    if state.order == "call":
        runs: list[tuple[str, list[Intent]]] = []
        for intent in intents:
            if runs and runs[-1][0] == intent.channel:
                runs[-1][1].append(intent)
            else:
                runs.append((intent.channel, [intent]))
        return runs
    by_channel: dict[str, list[Intent]] = {}
    for intent in intents:
        group = by_channel.get(intent.channel)
        if group is None:
            by_channel[intent.channel] = [intent]
        else:
            group.append(intent)
    return [(name, by_channel[name]) for name in state.channels if name in by_channel]


def _dispatch_group(
    app: Flask, state: State, name: str, group: list[Intent], result: BatchResult
) -> None:
    failures: dict[str, BaseException] = {}
    for receiver in _receivers(name):
        try:
            if receiver is deliver_to_channel:
                # What it does, without its keyword call and state look-up.
                channel = state.channels.get(name)
                if channel is not None:
                    channel.send(list(group))
            else:
                receiver(name, app=app, intents=list(group))
        except DeliveryError as exc:
            for intent_id, error in exc.failures.items():
                failures.setdefault(intent_id, error)
        except Exception as exc:
            for intent in group:
                failures.setdefault(intent.id, exc)
    if not failures:
        # The usual case, kept per group rather than per intent: B1 showed the
        # per-intent bookkeeping costing as much as the channel itself.
        result.dispatched.extend(group)
        if state.captures:
            for capture in list(state.captures):
                capture.intents.extend(group)
        if signals.intent_dispatched.receivers:
            for intent in group:
                send_isolated(signals.intent_dispatched, app, intent=intent)
        return
    for intent in group:
        failure = failures.get(intent.id)
        if failure is None:
            result.dispatched.append(intent)
            for capture in list(state.captures):
                capture.intents.append(intent)
            send_isolated(signals.intent_dispatched, app, intent=intent)
        else:
            result.failed.append((intent, failure))
            logger.error(
                "Notification %s to channel %r (from %s) failed: %r",
                intent.id,
                name,
                intent.source,
                failure,
                exc_info=failure,
            )
            send_isolated(signals.intent_failed, app, intent=intent, exception=failure)


def _receivers(name: str) -> t.Sequence[t.Callable[..., t.Any]]:
    """The ``dispatch`` receivers for channel ``name``, as a list."""
    receivers = signals.dispatch.receivers
    if len(receivers) == 1 and next(iter(receivers.values())) is deliver_to_channel:
        # Nothing but deliver_to_channel listens (held strongly: the value is
        # the function itself), and it listens to every sender: receivers_for()
        # would yield it alone, through a generator that builds a set of ids
        # (1 µs a channel batch). Should blinker keep receivers otherwise,
        # this test fails and the general way is taken.
        return _LONE
    # A copy: a receiver may disconnect itself while we iterate.
    return list(signals.dispatch.receivers_for(name))


def deliver_to_channel(sender: str, *, app: Flask, intents: list[Intent]) -> None:
    """The ``dispatch`` receiver that hands a channel batch to its channel."""
    channel = state_of(app).channels.get(sender)
    if channel is not None:
        channel.send(intents)


signals.dispatch.connect(deliver_to_channel, weak=False)
_LONE = (deliver_to_channel,)


def send_isolated(signal: NamedSignal, sender: t.Any, **kwargs: t.Any) -> None:
    """Send ``signal`` so that a receiver that raises stops no other.

    Used for everything sent after a commit or during a rollback, where an
    exception would escape from SQLAlchemy's ``commit()``/``rollback()``.
    """
    if not signal.receivers:
        return
    for receiver in list(signal.receivers_for(sender)):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception(
                "Receiver %r of signal %r raised; the other receivers still ran.",
                receiver,
                signal.name,
            )


def remove_thread_session(state: State) -> None:
    """Remove the session a task off the committing thread used, if it outlives
    the task's app context.

    A Flask-SQLAlchemy session is scoped to the app context and removed by
    its teardown; a thread-local ``scoped_session`` would keep its connection
    in this pool thread.
    """
    registry = state.session.registry
    try:
        present = registry.has()
    except RuntimeError:  # scoped to an app context, which has ended
        return
    if present:
        try:
            state.session.remove()
        except Exception:
            logger.exception("Removing the session after a delivery task raised.")
