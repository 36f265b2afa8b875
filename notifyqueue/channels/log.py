"""The ``log`` channel: one log record per intent."""

from __future__ import annotations

import logging
import sys
import types
import typing as t

from ..errors import DeliveryError, TemplateError
from ..templates import Raw, Template, compile_template
from .base import Channel

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import Intent


class LogChannel(Channel):
    """Write each intent as one log record.

    CR and LF inside interpolated values are escaped as ``\\r`` and ``\\n``,
    so a value cannot forge a second log line.

    :param logger: the logger's name; default the app's logger.
    :param level: a level name or number; default ``"INFO"``.
    """

    def __init__(
        self, name: str, *, logger: str | None = None, level: str | int = "INFO"
    ) -> None:
        super().__init__(name)
        if logger is not None and not isinstance(logger, str):
            raise ValueError(f"option 'logger' must be a logger name, got {logger!r}.")
        self.logger_name = logger
        self.level = _level_number(level)
        self._logger: logging.Logger | None = None

    def init_app(self, app: Flask) -> None:
        self._logger = (
            logging.getLogger(self.logger_name) if self.logger_name else app.logger
        )

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> str:
        if isinstance(template, Template):
            return template.render_one_line(context)
        if isinstance(template, Raw):  # the app's own final text, kept as it is
            return t.cast(str, super().render(template, context))
        if not isinstance(template, str):
            raise TemplateError(
                f"Channel {self.name!r} (log) takes a str template,"
                f" got {type(template).__name__} {template!r}."
            )
        return compile_template(template).render_one_line(context)

    def _renderer(self, template: t.Any) -> t.Callable[[t.Mapping[str, t.Any]], t.Any]:
        # What render() does with a compiled template, without its checks.
        if isinstance(template, Template) and type(self).render is LogChannel.render:
            return template.render_one_line
        return super()._renderer(template)

    def send(self, intents: t.Sequence[Intent]) -> None:
        logger = self._logger
        if logger is None:
            raise RuntimeError(f"Channel {self.name!r} was not initialised on an app.")
        level = self.level
        failures: dict[str, BaseException] = {}
        # The payload is the whole message: with no args, logging does not
        # %-format it, so a '%' in a value is harmless.
        if not _plain(logger):  # a logger class of its own may want log()
            for intent in intents:
                try:
                    logger.log(
                        level, intent.payload, extra={"notifyqueue_intent": intent.id}
                    )
                except Exception as exc:
                    failures[intent.id] = exc
            if failures:
                raise DeliveryError(failures)
            return
        # Logger.log()'s own steps (isEnabledFor, makeRecord, handle) without
        # findCaller(): its walk up the stack was a third of each record's
        # cost, and would stop here anyway. The record names this file,
        # function and line, as logging would.
        if logging._srcfile:
            filename, line, function = _location or _where(sys._getframe())
        else:  # caller look-up turned off: what logging records then
            filename, line, function = "(unknown file)", 0, "(unknown function)"
        name = logger.name
        for intent in intents:
            try:
                if logger.isEnabledFor(level):
                    extra = {"notifyqueue_intent": intent.id}
                    record = logger.makeRecord(
                        name, level, filename, line, intent.payload, (), None,
                        function, extra,
                    )  # fmt: skip
                    logger.handle(record)
            except Exception as exc:
                failures[intent.id] = exc
        if failures:
            raise DeliveryError(failures)


_location: tuple[str, int, str] | None = None
"""Where :meth:`LogChannel.send` makes its records, once known."""


def _where(frame: types.FrameType) -> tuple[str, int, str]:
    """The file, line and function of ``frame``, kept in :data:`_location`
    (working out a frame's line walks its code's line table).

    A function of its own, so that no frame holds itself in a local
    variable: that cycle would keep the whole stack of the request alive
    until the garbage collector found it.
    """
    global _location
    code = frame.f_code
    _location = (code.co_filename, frame.f_lineno, code.co_name)
    return _location


def _plain(logger: logging.Logger) -> bool:
    """Whether ``logger`` makes its records as :class:`logging.Logger` does."""
    cls = type(logger)
    return (
        cls.log is logging.Logger.log
        and cls._log is logging.Logger._log
        and cls.findCaller is logging.Logger.findCaller
    )


def _level_number(level: str | int) -> int:
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        raise ValueError(
            f"option 'level' must be a level name or number, got {level!r}."
        )
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(
            f"option 'level' is {level!r}, which is not a logging level;"
            " use DEBUG, INFO, WARNING, ERROR or CRITICAL."
        )
    return number
