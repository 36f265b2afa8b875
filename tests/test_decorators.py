from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import typing as t
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from notifyqueue import (
    ChannelNotFound,
    ConfigurationError,
    Intent,
    LifecycleError,
    NotifyQueueError,
    Raw,
    TemplateError,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)
from notifyqueue.testing import capture

from .conftest import require_postgres
from .helpers import ContextChannel, Item, RecordingChannel, db

CONTEXT = {"type": "tests.helpers:ContextChannel"}


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    """SQLite: most of the decorator does not depend on the database.

    A test that flushes asks for both with
    ``@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)``.
    """
    if getattr(request, "param", "sqlite") == "postgresql":
        return require_postgres()
    return f"sqlite:///{tmp_path / 'test.db'}"


BOTH_DATABASES = ["sqlite", "postgresql"]


@pytest.fixture
def queued(app: Flask) -> t.Iterator[list[Intent]]:
    """The intents queued on ``app``, in the order ``intent_queued`` reported them."""
    intents: list[Intent] = []

    def receiver(sender: Flask, *, intent: Intent) -> None:
        intents.append(intent)

    signals.intent_queued.connect(receiver, sender=app)
    yield intents
    signals.intent_queued.disconnect(receiver, sender=app)


@pytest.fixture
def froggy_app(make_app: t.Callable[..., Flask]) -> t.Iterator[Flask]:
    """An app with the issue's channels: log and mail (plus rec)."""
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log"},
            "mail": {"type": "mail", "recipients": ["admins@example.com"]},
            "rec": {"type": "tests.helpers:RecordingChannel"},
        }
    )
    with app.app_context():
        yield app


class Froggy:
    def __init__(self, id: int, name: str = "Froggy") -> None:
        self.id = id
        self.name = name
        self.jump_height = "0 metres"


def payloads(intents: t.Iterable[Intent]) -> list[t.Any]:
    return [intent.payload for intent in intents]


# -- the example ------------------------------------------------------


def _froggy_decorator() -> t.Callable[[t.Any], t.Any]:
    return deferred_notify(
        log="Made froggy jump: {froggy.id}; jump height: {jump_height}",
        mail={
            "subject": "Made froggy jump",
            "body": "Froggy: {froggy.id}; jump height: {froggy.jump_height}",
        },
    )


def test_froggy_example_renders_every_channel_it_names(froggy_app: Flask) -> None:
    @_froggy_decorator()
    def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
        froggy.jump_height = jump_height

    queued: list[Intent] = []
    with signals.intent_queued.connected_to(
        lambda sender, intent: queued.append(intent), sender=froggy_app
    ):
        make_froggy_jump(Froggy(7), "50 metres")

    assert [intent.channel for intent in queued] == ["log", "mail"]
    assert queued[0].payload == "Made froggy jump: 7; jump height: 50 metres"
    assert queued[1].payload == {
        "subject": "Made froggy jump",
        "body": "Froggy: 7; jump height: 50 metres",
        "recipients": ["admins@example.com"],
        "sender": "notify@example.com",
    }


def test_froggy_example_delivers_log_and_mail_after_commit(
    froggy_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    @_froggy_decorator()
    def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
        froggy.jump_height = jump_height

    mail = froggy_app.extensions["mail"]
    with mail.record_messages() as outbox:
        make_froggy_jump(Froggy(7), "50 metres")
        assert outbox == []
        assert "Made froggy jump" not in caplog.text
        result = finalise()

    assert result.ok
    assert [intent.channel for intent in result.dispatched] == ["log", "mail"]
    assert "Made froggy jump: 7; jump height: 50 metres" in caplog.messages
    assert len(outbox) == 1
    assert outbox[0].subject == "Made froggy jump"
    assert outbox[0].body == "Froggy: 7; jump height: 50 metres"
    assert outbox[0].recipients == ["admins@example.com"]


def test_froggy_example_notify_list_selects_channels(froggy_app: Flask) -> None:
    @_froggy_decorator()
    def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
        froggy.jump_height = jump_height

    make_froggy_jump(Froggy(7), "50 metres", notify=["log"])
    result = finalise()

    assert [intent.channel for intent in result.dispatched] == ["log"]


def test_froggy_example_notify_false_queues_nothing(froggy_app: Flask) -> None:
    @_froggy_decorator()
    def make_froggy_jump(froggy: Froggy, jump_height: str) -> None:
        froggy.jump_height = jump_height

    froggy = Froggy(7)
    make_froggy_jump(froggy, "50 metres", notify=False)
    result = finalise()

    assert froggy.jump_height == "50 metres"
    assert result.dispatched == []


# -- where field values come from ---------------------------------------------


def test_fields_name_positional_parameters(ctx: None, queued: list[Intent]) -> None:
    @deferred_notify(rec="{froggy.id} jumped {jump_height}")
    def jump(froggy: Froggy, jump_height: str) -> None:
        pass

    jump(Froggy(3), "2 metres")

    assert payloads(queued) == ["3 jumped 2 metres"]


def test_fields_name_parameters_passed_by_keyword(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} jumped {jump_height}")
    def jump(froggy: Froggy, jump_height: str) -> None:
        pass

    jump(jump_height="2 metres", froggy=Froggy(3))

    assert payloads(queued) == ["3 jumped 2 metres"]


def test_fields_get_parameter_defaults(ctx: None, queued: list[Intent]) -> None:
    @deferred_notify(rec="{froggy.id} jumped {jump_height}")
    def jump(froggy: Froggy, jump_height: str = "1 metre") -> None:
        pass

    jump(Froggy(3))

    assert payloads(queued) == ["3 jumped 1 metre"]


def test_fields_read_attributes_keys_and_indexes(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.name} {info[pond]} {heights[1]}")
    def jump(froggy: Froggy, info: dict[str, str], heights: list[int]) -> None:
        pass

    jump(Froggy(3, name="Fred"), {"pond": "Mill pond"}, [10, 20])

    assert payloads(queued) == ["Fred Mill pond 20"]


def test_result_field_is_the_return_value(ctx: None, queued: list[Intent]) -> None:
    @deferred_notify(rec="landed at {result[landed]}")
    def jump(height: int) -> dict[str, int]:
        return {"landed": height * 2}

    jump(21)

    assert payloads(queued) == ["landed at 42"]


def test_fields_name_keyword_only_parameters(ctx: None, queued: list[Intent]) -> None:
    @deferred_notify(rec="{froggy.id} {how} {speed}")
    def jump(froggy: Froggy, *, how: str, speed: str = "fast") -> None:
        pass

    jump(Froggy(3), how="sideways")
    jump(Froggy(4), speed="slow", how="backwards")

    assert payloads(queued) == ["3 sideways fast", "4 backwards slow"]


def test_fields_name_positional_only_parameters(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} {height}")
    def jump(froggy: Froggy, height: str = "low", /) -> None:
        pass

    jump(Froggy(3))
    jump(Froggy(4), "high")

    assert payloads(queued) == ["3 low", "4 high"]


def test_var_positional_field_is_the_tuple_of_extra_arguments(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} {heights} first={heights[0]}")
    def jump(froggy: Froggy, *heights: int) -> None:
        pass

    jump(Froggy(3), 5, 6)

    assert payloads(queued) == ["3 (5, 6) first=5"]


def test_var_keyword_field_is_the_dict_of_extra_keywords(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} {extra}")
    def jump(froggy: Froggy, **extra: str) -> None:
        pass

    jump(froggy=Froggy(3), colour="green")

    assert payloads(queued) == ["3 {'colour': 'green'}"]


def test_var_keyword_field_equals_what_the_function_received(
    ctx: None, queued: list[Intent]
) -> None:
    # A keyword with the name of a positional-only parameter lands in **extra.
    @deferred_notify(rec="{extra} == {result}")
    def jump(froggy: t.Any, /, **extra: t.Any) -> dict[str, t.Any]:
        return extra

    received = jump("positional", froggy="keyword")

    assert received == {"froggy": "keyword"}
    assert payloads(queued) == ["{'froggy': 'keyword'} == {'froggy': 'keyword'}"]


def test_field_naming_no_parameter_comes_from_kwargs(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} is {colour}")
    def jump(froggy: Froggy, **extra: str) -> None:
        pass

    jump(Froggy(3), colour="green")

    assert payloads(queued) == ["3 is green"]


def test_field_from_kwargs_missing_at_call_raises_template_error(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="{froggy.id} is {colour}")
    def jump(froggy: Froggy, **extra: str) -> None:
        pass

    with pytest.raises(TemplateError, match="'colour'"):
        jump(Froggy(3))
    assert queued == []


def test_fields_name_method_parameters_and_self(
    ctx: None, queued: list[Intent]
) -> None:
    class Pond:
        name = "Mill pond"

        @deferred_notify(rec="{froggy.id} jumped into {self.name}")
        def receive(self, froggy: Froggy) -> None:
            pass

    Pond().receive(Froggy(3))

    assert payloads(queued) == ["3 jumped into Mill pond"]


def test_notify_is_consumed_by_the_wrapper(ctx: None) -> None:
    @deferred_notify(rec="{extra}")
    def jump(**extra: t.Any) -> dict[str, t.Any]:
        return extra

    assert jump(height=1, notify=False) == {"height": 1}


# -- notify= ------------------------------------------------------------------


def test_notify_omitted_queues_every_channel_in_decorator_order(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="rec {height}", log="log {height}")
    def jump(height: int) -> None:
        pass

    jump(1)

    assert [(i.channel, i.payload) for i in queued] == [
        ("rec", "rec 1"),
        ("log", "log 1"),
    ]


def test_notify_true_queues_every_channel_in_decorator_order(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="rec {height}", log="log {height}")
    def jump(height: int) -> None:
        pass

    jump(1, notify=True)

    assert [i.channel for i in queued] == ["rec", "log"]


def test_notify_list_queues_only_those_channels(
    ctx: None, queued: list[Intent], rec: RecordingChannel
) -> None:
    @deferred_notify(log="log {height}", rec="rec {height}")
    def jump(height: int) -> None:
        pass

    jump(1, notify=["rec"])
    finalise()

    assert [i.channel for i in queued] == ["rec"]
    assert rec.sent == ["rec 1"]


def test_notify_list_can_leave_out_a_channel_the_app_lacks(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="rec {height}", sms="sms {height}")
    def jump(height: int) -> None:
        pass

    jump(1, notify=["rec"])

    assert payloads(queued) == ["rec 1"]


def test_notify_false_queues_nothing(
    ctx: None, queued: list[Intent], rec: RecordingChannel
) -> None:
    calls = []

    @deferred_notify(rec="rec {height}")
    def jump(height: int) -> int:
        calls.append(height)
        return height

    assert jump(1, notify=False) == 1
    result = finalise()

    assert calls == [1]
    assert queued == []
    assert result.dispatched == []
    assert rec.batches == []


def test_notify_false_needs_no_app_context(app: Flask) -> None:
    calls = []

    @deferred_notify(rec="rec {height}")
    def jump(height: int) -> int:
        calls.append(height)
        return height

    assert jump(1, notify=False) == 1
    assert calls == [1]


def test_call_without_app_context_fails_before_the_body(app: Flask) -> None:
    calls = []

    @deferred_notify(rec="rec {height}")
    def jump(height: int) -> None:
        calls.append(height)

    with pytest.raises(LifecycleError, match="application context"):
        jump(1)
    assert calls == []


def test_notify_undeclared_channel_fails_before_the_body(
    ctx: None, queued: list[Intent]
) -> None:
    calls = []

    @deferred_notify(rec="rec {height}")
    def jump(height: int) -> None:
        calls.append(height)

    with pytest.raises(ChannelNotFound, match="'log'") as info:
        jump(1, notify=["rec", "log"])
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, NotifyQueueError)
    assert calls == []
    assert queued == []


def test_declared_channel_the_app_lacks_fails_before_the_body(
    ctx: None, queued: list[Intent]
) -> None:
    calls = []

    @deferred_notify(rec="rec {height}", sms="sms {height}")
    def jump(height: int) -> None:
        calls.append(height)

    with pytest.raises(ChannelNotFound, match="'sms'") as info:
        jump(1)
    assert isinstance(info.value, NotifyQueueError)
    assert calls == []
    assert queued == []


@pytest.mark.parametrize("notify", ["rec", 5], ids=["string", "not-iterable"])
def test_notify_of_wrong_type_fails_before_the_body(
    ctx: None, queued: list[Intent], notify: t.Any
) -> None:
    calls = []

    @deferred_notify(rec="rec {height}")
    def jump(height: int) -> None:
        calls.append(height)

    with pytest.raises(
        TypeError, match=r"notify must be True, False or a list"
    ) as info:
        jump(1, notify=notify)
    assert isinstance(info.value, NotifyQueueError)
    assert repr(notify) in str(info.value)
    assert calls == []
    assert queued == []


# -- checked at decoration ----------------------------------------------------


def test_template_syntax_error_fails_at_decoration() -> None:
    with pytest.raises(ValueError, match="syntax error"):

        @deferred_notify(rec="{froggy.id")
        def jump(froggy: Froggy) -> None:
            pass


def test_field_naming_no_parameter_fails_at_decoration() -> None:
    with pytest.raises(TemplateError, match="'height' names no parameter") as info:

        @deferred_notify(rec="{froggy.id} {height}")
        def jump(froggy: Froggy) -> None:
            pass

    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "template",
    [
        "{froggy.__class__.__init__.__globals__}",
        "{froggy._secret}",
        "{d[_secret]}",
        {"subject": "Jump", "body": "{d[_secret]}"},
    ],
)
def test_underscore_attribute_or_key_fails_at_decoration(template: t.Any) -> None:
    with pytest.raises(ValueError, match="start with '_' are refused"):

        @deferred_notify(rec=template)
        def jump(froggy: Froggy, d: dict[str, str]) -> None:
            pass


def test_function_with_a_notify_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="'notify' is\\s+reserved"):

        @deferred_notify(rec="{froggy.id}")
        def jump(froggy: Froggy, notify: bool = True) -> None:
            pass


def test_function_with_a_result_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="'result' is\\s+reserved"):

        @deferred_notify(rec="{froggy.id}")
        def jump(froggy: Froggy, result: int = 0) -> None:
            pass


def test_decorator_without_templates_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one channel template"):
        deferred_notify()


def test_notify_as_a_channel_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'notify' cannot be a channel name"):
        deferred_notify(notify="{x}")


def test_async_function_is_refused() -> None:
    with pytest.raises(ValueError, match="coroutine function"):

        @deferred_notify(rec="{froggy.id}")
        async def jump(froggy: Froggy) -> None:
            pass


async def _coroutine_jump(froggy: Froggy) -> None:
    pass


async def _async_generator_jump(froggy: Froggy) -> t.AsyncIterator[int]:
    yield froggy.id


class _CoroutineJumper:
    async def __call__(self, froggy: Froggy) -> None:
        pass


class _AsyncGeneratorJumper:
    async def __call__(self, froggy: Froggy) -> t.AsyncIterator[int]:
        yield froggy.id


class _AsyncPond:
    async def jump(self, froggy: Froggy) -> None:
        pass

    async def jumps(self, froggy: Froggy) -> t.AsyncIterator[int]:
        yield froggy.id


def _marked_jump(froggy: Froggy) -> None:
    pass


if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
    inspect.markcoroutinefunction(_marked_jump)


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        pytest.param(
            _async_generator_jump,
            "_async_generator_jump",
            id="async-generator-function",
        ),
        pytest.param(
            _CoroutineJumper(), "_CoroutineJumper", id="instance-with-async-call"
        ),
        pytest.param(
            _AsyncGeneratorJumper(),
            "_AsyncGeneratorJumper",
            id="instance-with-async-generator-call",
        ),
        pytest.param(
            functools.partial(_coroutine_jump),
            "_coroutine_jump",
            id="partial-of-coroutine-function",
        ),
        pytest.param(
            functools.partial(functools.partial(_async_generator_jump)),
            "_async_generator_jump",
            id="partial-of-partial-of-async-generator-function",
        ),
        pytest.param(
            functools.partial(_CoroutineJumper()),
            "_CoroutineJumper",
            id="partial-of-instance-with-async-call",
        ),
        pytest.param(_AsyncPond().jump, "_AsyncPond.jump", id="bound-coroutine-method"),
        pytest.param(
            _AsyncPond().jumps, "_AsyncPond.jumps", id="bound-async-generator-method"
        ),
        pytest.param(
            staticmethod(_async_generator_jump),
            "_async_generator_jump",
            id="staticmethod-of-async-generator-function",
        ),
        pytest.param(
            _marked_jump,
            "_marked_jump",
            id="markcoroutinefunction",
            marks=pytest.mark.skipif(
                not hasattr(inspect, "markcoroutinefunction"),
                reason="inspect.markcoroutinefunction is new in Python 3.12",
            ),
        ),
    ],
)
def test_every_asynchronous_callable_is_refused_at_decoration(
    fn: t.Any, name: str
) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"cannot wrap {re.escape(f'{__name__}.{name}')}\(\), a coroutine"
        r" function or other asynchronous callable; wrap a plain function\.",
    ):
        deferred_notify(rec="{froggy.id}")(fn)


class _Awaitable:
    def __await__(self) -> t.Generator[None, None, None]:
        yield


class _AsyncIterator:
    def __aiter__(self) -> _AsyncIterator:
        return self

    async def __anext__(self) -> int:
        raise StopAsyncIteration


def _returns_coroutine(froggy: Froggy) -> t.Any:
    return _coroutine_jump(froggy)


def _returns_async_generator(froggy: Froggy) -> t.Any:
    return _async_generator_jump(froggy)


def _returns_awaitable(froggy: Froggy) -> t.Any:
    return _Awaitable()


def _returns_async_iterator(froggy: Froggy) -> t.Any:
    return _AsyncIterator()


_ASYNC_RESULTS = pytest.mark.parametrize(
    "fn",
    [
        pytest.param(_returns_coroutine, id="coroutine"),
        pytest.param(_returns_async_generator, id="async-generator"),
        pytest.param(_returns_awaitable, id="awaitable"),
        pytest.param(_returns_async_iterator, id="async-iterator"),
    ],
)


@_ASYNC_RESULTS
def test_call_returning_an_awaitable_or_async_iterator_queues_nothing(
    ctx: None, queued: list[Intent], rec: RecordingChannel, fn: t.Any
) -> None:
    jump = deferred_notify(rec="{froggy.id}", log="{froggy.id}")(fn)

    with capture() as dispatched:
        with pytest.raises(
            ConfigurationError, match=r"coroutine function.*\(it returned <"
        ) as info:
            jump(Froggy(3))
        result = finalise()

    assert fn.__name__ in str(info.value)
    assert queued == []
    assert dispatched == []
    assert result.dispatched == []
    assert rec.batches == []


@_ASYNC_RESULTS
def test_call_returning_an_awaitable_or_async_iterator_is_refused_with_notify_false(
    app: Flask, fn: t.Any
) -> None:
    jump = deferred_notify(rec="{froggy.id}")(fn)

    with pytest.raises(ConfigurationError, match="coroutine function"):
        jump(Froggy(3), notify=False)


def test_refused_coroutine_is_closed(ctx: None) -> None:
    returned: list[t.Any] = []

    @deferred_notify(rec="{froggy.id}")
    def jump(froggy: Froggy) -> t.Any:
        returned.append(_coroutine_jump(froggy))
        return returned[0]

    with pytest.raises(ConfigurationError, match="coroutine function"):
        jump(Froggy(3))

    assert inspect.getcoroutinestate(returned[0]) == inspect.CORO_CLOSED


# -- when rendering happens ---------------------------------------------------


def test_payload_shows_the_state_the_call_produced(
    ctx: None, rec: RecordingChannel
) -> None:
    @deferred_notify(rec="{froggy.id} jumped {froggy.jump_height}")
    def jump(froggy: Froggy, height: str) -> None:
        froggy.jump_height = height

    froggy = Froggy(3)
    jump(froggy, "50 metres")
    froggy.jump_height = "changed after the call"
    finalise()

    assert rec.sent == ["3 jumped 50 metres"]


def test_function_that_raises_queues_nothing(
    ctx: None, queued: list[Intent], rec: RecordingChannel
) -> None:
    @deferred_notify(rec="{height}")
    def jump(height: int) -> None:
        raise KeyError("no pond")

    with pytest.raises(KeyError, match="no pond"):
        jump(1)
    result = finalise()

    assert queued == []
    assert result.dispatched == []
    assert rec.batches == []


def test_return_value_passes_through(ctx: None) -> None:
    landed = object()

    @deferred_notify(rec="{height}")
    def jump(height: int) -> object:
        return landed

    assert jump(1) is landed


def test_wrapper_keeps_the_function_metadata() -> None:
    def jump(froggy: Froggy) -> None:
        """Make froggy jump."""

    wrapped = deferred_notify(rec="{froggy.id}")(jump)

    assert wrapped.__name__ == "jump"
    assert wrapped.__qualname__ == jump.__qualname__
    assert wrapped.__module__ == __name__
    assert wrapped.__doc__ == "Make froggy jump."
    assert wrapped.__wrapped__ is jump


def test_render_failure_in_one_channel_queues_none(
    ctx: None,
    queued: list[Intent],
    rec: RecordingChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    @deferred_notify(log="logged {froggy.id}", rec="{froggy.no_such_attribute}")
    def jump(froggy: Froggy) -> None:
        pass

    with pytest.raises(TemplateError, match="no_such_attribute"):
        jump(Froggy(3))
    result = finalise()

    assert queued == []
    assert result.dispatched == []
    assert rec.batches == []
    assert "logged 3" not in caplog.messages


def test_mail_header_failure_queues_no_other_channel(froggy_app: Flask) -> None:
    @deferred_notify(
        log="logged {froggy.id}", mail={"subject": "{froggy.name}", "body": "b"}
    )
    def jump(froggy: Froggy) -> None:
        pass

    with pytest.raises(ValueError, match="CR or LF"):
        jump(Froggy(3, name="Fred\nBcc: victim@example.com"))
    result = finalise()

    assert result.dispatched == []


# -- intent.source ------------------------------------------------------------


@deferred_notify(rec="{height}")
def module_jump(height: int) -> None:
    pass


class Pond:
    @deferred_notify(rec="{height}")
    def jump(self, height: int) -> None:
        pass


def test_source_is_module_and_qualname_of_a_function(
    ctx: None, queued: list[Intent]
) -> None:
    module_jump(1)

    assert [i.source for i in queued] == ["tests.test_decorators.module_jump"]


def test_source_is_module_and_qualname_of_a_method(
    ctx: None, queued: list[Intent]
) -> None:
    Pond().jump(1)

    assert [i.source for i in queued] == ["tests.test_decorators.Pond.jump"]


def test_a_partial_is_named_for_its_function(ctx: None, queued: list[Intent]) -> None:
    def jump(pond: str, height: int) -> None:
        pass

    partial_jump = deferred_notify(rec="{pond} {height}")(
        functools.partial(jump, pond="north")
    )
    partial_jump(height=3)

    assert [(i.source, i.payload) for i in queued] == [
        (f"{__name__}.{jump.__qualname__}", "north 3")
    ]


def test_a_callable_instance_is_named_for_its_class(
    ctx: None, queued: list[Intent]
) -> None:
    class Jumper:
        def __call__(self, height: int) -> None:
            pass

    deferred_notify(rec="{height}")(Jumper())(4)

    assert [(i.source, i.payload) for i in queued] == [
        (f"{__name__}.{Jumper.__qualname__}", "4")
    ]


def test_enqueue_source_is_enqueue(ctx: None) -> None:
    intent = enqueue("rec", "hello {who}", who="world")

    assert intent.source == "enqueue"


# -- enqueue() ----------------------------------------------------------------


def test_enqueue_queues_one_rendered_intent_until_commit(
    ctx: None, rec: RecordingChannel
) -> None:
    intent = enqueue("rec", "hello {who}", who="world")

    assert intent.channel == "rec"
    assert intent.payload == "hello world"
    assert rec.batches == []
    result = finalise()
    assert result.dispatched == [intent]
    assert rec.sent == ["hello world"]


def test_enqueue_unknown_channel_names_the_configured_channels(ctx: None) -> None:
    with pytest.raises(ChannelNotFound, match="'sms'; configured channels: log, rec"):
        enqueue("sms", "hello")


def test_enqueue_missing_context_field_raises_template_error(
    ctx: None, queued: list[Intent]
) -> None:
    with pytest.raises(TemplateError, match="who"):
        enqueue("rec", "hello {who}")
    assert queued == []


# -- signals ------------------------------------------------------------------


def test_intent_queued_is_sent_with_the_app_and_the_intent(
    app: Flask, ctx: None
) -> None:
    sent: list[tuple[t.Any, dict[str, t.Any]]] = []

    def receiver(sender: t.Any, **kwargs: t.Any) -> None:
        sent.append((sender, kwargs))

    @deferred_notify(rec="{height}")
    def jump(height: int) -> None:
        pass

    with signals.intent_queued.connected_to(receiver):
        jump(1)
        intent = enqueue("rec", "two")
    result = finalise()

    assert [sender for sender, _ in sent] == [app, app]
    assert all(sender is app for sender, _ in sent)
    assert [set(kwargs) for _, kwargs in sent] == [{"intent"}, {"intent"}]
    assert sent[1][1]["intent"] is intent
    assert [kwargs["intent"] for _, kwargs in sent] == result.dispatched


# -- templates that read the whole context ------------------------------------


@pytest.fixture
def context_channel(make_app: t.Callable[..., Flask]) -> t.Iterator[ContextChannel]:
    """A channel that takes any template and keeps the context it was given."""
    app = make_app(NOTIFYQUEUE_CHANNELS={"ctx": CONTEXT})
    with app.app_context():
        channel = app.extensions["notifyqueue"].channels["ctx"]
        yield channel


def test_a_template_name_gets_every_parameter_defaults_applied_and_the_result(
    context_channel: ContextChannel,
) -> None:
    @deferred_notify(ctx={"subject": "Hello", "template": "email/confirm"})
    def confirm(
        user: str, /, code: int, *extra: int, greeting: str = "Hi", **options: int
    ) -> str:
        return f"{user}:{code}"

    confirm("kermit", 7, 8, 9, colour=3)

    [intent] = [i for i in finalise().dispatched]
    assert intent.payload["template"]["template"] == "email/confirm"
    assert intent.payload["context"] == {
        "user": "kermit",
        "code": 7,
        "extra": (8, 9),
        "greeting": "Hi",
        "options": {"colour": 3},
        "result": "kermit:7",
    }


def test_a_custom_template_object_is_kept_and_gets_every_parameter(
    context_channel: ContextChannel,
) -> None:
    template = ["a custom channel's", "template"]

    @deferred_notify(ctx=template)
    def jump(froggy: str, height: int = 2) -> None:
        pass

    jump("kermit")

    [intent] = finalise().dispatched
    assert intent.payload["template"] is template
    assert intent.payload["context"] == {
        "froggy": "kermit",
        "height": 2,
        "result": None,
    }


def test_format_string_templates_get_only_the_fields_they_name(
    context_channel: ContextChannel,
) -> None:
    @deferred_notify(ctx={"subject": "Jump {froggy}", "body": "b"})
    def jump(froggy: str, height: int = 2) -> str:
        return "done"

    jump("kermit")

    [intent] = finalise().dispatched
    assert intent.payload["context"] == {"froggy": "kermit"}


def test_an_attachments_path_must_name_a_parameter_or_result() -> None:
    with pytest.raises(TemplateError, match="'files' names no parameter"):

        @deferred_notify(rec={"subject": "s", "body": "b", "attachments": "files"})
        def report(name: str) -> None:
            pass


# -- when= --------------------------------------------------------------------


def test_when_decides_from_each_return_value_whether_the_call_queues(
    ctx: None, queued: list[Intent]
) -> None:
    answers: list[t.Any] = []

    def succeeded(result: t.Any) -> bool:
        answers.append(result)
        return result is not None

    @deferred_notify(rec="saved {name}", when=succeeded)
    def save(name: str, ok: bool) -> str | None:
        return name if ok else None

    assert save("a", True) == "a"
    assert save("b", False) is None

    assert answers == ["a", None]
    assert payloads(queued) == ["saved a"]


def test_when_that_raises_propagates_and_queues_nothing(
    ctx: None, queued: list[Intent]
) -> None:
    def broken(result: t.Any) -> bool:
        raise KeyError("no status")

    @deferred_notify(rec="saved", when=broken)
    def save() -> None:
        pass

    with pytest.raises(KeyError, match="no status"):
        save()
    assert queued == []


@pytest.mark.parametrize("when", [True, "result.ok", 1])
def test_when_that_is_not_callable_is_refused_at_decoration(when: t.Any) -> None:
    with pytest.raises(ConfigurationError, match="when must be a callable"):
        deferred_notify(rec="saved", when=when)


# -- new rows' ids ------------------------------------------------------------


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_a_template_reading_result_renders_the_id_of_a_row_the_call_added(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="created {result.id}")
    def create(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    item = create("kermit")

    assert item.id is not None
    assert payloads(queued) == [f"created {item.id}"]


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_a_failing_flush_propagates_before_anything_is_queued(
    ctx: None, queued: list[Intent]
) -> None:
    db.session.add(Item(name="kermit"))
    db.session.commit()

    @deferred_notify(rec="created {result.id}")
    def create(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    with pytest.raises(sa.exc.IntegrityError):
        create("kermit")
    assert queued == []
    db.session.rollback()


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_a_call_whose_templates_do_not_read_result_never_flushes(
    ctx: None, queued: list[Intent]
) -> None:
    @deferred_notify(rec="creating {name}")
    def create(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    item = create("kermit")

    assert item in db.session.new
    assert item.id is None
    assert payloads(queued) == ["creating kermit"]


# -- disabled channels --------------------------------------------------------


@pytest.fixture
def mail_disabled(make_app: t.Callable[..., Flask]) -> t.Iterator[Flask]:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": "tests.helpers:RecordingChannel"},
            "mail": {"type": "mail", "enabled": False},
        }
    )
    with app.app_context():
        yield app


def test_a_disabled_channel_is_accepted_by_every_call_and_queued_nothing(
    mail_disabled: Flask,
) -> None:
    @deferred_notify(rec="saved {name}", mail={"subject": "Saved", "body": "{name}"})
    def save(name: str) -> str:
        return name

    assert save("a") == "a"
    assert save("b", notify=["mail"]) == "b"
    save("c", notify=["mail", "rec"])

    assert [(i.channel, i.payload) for i in finalise().dispatched] == [
        ("rec", "saved a"),
        ("rec", "saved c"),
    ]


def test_a_channel_neither_configured_nor_disabled_still_raises(
    mail_disabled: Flask,
) -> None:
    calls: list[str] = []

    @deferred_notify(mail={"subject": "Saved", "body": "b"}, sms="saved")
    def save(name: str) -> None:
        calls.append(name)

    with pytest.raises(ChannelNotFound, match="channel 'sms', which app"):
        save("a")
    assert calls == []


def test_enqueue_to_a_disabled_channel_queues_nothing_and_returns_none(
    mail_disabled: Flask,
) -> None:
    assert enqueue("mail", {"subject": "s", "body": "b"}) is None
    assert finalise().dispatched == []


# -- Raw ----------------------------------------------------------------------


def test_a_raw_payload_reaches_the_channels_render_untouched(
    ctx: None, rec: RecordingChannel
) -> None:
    raw = Raw("p {color: red} {user.id}")

    intent = enqueue("rec", raw)

    assert rec.templates == [raw]
    assert rec.templates[0] is raw
    assert intent.payload == "p {color: red} {user.id}"


# -- the usual call's fast path agrees with the general path -------------------
# A call without notify= inside an app context takes the wrapper's fast path
# (notifyqueue.queue.Bound: renderers and selection worked out once per app);
# notify=True takes the general path (queue_rendered, Channel.render per
# call). Whatever the two disagree on fails here.


def _queued_now() -> list[tuple[str, t.Any, str]]:
    """``(channel, payload, source)`` of the intents the session holds."""
    from notifyqueue.transaction import current_batch

    batch = current_batch(db.session())
    return [(i.channel, i.payload, i.source) for i in batch.intents] if batch else []


FAST_PATH_CHANNELS = {
    "one channel": {"rec": {"type": "tests.helpers:RecordingChannel"}},
    "one log channel": {"log": {"type": "log"}},
    "two channels": {
        "log": {"type": "log"},
        "rec": {"type": "tests.helpers:RecordingChannel"},
    },
    "a disabled channel": {
        "log": {"type": "log"},
        "rec": {"type": "tests.helpers:RecordingChannel", "enabled": False},
    },
    "a durable channel": {
        "log": {"type": "log", "durable": True},
        "rec": {"type": "tests.helpers:RecordingChannel"},
    },
}


@pytest.mark.parametrize("channels", list(FAST_PATH_CHANNELS))
@pytest.mark.parametrize("listening", [False, True], ids=["", "intent_queued"])
def test_the_usual_call_queues_what_notify_true_queues(
    make_app: t.Callable[..., Flask], channels: str, listening: bool
) -> None:
    configured = FAST_PATH_CHANNELS[channels]
    app = make_app(NOTIFYQUEUE_CHANNELS=configured)
    templates = {
        "log": "saved {item.name} ({item.name!r}) as {kind:>6}; line\nbreak",
        "rec": "{kind}: {item.name} {extra[k]}",
    }

    @deferred_notify(**{name: templates[name] for name in configured})
    def save(item: t.Any, kind: str = "plain", **extra: t.Any) -> None:
        pass

    values = ["a", "b\nforged line", "c\r", "{d}"]
    heard: list[Intent] = []
    listener = (
        signals.intent_queued.connected_to(
            lambda sender, intent: heard.append(intent), sender=app
        )
        if listening
        else contextlib.nullcontext()
    )
    with app.app_context(), listener:
        for value in values:
            item = Froggy(1, value)
            save(item, k=value)  # fast (the first call binds, the rest reuse)
            fast = _queued_now()
            db.session.rollback()
            save(item, k=value, notify=True)  # the general path
            general = _queued_now()
            db.session.rollback()
            assert fast == general
            assert fast  # something was queued, each time
    if listening:
        assert len(heard) == 2 * len(values) * len(fast)


def test_the_usual_call_and_notify_true_agree_on_ids_and_times(
    ctx: None,
) -> None:
    @deferred_notify(rec="saved {name}")
    def save(name: str) -> None:
        pass

    before = datetime.now(timezone.utc)
    save("warm")
    save("fast")
    save("general", notify=True)
    after = datetime.now(timezone.utc)
    from notifyqueue.transaction import current_batch

    intents = current_batch(db.session()).intents
    ids = [intent.id for intent in intents]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # One counter: the ids of both paths count up in call order.
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(before <= intent.created_at <= after for intent in intents)


def test_the_usual_call_flushes_before_rendering_result_like_notify_true(
    ctx: None,
) -> None:
    @deferred_notify(rec="added {result.id}")
    def add(name: str) -> Item:
        item = Item(name=name)
        db.session.add(item)
        return item

    add("a")
    add("b")
    add("c", notify=True)

    assert [payload for _, payload, _ in _queued_now()] == [
        "added 1",
        "added 2",
        "added 3",
    ]


def test_the_usual_call_in_nested_app_contexts_keeps_each_contexts_intents(
    tmp_path: t.Any,
) -> None:
    # A thread-local session outlives and spans app contexts: the fast path
    # must record which context queued what, as the general path does.
    from sqlalchemy.orm import scoped_session, sessionmaker

    from notifyqueue import NotifyQueue

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'nested.db'}")
    session = scoped_session(sessionmaker(bind=engine))
    app = Flask("nested")
    app.config["NOTIFYQUEUE_CHANNELS"] = {
        "rec": {"type": "tests.helpers:RecordingChannel"}
    }
    NotifyQueue(app, session=session)
    rec = app.extensions["notifyqueue"].channels["rec"]

    @deferred_notify(rec="{name}")
    def save(name: str) -> None:
        pass

    try:
        with app.app_context():
            assert app.extensions["notifyqueue"].context_sessions is None
            save("outer 1")
            save("outer 2")
            with app.app_context():
                save("inner 1")
                save("inner 2")
            save("outer 3")
            session.commit()
        assert rec.sent == ["outer 1", "outer 2", "outer 3"]
    finally:
        session.remove()
        engine.dispose()


@st.composite
def _signatures_and_calls(
    draw: st.DrawFn,
) -> tuple[str, tuple[t.Any, ...], dict[str, t.Any]]:
    """Source of a function of varied parameters, and arguments for one call."""
    parts: list[str] = []
    kinds = draw(
        st.lists(st.sampled_from(["po", "pk", "pk=", "kw", "kw="]), max_size=5)
    )
    kinds.sort(key=lambda kind: ["po", "pk", "pk=", "kw", "kw="].index(kind))
    names = [f"p{i}" for i in range(len(kinds))]
    has_default = False
    for name, kind in zip(names, kinds, strict=True):
        if kind == "po":
            parts.append(name)
        elif kind.startswith("pk"):
            if kind == "pk" and has_default:
                kind = "pk="
            has_default = has_default or kind == "pk="
            parts.append(name + ("=-1" if kind == "pk=" else ""))
    if "po" in kinds:
        parts.insert(kinds.count("po"), "/")
    varargs = draw(st.booleans())
    keyword_only = [
        name + ("=-2" if kind == "kw=" else "")
        for name, kind in zip(names, kinds, strict=True)
        if kind.startswith("kw")
    ]
    if varargs:
        parts.append("*args")
    elif keyword_only:
        parts.append("*")
    parts += keyword_only
    varkw = draw(st.booleans())
    if varkw:
        parts.append("**kwargs")
    source = f"def f({', '.join(parts)}):\n    return 0\n"
    positional = draw(st.integers(0, 6))
    args = tuple(range(100, 100 + positional))
    keywords = draw(
        st.lists(st.sampled_from([*names, "extra", "other"]), unique=True, max_size=4)
    )
    kwargs = {name: f"kw {name}" for name in keywords}
    return source, args, kwargs


@settings(max_examples=300, derandomize=True, deadline=None)
@given(_signatures_and_calls())
def test_the_generated_context_agrees_with_signature_bind(
    case: tuple[str, tuple[t.Any, ...], dict[str, t.Any]],
) -> None:
    from notifyqueue.decorators import _Plan

    source, args, kwargs = case
    namespace: dict[str, t.Any] = {}
    exec(source, namespace)
    fn = namespace["f"]
    signature = inspect.signature(fn)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        assume(False)
    bound.apply_defaults()
    varkw = next(
        (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD),
        None,
    )
    fields = set(signature.parameters)
    if varkw is not None:
        fields |= {"extra", "other"} & set(bound.arguments[varkw])
    plan = _Plan(fn, fields, every=False)
    expected: dict[str, t.Any] = {}
    for field in fields:
        if field in bound.arguments:
            expected[field] = bound.arguments[field]
        else:  # a keyword that landed in **kwargs
            expected[field] = bound.arguments[varkw][field]

    assert plan.context(args, kwargs, 0) == expected
    assert plan.render_with(lambda context: context)(args, dict(kwargs), 0) == expected
