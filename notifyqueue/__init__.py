"""Hold side effects until the SQLAlchemy transaction that caused them commits."""

from __future__ import annotations

import typing as t

from . import signals
from .channels import Channel
from .decorators import DeferredFunction, deferred_notify
from .delivery import BackgroundStats, background_stats
from .errors import (
    ArgumentTypeError,
    ChannelNotFound,
    ConfigurationError,
    DeliveryError,
    DeliveryFailure,
    LifecycleError,
    NotifyQueueError,
    OutboxError,
    PayloadError,
    PermanentFailure,
    TemplateError,
    TransientFailure,
    UncertainFailure,
    mark_failure,
)
from .extension import NotifyQueue
from .intent import BatchResult, Intent
from .queue import enqueue, finalise
from .templates import Raw

__all__ = [
    "ArgumentTypeError",
    "BackgroundStats",
    "BatchResult",
    "Channel",
    "ChannelNotFound",
    "ConfigurationError",
    "DeferredFunction",
    "DeliveryError",
    "DeliveryFailure",
    "Intent",
    "LifecycleError",
    "NotifyQueue",
    "NotifyQueueError",
    "OutboxError",
    "PayloadError",
    "PermanentFailure",
    "Raw",
    "TemplateError",
    "TransientFailure",
    "UncertainFailure",
    "background_stats",
    "deferred_notify",
    "enqueue",
    "finalise",
    "mark_failure",
    "signals",
]


def __getattr__(name: str) -> t.Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("notifyqueue")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
