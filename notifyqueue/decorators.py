"""The :func:`deferred_notify` decorator."""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing as t

from .context import get_context
from .errors import (
    ArgumentTypeError,
    ChannelNotFound,
    ConfigurationError,
    TemplateError,
)
from .extension import register_decorated
from .intent import new_intent
from .queue import Bound, queue_bound, queue_rendered
from .signals import intent_queued
from .state import EXTENSION_KEY, State, get_state
from .templates import compile_templates, reads_every_field, template_fields
from .transaction import BATCH_KEY, add_intents

if t.TYPE_CHECKING:
    from flask import Flask

P = t.ParamSpec("P")
R = t.TypeVar("R")
R_co = t.TypeVar("R_co", covariant=True)

Notify = bool | t.Iterable[str] | None
"""What the ``notify=`` keyword of a decorated function takes."""


class DeferredFunction(t.Protocol[P, R_co]):
    """A function decorated with :func:`deferred_notify`, for type checkers.

    Called without ``notify``, its arguments are checked against the
    function's signature. A type checker cannot add a keyword to a signature
    it captured (PEP 612), so a call with ``notify=`` and a call of a bound
    method are checked for their return type only.
    """

    @t.overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...
    @t.overload
    def __call__(self, *args: t.Any, notify: Notify, **kwargs: t.Any) -> R_co: ...

    @t.overload
    def __get__(
        self, instance: None, owner: type[t.Any] | None = None
    ) -> DeferredFunction[P, R_co]: ...
    @t.overload
    def __get__(
        self, instance: object, owner: type[t.Any] | None = None
    ) -> t.Callable[..., R_co]: ...


_MISSING: t.Any = object()

# What a call of an asynchronous callable returns: its body has not run yet.
_ASYNC_RESULTS = (collections.abc.Awaitable, collections.abc.AsyncIterator)

# How a template field gets its value from a call (see _Plan).
_POSITIONAL, _POSITIONAL_ONLY, _KEYWORD = range(3)
_VAR_POSITIONAL, _VAR_KEYWORD, _EXTRA = range(3, 6)


class _Plan:
    """Where each field a template reads comes from, worked out at decoration.

    Building the context this way costs a few index and dict look-ups per
    call, where ``inspect.Signature.bind`` would cost microseconds.

    :param fields: the fields the templates name.
    :param every: a template reads the whole context (a Jinja template, a
        custom channel's template object): every parameter is in it, and
        ``result``.
    """

    def __init__(
        self, fn: t.Callable[..., t.Any], fields: t.AbstractSet[str], every: bool
    ) -> None:
        name = _qualified_name(fn)
        parameters = inspect.signature(fn).parameters
        if every:
            fields = {*fields, *parameters, "result"}
        for reserved in ("notify", "result"):
            if reserved in parameters:
                raise ConfigurationError(
                    f"@deferred_notify on {name}(): the parameter {reserved!r} is"
                    " reserved by notifyqueue; rename it."
                )
        # Names a keyword argument binds to; any other keyword lands in **kwargs
        # (a positional-only parameter's name included).
        named = {
            p.name
            for p in parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        positional = [
            p.name
            for p in parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        self.named = frozenset(named)
        self.steps: list[tuple[str, int, int, t.Any]] = []
        for field in sorted(fields - {"result"}):
            parameter = parameters.get(field)
            if parameter is None:
                if not takes_kwargs:
                    raise TemplateError(
                        f"@deferred_notify on {name}(): template field {field!r} names"
                        f" no parameter; the parameters are"
                        f" {', '.join(parameters) or '(none)'}, and 'result' is the"
                        " return value."
                    )
                self.steps.append((field, _EXTRA, 0, _MISSING))
                continue
            default = (
                _MISSING if parameter.default is parameter.empty else parameter.default
            )
            kind = parameter.kind
            if kind is parameter.VAR_POSITIONAL:
                how, index = _VAR_POSITIONAL, len(positional)
            elif kind is parameter.VAR_KEYWORD:
                how, index = _VAR_KEYWORD, 0
            elif kind is parameter.KEYWORD_ONLY:
                how, index = _KEYWORD, 0
            elif kind is parameter.POSITIONAL_ONLY:
                how, index = _POSITIONAL_ONLY, positional.index(field)
            else:
                how, index = _POSITIONAL, positional.index(field)
            self.steps.append((field, how, index, default))
        self.wants_result = "result" in fields
        self.name = name
        self.context, self.render_with = _generate(
            self.steps, self.wants_result, self.named, name
        )
        """``context(args, kwargs, result)``: the dict the templates are filled
        from. ``render_with(render)``: a function of ``(args, kwargs, result)``
        that builds that dict and returns ``render(context)``, in one frame."""


_Context = t.Callable[[tuple[t.Any, ...], dict[str, t.Any], t.Any], dict[str, t.Any]]


def _generate(
    steps: list[tuple[str, int, int, t.Any]],
    wants_result: bool,
    named: frozenset[str],
    name: str,
) -> tuple[_Context, t.Callable[[t.Callable[[t.Any], t.Any]], t.Callable[..., t.Any]]]:
    """Generate the functions that build a call's context: one dict display.

    A loop over ``steps`` that tested each step's kind per call cost twice
    as much, and a separate call to build the context before rendering cost
    a frame. Only ``repr()`` literals of field names and numbers reach the
    source; defaults are passed in its namespace.
    """
    namespace: dict[str, t.Any] = {"_named": named, "_missing": _missing_field(name)}
    entries = ["'result': result"] if wants_result else []
    for number, (field, how, index, default) in enumerate(steps):
        namespace[f"d{number}"] = default
        key = repr(field)
        if how is _POSITIONAL:
            value = f"args[{index}] if n > {index} else kwargs.get({key}, d{number})"
        elif how is _KEYWORD:
            value = f"kwargs.get({key}, d{number})"
        elif how is _POSITIONAL_ONLY:
            value = f"args[{index}] if n > {index} else d{number}"
        elif how is _VAR_POSITIONAL:
            value = f"args[{index}:]"
        elif how is _VAR_KEYWORD:
            value = "{k: v for k, v in kwargs.items() if k not in _named}"
        else:
            value = f"kwargs[{key}] if {key} in kwargs else _missing({key})"
        entries.append(f"{key}: {value}")
    display = "{" + ", ".join(entries) + "}"
    source = (
        "def context(args, kwargs, result, /):\n"
        "    n = len(args)\n"
        f"    return {display}\n"
        "def render_with(render, /):\n"
        "    def rendered(args, kwargs, result, /):\n"
        "        n = len(args)\n"
        f"        return render({display})\n"
        "    return rendered\n"
    )
    exec(compile(source, f"<notifyqueue context of {name}>", "exec"), namespace)
    return namespace["context"], namespace["render_with"]


def _missing_field(name: str) -> t.Callable[[str], t.NoReturn]:
    def missing(field: str) -> t.NoReturn:
        raise TemplateError(
            f"{name}() was not passed {field!r}, which a template"
            " names; pass it as a keyword argument."
        )

    return missing


def deferred_notify(
    *, when: t.Callable[[t.Any], object] | None = None, **templates: t.Any
) -> t.Callable[[t.Callable[P, R]], DeferredFunction[P, R]]:
    """Queue a notification per channel each time the decorated function returns.

    Each keyword names a channel; its value is that channel's template (a
    ``str.format`` string for ``log``; a dict with ``"subject"`` and
    ``"body"`` templates, and optionally ``"recipients"``, for ``mail``).
    Fields name the function's parameters (defaults applied) and ``result``,
    its return value. A template that is not made of ``str.format`` strings
    (a dict naming a Jinja ``"template"``, a custom channel's own object) is
    given every parameter and ``result``. The intents are rendered right
    after the function returns and dispatched when the transaction commits.
    If a template reads ``result`` and the session holds new objects, the
    session is flushed first, so their database-assigned ids render.

    The wrapper takes one extra keyword, ``notify``: omitted, ``True`` or
    ``None`` for every channel the decorator names, ``False`` for none, or a list of
    channel names. A channel the app configures with ``"enabled": False`` is
    accepted and queues nothing.

    :param when: called with the return value after each call; a false
        answer queues nothing for that call. What it raises propagates to the
        caller, and nothing is queued.
    :raises TemplateError: at decoration, for a malformed template or a field
        that names no parameter; or a template the channel of an initialised
        app refuses (:meth:`~notifyqueue.Channel.check_template`).
    :raises ConfigurationError: at decoration, for a ``when`` that is not
        callable, a function with its own ``notify`` or ``result`` parameter,
        or an asynchronous callable (a coroutine or async generator function,
        or a partial, method or instance whose call is one); at call time,
        before anything is queued, for a call that returns an awaitable or an
        async iterator.
    """
    if when is not None and not callable(when):
        raise ConfigurationError(
            f"@deferred_notify(when={when!r}): when must be a callable that takes"
            " the return value, for example when=lambda result: result is not None."
        )
    if not templates:
        raise ConfigurationError(
            "@deferred_notify needs at least one channel template, for example"
            " @deferred_notify(log='Saved {item.id}')."
        )
    if "notify" in templates:
        raise ConfigurationError(
            "@deferred_notify: 'notify' cannot be a channel name; it is the keyword"
            " that selects channels at call time."
        )
    compiled = {
        name: compile_templates(value, f"@deferred_notify {name}=")
        for name, value in templates.items()
    }
    fields = frozenset().union(*(template_fields(value) for value in compiled.values()))
    every_field = any(reads_every_field(value) for value in compiled.values())
    # Channels whose template may read the return value: a call that queues
    # to one flushes new objects first, so their database-assigned ids render.
    result_readers = frozenset(
        name
        for name, value in compiled.items()
        if reads_every_field(value) or "result" in template_fields(value)
    )
    every = tuple(compiled.items())
    every_flushes = bool(result_readers)

    def decorate(fn: t.Callable[P, R]) -> DeferredFunction[P, R]:
        if _is_async_callable(fn):
            raise ConfigurationError(_async_refusal(_qualified_name(fn)))
        plan = _Plan(fn, fields, every_field)
        source = plan.name

        def call(args: tuple[t.Any, ...], kwargs: dict[str, t.Any]) -> t.Any:
            """The general way: a call with ``notify=``, or outside an app
            context. The wrapper's fast path must agree with it."""
            notify = kwargs.pop("notify", True)
            if notify is True or notify is None:
                selected, flush = every, every_flushes
            else:
                selected = _select(compiled, notify, source)
                flush = any(name in result_readers for name, _ in selected)
            if not selected:
                result = fn(*args, **kwargs)
                if result is not None and _is_async_result(result):
                    _refuse_async_result(result, source)
                return result
            app, state = get_state()
            channels = state.channels
            for name, _ in selected:
                if name not in channels:
                    selected = _enabled(app, state, selected, source)
                    flush = any(name in result_readers for name, _ in selected)
                    break
            result = fn(*args, **kwargs)
            # Most functions return None; a cheap guard keeps this off their path.
            if result is not None and _is_async_result(result):
                _refuse_async_result(result, source)
            if not selected or (when is not None and not when(result)):
                return result
            if flush:
                session = state.session.registry()
                if session.new:
                    session.flush()
            queue_rendered(
                app, state, selected, plan.context(args, kwargs, result), source
            )
            return result

        def bind(app: Flask, state: State | None) -> tuple[State, Bound]:
            """Work out what the usual call queues in ``app``, and keep it there.

            :raises LifecycleError: NotifyQueue is not initialised on ``app``.
            :raises ChannelNotFound: ``app`` does not configure a channel this
                function names (nothing is kept: every call raises).
            """
            if state is None:
                _, state = get_state(app)
            selected, flush = every, every_flushes
            if any(name not in state.channels for name, _ in selected):
                selected = _enabled(app, state, selected, source)
                flush = any(name in result_readers for name, _ in selected)
            bound = state.bound[plan] = Bound(plan, state, selected, flush)
            return state, bound

        @functools.wraps(fn)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            # The usual call: no notify=, inside an app context. What does not
            # change between such calls in one app (the app's channels for
            # this function, their renderers, the flush) is worked out once,
            # by bind(), and kept in the app's state.
            context = get_context(None)
            if context is None or (kwargs and "notify" in kwargs):
                return call(args, kwargs)
            app = context.app
            state = app.extensions.get(EXTENSION_KEY)
            bound = None if state is None else state.bound.get(plan)
            if bound is None or state is None:
                state, bound = bind(app, state)
            result = fn(*args, **kwargs)
            if result is not None and _is_async_result(result):
                _refuse_async_result(result, source)
            if not bound.renderers or (when is not None and not when(result)):
                return result
            one = bound.one
            if one is None or intent_queued.receivers:
                queue_bound(bound, context, app, state, args, kwargs, result)
                return result
            # One channel and nothing to flush or check at queue time:
            # queue_bound()'s steps, inline, as one frame (0.3 µs a call).
            name, render = one
            payload = render(args, kwargs, result)
            sessions = state.context_sessions
            session = None if sessions is None else sessions.get(id(context))
            if session is None:
                session = state.session.registry()
            intent = new_intent(name, payload, source)
            batch = session.info.get(BATCH_KEY)
            # add_intents()'s fast path: see there why it is enough.
            if batch is not None and batch.app is app and not batch.waiting:
                owners = batch.owners
                if owners and owners[-1][0] is context:
                    batch.intents.append(intent)
                    return result
            add_intents(session, app, [intent], context)
            return result

        wrapper.__notifyqueue_templates__ = compiled  # type: ignore[attr-defined]
        register_decorated(wrapper, source, compiled)
        return t.cast(DeferredFunction[P, R], wrapper)

    return decorate


def _is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine or an async iterator unrun.

    Sees through ``functools.partial``, bound methods, ``staticmethod`` and a
    callable instance's ``__call__``; ``inspect.iscoroutinefunction`` also
    honours ``inspect.markcoroutinefunction`` (Python 3.12+). ``__wrapped__``
    is not followed: a synchronous wrapper may run what it wraps to the end.
    """
    target: t.Any = fn
    # A class whose __call__ is one of its own instances would loop forever.
    seen: set[int] = set()
    while id(target) not in seen:
        seen.add(id(target))
        if isinstance(target, functools.partial):
            target = target.func
        elif inspect.ismethod(target) or isinstance(target, staticmethod):
            target = target.__func__
        elif inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
            return True
        elif isinstance(target, type) or inspect.isroutine(target):
            return False
        elif callable(target):
            target = type(target).__call__
        else:
            return False
    return False


def _is_async_result(result: object) -> bool:
    """Whether ``result`` is an awaitable or an async iterator.

    Generator-based coroutines (``types.coroutine``) are awaitable without
    ``__await__``, so generators are asked ``inspect.isawaitable`` too.
    """
    return isinstance(result, _ASYNC_RESULTS) or (
        isinstance(result, types.GeneratorType) and inspect.isawaitable(result)
    )


def _async_refusal(name: str, returned: str = "") -> str:
    """The message refusing the asynchronous callable ``name``."""
    return (
        f"@deferred_notify cannot wrap {name}(), a coroutine function or other"
        f" asynchronous callable{returned}; wrap a plain function."
    )


def _refuse_async_result(result: object, source: str) -> t.NoReturn:
    """Refuse a call that returned ``result`` unrun, before anything is queued."""
    # The caller never sees this coroutine; closing it stops Python warning
    # that it was never awaited.
    if isinstance(result, (types.CoroutineType, types.GeneratorType)):
        result.close()
    raise ConfigurationError(_async_refusal(source, f" (it returned {result!r})"))


def _qualified_name(fn: t.Callable[..., t.Any]) -> str:
    """``module.qualname`` of ``fn``, or of what it wraps if it has none.

    A ``functools.partial`` is named for its function, a callable instance for
    its class.
    """
    target: t.Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{getattr(target, '__module__', None)}.{target.__qualname__}"


def _enabled(
    app: Flask,
    state: State,
    selected: tuple[tuple[str, t.Any], ...],
    source: str,
) -> tuple[tuple[str, t.Any], ...]:
    """Leave out the channels the app disables; refuse those it does not configure."""
    for name, _ in selected:
        if name not in state.channels and name not in state.disabled:
            raise ChannelNotFound(
                f"{source}() notifies channel {name!r}, which app"
                f" {app.name!r} does not configure; configured channels:"
                f" {', '.join(state.options)}. Add it to"
                " NOTIFYQUEUE_CHANNELS or leave it out with notify=[...]."
            )
    return tuple(item for item in selected if item[0] in state.channels)


def _select(
    compiled: dict[str, t.Any], notify: t.Any, source: str
) -> tuple[tuple[str, t.Any], ...]:
    """Resolve a ``notify=`` argument other than ``True`` to its templates."""
    if notify is False:
        return ()
    if isinstance(notify, (str, bytes)) or not isinstance(notify, t.Iterable):
        raise ArgumentTypeError(
            f"{source}(notify={notify!r}): notify must be True, False or a list of"
            f" channel names, for example notify=[{next(iter(compiled))!r}]."
        )
    names = list(notify)
    for name in names:
        if name not in compiled:
            raise ChannelNotFound(
                f"{source}(notify=[..., {name!r}]): this function declares no"
                f" template for {name!r}; it declares {', '.join(compiled)}."
            )
    # Templates keep the decorator's order whatever order notify lists them in.
    return tuple(item for item in compiled.items() if item[0] in names)
