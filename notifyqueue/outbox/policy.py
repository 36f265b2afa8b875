"""Retries of a durable channel: how failures are classified and when to try again."""

from __future__ import annotations

import dataclasses
import math
import random
import typing as t
from datetime import timedelta

from ..errors import ConfigurationError

TRANSIENT = "transient"
"""Try again later (a connection refused, an SMTP 4xx)."""
PERMANENT = "permanent"
"""Never try again (an SMTP 5xx): the row goes to ``dead`` at once."""
UNCERTAIN = "uncertain"
"""The outcome is unknown (the message data went out, the answer never came):
not retried automatically, since a retry could deliver it twice."""
KINDS = (TRANSIENT, PERMANENT, UNCERTAIN)

FailureKind = t.Literal["transient", "permanent", "uncertain"]

OPTIONS = {"max_attempts": 8, "retry_backoff": 30.0, "retry_backoff_max": 3600.0}
"""The retry options every channel takes, with their defaults."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """A durable channel's retry options.

    Attempt ``n`` (the first is 1) that fails transiently is tried again
    after a delay drawn uniformly between half and all of
    ``min(retry_backoff * 2 ** (n - 1), retry_backoff_max)``: exponential, with
    jitter so that rows that failed together do not all come back together.
    """

    max_attempts: int = 8
    retry_backoff: float = 30.0
    retry_backoff_max: float = 3600.0

    @classmethod
    def from_options(cls, options: t.Mapping[str, t.Any], where: str) -> RetryPolicy:
        """Read and check a channel's retry options.

        :raises ConfigurationError: naming the option, its value and what to use.
        """
        values = {key: options.get(key, default) for key, default in OPTIONS.items()}
        attempts = values["max_attempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(
                f"{where}['max_attempts'] is {attempts!r}; use a whole number, 1"
                " or more (1 means never retry)."
            )
        for key in ("retry_backoff", "retry_backoff_max"):
            value = values[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigurationError(
                    f"{where}[{key!r}] is {value!r}; use a number of seconds, 0 or"
                    " more."
                )
        if values["retry_backoff_max"] < values["retry_backoff"]:
            raise ConfigurationError(
                f"{where}['retry_backoff_max'] ({values['retry_backoff_max']!r}) is"
                f" less than its 'retry_backoff' ({values['retry_backoff']!r}); make"
                " it at least as large."
            )
        return cls(
            attempts, float(values["retry_backoff"]), float(values["retry_backoff_max"])
        )

    def nominal_delay(self, attempt: int) -> float:
        """The delay before the try after ``attempt``, before jitter, in seconds."""
        # min() first: 2 ** attempt for a large attempt would overflow a float.
        exponent = min(attempt - 1, 64)
        return min(self.retry_backoff * 2.0**exponent, self.retry_backoff_max)

    def delay(self, attempt: int) -> timedelta:
        """The delay before the try after ``attempt``: half to all of nominal."""
        nominal = self.nominal_delay(attempt)
        return timedelta(seconds=random.uniform(nominal / 2, nominal))


def failure_kind(channel: t.Any, exc: BaseException) -> FailureKind:
    """What kind of failure ``exc`` is, as ``channel`` (a Channel, or None) says."""
    classify = getattr(channel, "failure_kind", None)
    if classify is not None:
        kind = classify(exc)
        if kind in KINDS:
            return t.cast("FailureKind", kind)
    return "transient"
