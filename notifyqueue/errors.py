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
