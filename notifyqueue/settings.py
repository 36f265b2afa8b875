"""Checks of config values shared by the extension and the delivery modes."""

from __future__ import annotations

import math
import typing as t

from .errors import ConfigurationError


def seconds(
    settings: t.Mapping[str, t.Any], key: str, *, minimum_above: float | None
) -> float:
    """A number of seconds: above ``minimum_above``, or 0 or more if ``None``.

    :raises ConfigurationError: naming the key, its value and what to use.
    """
    value = settings[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (value <= minimum_above if minimum_above is not None else value < 0)
    ):
        what = f"above {minimum_above:g}" if minimum_above is not None else "0 or more"
        raise ConfigurationError(
            f"{key} is {value!r}; use a number of seconds, {what}."
        )
    return float(value)
