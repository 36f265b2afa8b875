"""Channels, and how a ``"type"`` in ``NOTIFYQUEUE_CHANNELS`` finds its class."""

from __future__ import annotations

import importlib
import typing as t
from importlib.metadata import entry_points

from ..errors import ConfigurationError
from .base import Channel

ENTRY_POINT_GROUP = "notifyqueue.channels"

# Built-in types are imported lazily: the mail channel needs an optional extra.
_BUILTIN = {
    "log": ("notifyqueue.channels.log:LogChannel", None),
    "mail": ("notifyqueue.channels.mail:MailChannel", "notifyqueue[mail]"),
}


def resolve_channel_class(type_name: t.Any, where: str) -> type[Channel]:
    """Find the :class:`Channel` subclass that ``type_name`` names.

    ``type_name`` is a built-in type (``"log"``, ``"mail"``), an import path
    ``"package.module:Class"``, or the name of an entry point in the
    ``notifyqueue.channels`` group.

    :param where: the config key, for error messages.
    :raises ConfigurationError: naming the key and the fix.
    """
    if not isinstance(type_name, str) or not type_name:
        raise ConfigurationError(
            f"{where} must be a channel type: 'log', 'mail', an entry point name"
            f" or 'package.module:Class'; got {type_name!r}."
        )
    extra = None
    if type_name in _BUILTIN:
        path, extra = _BUILTIN[type_name]
        loaded = _import_path(path, where, extra)
    elif ":" in type_name:
        loaded = _import_path(type_name, where, None)
    else:
        loaded = _load_entry_point(type_name, where)
    if not (isinstance(loaded, type) and issubclass(loaded, Channel)):
        raise ConfigurationError(
            f"{where} is {type_name!r}, which gives {loaded!r}: not a subclass of"
            " notifyqueue.Channel. Derive the channel class from Channel."
        )
    return loaded


def _import_path(path: str, where: str, extra: str | None) -> t.Any:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a module may raise anything while it is imported
        hint = (
            f" Install it with: pip install '{extra}'."
            if extra and isinstance(exc, ImportError)
            else " Check the module path and that its package is installed."
        )
        raise ConfigurationError(
            f"{where} is {path!r}, but importing {module_name!r} failed: {exc}.{hint}"
        ) from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(
            f"{where} is {path!r}, but module {module_name!r} has no {attribute!r}."
        ) from exc


def _load_entry_point(name: str, where: str) -> t.Any:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        available = sorted(
            {"log", "mail"} | set(entry_points(group=ENTRY_POINT_GROUP).names)
        )
        raise ConfigurationError(
            f"{where} is {name!r}, which is no channel type. Known types:"
            f" {', '.join(available)}; or give an import path 'package.module:Class'."
        )
    entry_point = next(iter(found))
    try:
        return entry_point.load()
    except Exception as exc:
        raise ConfigurationError(
            f"{where} is {name!r}, but its entry point {entry_point.value!r} failed"
            f" to load: {type(exc).__name__}: {exc}."
        ) from exc


__all__ = ["ENTRY_POINT_GROUP", "Channel", "resolve_channel_class"]
