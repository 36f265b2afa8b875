"""Test-only channels and models, importable as ``tests.helpers:...`` paths."""

from __future__ import annotations

import threading
import typing as t

from flask import current_app, has_request_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from notifyqueue import Channel, DeliveryError, Intent, TemplateError

db = SQLAlchemy()


class Item(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


class RecordingChannel(Channel):
    """Keeps each batch it is sent; can be told to fail, to exercise isolation.

    :param fail_on: intents whose payload contains this fail alone.
    :param crash: every batch raises ``RuntimeError``.
    """

    def __init__(self, name: str, *, fail_on: str | None = None, crash: bool = False):
        super().__init__(name)
        self.fail_on = fail_on
        self.crash = crash
        self.batches: list[list[Intent]] = []
        self.templates: list[t.Any] = []

    @property
    def sent(self) -> list[t.Any]:
        return [intent.payload for batch in self.batches for intent in batch]

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> t.Any:
        self.templates.append(template)  # as the channel was given it
        return super().render(template, context)

    def send(self, intents: t.Sequence[Intent]) -> None:
        if self.crash:
            raise RuntimeError(f"channel {self.name} is down")
        failures: dict[str, BaseException] = {}
        delivered = []
        for intent in intents:
            if self.fail_on is not None and self.fail_on in str(intent.payload):
                failures[intent.id] = ValueError(f"refused {intent.payload!r}")
            else:
                delivered.append(intent)
        self.batches.append(delivered)
        if failures:
            raise DeliveryError(failures)


class NotAChannel:
    def __init__(self, name: str) -> None:
        self.name = name


class ContextChannel(RecordingChannel):
    """Takes any template; its payload is the template and the context it got."""

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> t.Any:
        return {"template": template, "context": dict(context)}


class StrictChannel(RecordingChannel):
    """A channel whose ``check_template`` takes only ``{"text": str template}``."""

    def check_template(self, template: t.Any) -> None:
        if not isinstance(template, dict):
            raise TemplateError(
                f"a template of this channel is a dict, got {template!r}."
            )
        unknown = sorted(set(template) - {"text"})
        if unknown:
            raise TemplateError(f"unknown key {unknown[0]!r}; the only key is 'text'.")
        if "text" not in template:
            raise TemplateError("the key 'text' is missing.")

    def render(self, template: t.Any, context: t.Mapping[str, t.Any]) -> t.Any:
        return super().render(template["text"], context)


class GatedChannel(RecordingChannel):
    """A recording channel that notes where it runs, and can be held.

    A batch with an intent whose payload contains ``"hold"`` waits (up to
    30 s) for :attr:`gate`; :attr:`entered` is set as each batch arrives.
    Each batch's thread name, app and request-context flag are kept in
    :attr:`calls`.
    """

    def __init__(self, name: str, **options: t.Any) -> None:
        super().__init__(name, **options)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[dict[str, t.Any]] = []

    def send(self, intents: t.Sequence[Intent]) -> None:
        self.calls.append(
            {
                "thread": threading.current_thread().name,
                "app": current_app._get_current_object(),  # type: ignore[attr-defined]
                "request": has_request_context(),
            }
        )
        self.entered.set()
        if any("hold" in str(intent.payload) for intent in intents):
            if not self.gate.wait(timeout=30):
                raise TimeoutError("the test never opened the gate")
        super().send(intents)
