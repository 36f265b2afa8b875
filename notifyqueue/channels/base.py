"""The :class:`Channel` base class that every channel derives from."""

from __future__ import annotations

import functools
import typing as t

from ..errors import TemplateError, marked_failure
from ..templates import Raw, Template, compile_template

if t.TYPE_CHECKING:
    from flask import Flask

    from ..intent import Intent


class Channel:
    """Delivers rendered intents somewhere once their transaction has committed.

    The extension builds each configured channel once per app as
    ``cls(name, **options)`` (the options without ``"type"``), then calls
    :meth:`init_app`. A subclass takes its options as keyword-only parameters
    of ``__init__``; an option it does not accept is a start-up error.

    :param name: the channel's name in ``NOTIFYQUEUE_CHANNELS``.
    """

    test_template: t.ClassVar[t.Any] = "Test notification from notifyqueue (app {app})."
    """What ``flask notifyqueue send-test`` renders; its context has ``app``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def init_app(self, app: Flask) -> None:
        """Check what the channel needs from ``app``; raise ``ValueError`` if not."""

    def check_template(self, template: t.Any) -> None:
        """Check a template's shape without rendering it.

        Called at ``init_app`` for every template a decorated function names
        this channel with (and at decoration for functions decorated after),
        so a malformed template fails at start-up instead of at its first
        call. Raise :class:`~notifyqueue.TemplateError` saying what is wrong;
        the caller adds the function's and the channel's names. The base
        class accepts any template.
        """

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> t.Any:
        """Render ``template`` at queue time, inside the caller's transaction.

        Raise ``ValueError`` here for anything invalid, so the caller sees it
        before the commit. The base class renders a ``str`` template with
        ``str.format`` semantics, and returns a :class:`~notifyqueue.Raw`
        ``str`` as it is.
        """
        if isinstance(template, Raw):
            if not isinstance(template.value, str):
                raise TemplateError(
                    f"Channel {self.name!r} takes a str payload, got"
                    f" {type(template.value).__name__} {template.value!r} in Raw()."
                )
            return template.value
        if not isinstance(template, Template):
            template = compile_template(template)
        return template.render(context)

    def _renderer(self, template: t.Any) -> t.Callable[[t.Mapping[str, t.Any]], t.Any]:
        """Return what renders ``template`` from a context, as :meth:`render` does.

        Asked once per app and decorated function, not per call, for a
        template that :meth:`check_template` accepted. Where
        ``render`` is not overridden and the template is a compiled
        :class:`~notifyqueue.templates.Template`, that is the template's own
        filler: the same text and errors as :meth:`render`, one call instead
        of three.
        """
        if isinstance(template, Template) and type(self).render is Channel.render:
            return template._fill
        return functools.partial(self.render, template)

    def send(self, intents: t.Sequence[Intent]) -> None:
        """Deliver one batch of intents, after the commit.

        Return when every intent was delivered. Raise
        :class:`~notifyqueue.DeliveryError` naming the intents that failed
        (the others count as delivered); any other exception fails the batch.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement send().")

    def failure_kind(self, exc: BaseException) -> str:
        """Classify a failure of :meth:`send` for a durable channel's retries.

        Return ``"transient"`` (retry with backoff), ``"permanent"`` (never
        retry) or ``"uncertain"`` (it may have been delivered: do not retry
        automatically). The base class reads a
        :class:`~notifyqueue.DeliveryFailure` subclass or
        :func:`~notifyqueue.mark_failure`, and calls anything else transient.
        """
        return marked_failure(exc) or "transient"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
