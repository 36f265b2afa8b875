"""The exceptions notifyqueue raises.

Every one derives from :class:`NotifyQueueError`; most also derive from the
builtin that matches the mistake, so callers may catch either.
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from .intent import BatchResult


class NotifyQueueError(Exception):
    """Base class of every error notifyqueue raises."""


class ConfigurationError(NotifyQueueError, ValueError):
    """A config value, a channel option or a decorator argument is invalid."""


class TemplateError(ConfigurationError):
    """A template is malformed, names an unknown field, or cannot be rendered."""


class PayloadError(NotifyQueueError, ValueError):
    """A rendered payload is unsafe or invalid (for example CR/LF in a header)."""


class ChannelNotFound(NotifyQueueError, LookupError):
    """A channel name is not declared by the decorator or not configured."""


class ArgumentTypeError(NotifyQueueError, TypeError):
    """An argument has the wrong type (``notify=``, ``session=``)."""


class LifecycleError(NotifyQueueError, RuntimeError):
    """The extension is used outside its lifecycle (no app context, no init)."""


class OutboxError(NotifyQueueError, RuntimeError):
    """The outbox cannot be used: its table is missing, or a payload is not JSON."""


class DeliveryFailure(NotifyQueueError):
    """Raise a subclass from :meth:`~notifyqueue.Channel.send` (or list one in a
    :class:`DeliveryError`) to say what kind of failure a durable channel hit.

    Any other exception counts as :class:`TransientFailure`, unless the
    channel's :meth:`~notifyqueue.Channel.failure_kind` says otherwise.
    """

    kind: t.ClassVar[str] = "transient"


class TransientFailure(DeliveryFailure):
    """It may work later: retried with backoff, up to ``max_attempts``."""

    kind = "transient"


class PermanentFailure(DeliveryFailure):
    """It will never work: the outbox row goes to ``dead`` at once."""

    kind = "permanent"


class UncertainFailure(DeliveryFailure):
    """It may have been delivered: the row goes to ``uncertain``, never retried
    automatically (``flask notifyqueue outbox retry --uncertain`` does)."""

    kind = "uncertain"


_KIND_ATTRIBUTE = "__notifyqueue_failure__"


def mark_failure(exc: BaseException, kind: str) -> BaseException:
    """Tag ``exc`` with a failure kind (``"transient"``, ``"permanent"`` or
    ``"uncertain"``) that :meth:`~notifyqueue.Channel.failure_kind` reads;
    return it. For a channel that reports the original exception."""
    if kind not in ("transient", "permanent", "uncertain"):
        raise ValueError(
            f"kind is {kind!r}; use 'transient', 'permanent' or 'uncertain'."
        )
    setattr(exc, _KIND_ATTRIBUTE, kind)
    return exc


def marked_failure(exc: BaseException) -> str | None:
    """The kind :func:`mark_failure` or a :class:`DeliveryFailure` gives ``exc``."""
    if isinstance(exc, DeliveryFailure):
        return exc.kind
    kind = getattr(exc, _KIND_ATTRIBUTE, None)
    return kind if isinstance(kind, str) else None


class DeliveryError(NotifyQueueError):
    """Some intents of a batch could not be delivered.

    A channel's :meth:`~notifyqueue.Channel.send` raises it with the intents
    that failed; intents not listed were delivered. With
    ``NOTIFYQUEUE_STRICT = True`` the commit that dispatched a batch raises it
    with every failure of the batch and the :class:`~notifyqueue.BatchResult`.

    :param failures: intent id -> the exception that stopped its delivery.
    :param result: the batch's result, when raised by a strict commit.
    """

    def __init__(
        self,
        failures: t.Mapping[str, BaseException],
        *,
        result: BatchResult | None = None,
    ) -> None:
        self.failures: dict[str, BaseException] = dict(failures)
        self.result = result
        summary = "; ".join(
            f"{intent_id}: {exc!r}" for intent_id, exc in self.failures.items()
        )
        super().__init__(f"{len(self.failures)} notification(s) failed: {summary}")
