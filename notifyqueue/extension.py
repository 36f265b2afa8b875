"""The Flask extension object and the per-app state it keeps in ``app.extensions``."""

from __future__ import annotations

import inspect
import threading
import typing as t
import weakref

from flask import Flask, appcontext_tearing_down
from sqlalchemy.orm import scoped_session

from .channels import Channel, resolve_channel_class
from .cli import cli
from .context import current_context, sessions_by_context
from .delivery import MODES, DeliveryMode
from .errors import ArgumentTypeError, ConfigurationError, LifecycleError, TemplateError
from .outbox.policy import OPTIONS as RETRY_OPTIONS
from .outbox.policy import RetryPolicy
from .settings import seconds
from .state import EXTENSION_KEY, State, existing_session, state_of
from .transaction import begin_teardown, end_teardown, watch

_ORDERS = ("channel", "call")
# Names a channel cannot have: keywords of @deferred_notify and its wrapper.
_RESERVED = ("notify", "when")
# Channel options the extension consumes; never passed to a channel class.
_CONSUMED = ("type", "enabled", "delivery", "durable", "celery_queue", *RETRY_OPTIONS)


def _defaults() -> dict[str, t.Any]:
    """Every config key notifyqueue reads, with its default.

    Fresh on each call, so no two apps share the mutable channels dict.
    """
    defaults: dict[str, t.Any] = {
        "NOTIFYQUEUE_CHANNELS": {"log": {"type": "log"}},
        "NOTIFYQUEUE_ORDER": "channel",
        "NOTIFYQUEUE_STRICT": False,
        "NOTIFYQUEUE_DELIVERY": "inline",
        "NOTIFYQUEUE_DURABLE": False,
        "NOTIFYQUEUE_OUTBOX_LEASE": 60,
        "NOTIFYQUEUE_OUTBOX_RETAIN": 0,
    }
    for mode in MODES.values():
        defaults.update(mode.settings)
    return defaults


def _state_from_config(
    app: Flask, session: scoped_session[t.Any], settings: dict[str, t.Any]
) -> State:
    """Check ``settings`` (the defaults overlaid with the app's config)."""
    unknown = [
        key
        for key in app.config
        if key.startswith("NOTIFYQUEUE_") and key not in settings
    ]
    if unknown:
        raise ConfigurationError(
            f"Unknown config key(s) {', '.join(sorted(unknown))}; notifyqueue"
            f" reads {', '.join(settings)}. Check the spelling."
        )
    order = settings["NOTIFYQUEUE_ORDER"]
    if order not in _ORDERS:
        raise ConfigurationError(
            f"NOTIFYQUEUE_ORDER is {order!r}; use 'channel' or 'call'."
        )
    strict = settings["NOTIFYQUEUE_STRICT"]
    if not isinstance(strict, bool):
        raise ConfigurationError(
            f"NOTIFYQUEUE_STRICT is {strict!r}; use True or False."
        )
    default_mode = _mode_name(settings["NOTIFYQUEUE_DELIVERY"], "NOTIFYQUEUE_DELIVERY")
    default_durable = _flag(settings["NOTIFYQUEUE_DURABLE"], "NOTIFYQUEUE_DURABLE")
    lease = seconds(settings, "NOTIFYQUEUE_OUTBOX_LEASE", minimum_above=0)
    retain = seconds(settings, "NOTIFYQUEUE_OUTBOX_RETAIN", minimum_above=None)
    for mode in MODES.values():
        mode.check_settings(settings)
    configured = settings["NOTIFYQUEUE_CHANNELS"]
    if not isinstance(configured, t.Mapping) or not configured:
        raise ConfigurationError(
            "NOTIFYQUEUE_CHANNELS must be a non-empty dict of channel name ->"
            " options, for example {'log': {'type': 'log'}};"
            f" got {configured!r}."
        )
    channels: dict[str, Channel] = {}
    options: dict[str, dict[str, t.Any]] = {}
    delivery: dict[str, str] = {}
    durable: set[str] = set()
    retry: dict[str, RetryPolicy] = {}
    disabled = set()
    for name, channel_options in configured.items():
        if _enabled(name, channel_options):
            where = f"NOTIFYQUEUE_CHANNELS[{name!r}]"
            delivery[name] = _mode_name(
                channel_options.get("delivery", default_mode), f"{where}['delivery']"
            )
            if _flag(
                channel_options.get("durable", default_durable), f"{where}['durable']"
            ):
                durable.add(name)
            # Retries happen in the outbox, or in the Celery worker.
            if name in durable or delivery[name] == "celery":
                retry[name] = RetryPolicy.from_options(channel_options, where)
            _check_queue(channel_options, delivery[name], where)
            channels[name] = _build_channel(app, name, channel_options)
        else:
            disabled.add(name)
        options[name] = dict(channel_options)
    _check_promises(order, strict, delivery)
    # Modes that hand off first, so their work starts while inline runs.
    used = sorted(set(delivery.values()), key=lambda mode: mode == "inline")
    modes = {name: MODES[name](app, settings) for name in used}
    preparing = tuple(
        mode
        for mode in modes.values()
        if type(mode).before_commit is not DeliveryMode.before_commit
    )
    return State(
        session,
        channels,
        options,
        order,
        strict,
        delivery,
        modes,
        preparing=preparing,
        disabled=frozenset(disabled),
        durable=frozenset(durable),
        retry=retry,
        outbox_lease=lease,
        outbox_retain=retain,
        context_sessions=sessions_by_context(session),
    )


def _mode_name(value: t.Any, where: str) -> str:
    if not isinstance(value, str) or value not in MODES:
        raise ConfigurationError(
            f"{where} is {value!r}; the delivery modes are"
            f" {', '.join(repr(name) for name in MODES)}."
        )
    return value


def _check_queue(options: t.Mapping[str, t.Any], mode: str, where: str) -> None:
    if "celery_queue" not in options:
        return
    queue = options["celery_queue"]
    if mode != "celery":
        raise ConfigurationError(
            f"{where}['celery_queue'] is set, but the channel's delivery is"
            f" {mode!r}; it names a Celery queue, so use it with 'delivery':"
            " 'celery', or remove it."
        )
    if not isinstance(queue, str) or not queue.strip():
        raise ConfigurationError(
            f"{where}['celery_queue'] is {queue!r}; use the name of a Celery queue"
            " (a non-empty string), or leave it out for Celery's default queue."
        )


def _flag(value: t.Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where} is {value!r}; use True or False.")
    return value


def _check_promises(order: str, strict: bool, delivery: dict[str, str]) -> None:
    """Refuse settings whose promise the channels' delivery modes cannot keep."""
    if order == "call" and len(set(delivery.values())) > 1:
        modes = ", ".join(f"{name}={mode}" for name, mode in delivery.items())
        raise ConfigurationError(
            "NOTIFYQUEUE_ORDER='call' promises one order across channels, but the"
            f" channels are delivered by different modes ({modes}), each in its own"
            " time. Give every channel the same 'delivery', or use"
            " NOTIFYQUEUE_ORDER='channel'."
        )
    off_request = [name for name, mode in delivery.items() if mode != "inline"]
    if strict and off_request:
        raise ConfigurationError(
            "NOTIFYQUEUE_STRICT=True raises from the commit when a channel fails,"
            f" but channel(s) {', '.join(map(repr, off_request))} are delivered after"
            " the commit has returned. Use 'delivery': 'inline' for them, or turn"
            " NOTIFYQUEUE_STRICT off and watch the intent_failed signal."
        )


def _enabled(name: t.Any, options: t.Any) -> bool:
    """Check a channel's name and its ``enabled`` option; return the option.

    A disabled channel's other options are not checked, nor its type
    imported: a testing config may leave out what they need.
    """
    where = f"NOTIFYQUEUE_CHANNELS[{name!r}]"
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ConfigurationError(
            f"{where}: a channel name must be a Python identifier other than"
            " 'notify' and 'when' (they are keywords of @deferred_notify)."
        )
    if not isinstance(options, t.Mapping):
        raise ConfigurationError(
            f"{where} must be a dict with a 'type', for example {{'type': 'log'}};"
            f" got {options!r}."
        )
    enabled = options.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError(
            f"{where}['enabled'] is {enabled!r}; use True or False."
        )
    return enabled


def _build_channel(app: Flask, name: t.Any, options: t.Any) -> Channel:
    where = f"NOTIFYQUEUE_CHANNELS[{name!r}]"
    if "type" not in options:
        raise ConfigurationError(
            f"{where} must be a dict with a 'type', for example {{'type': 'log'}};"
            f" got {options!r}."
        )
    cls = resolve_channel_class(options["type"], f"{where}['type']")
    kwargs = {key: value for key, value in options.items() if key not in _CONSUMED}
    signature = inspect.signature(cls)
    try:
        signature.bind(name, **kwargs)
    except TypeError as exc:
        accepted = [p for p in list(signature.parameters)[1:] if p != "kwargs"]
        raise ConfigurationError(
            f"{where}: {exc}. Channel type {options['type']!r} takes the options"
            f" {', '.join(accepted) or '(none)'}."
        ) from exc
    try:
        channel = cls(name, **kwargs)
        channel.init_app(app)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    return channel


class NotifyQueue:
    """Hold notifications until the SQLAlchemy transaction that caused them commits.

    :param app: initialise on this app now; or call :meth:`init_app` later.
    :param session: the ``scoped_session`` whose transactions to follow;
        default Flask-SQLAlchemy's ``db.session`` of the app.
    """

    def __init__(
        self, app: Flask | None = None, *, session: scoped_session[t.Any] | None = None
    ) -> None:
        self._session = session
        if app is not None:
            self.init_app(app)

    def init_app(
        self, app: Flask, *, session: scoped_session[t.Any] | None = None
    ) -> None:
        """Read and check the config, build the channels, follow the session.

        Every template of every function decorated so far is checked by the
        channel it names (:meth:`~notifyqueue.Channel.check_template`), where
        this app configures and enables that channel; functions decorated
        later are checked when they are decorated. A channel configured with
        ``"enabled": False`` is not built, nor its type imported.

        Everything is checked before anything is registered, so a failure
        leaves the app as it was.

        :raises ConfigurationError: a config value or channel option is invalid.
        :raises TemplateError: a channel refuses a decorated function's
            template; the message names the function, the channel and the
            problem.
        :raises LifecycleError: already initialised, or no session to follow.
        """
        if EXTENSION_KEY in app.extensions:
            raise LifecycleError("NotifyQueue is already initialised on this app.")
        if session is None:
            session = self._session
        if session is None:
            session = _flask_sqlalchemy_session(app)
        if not isinstance(session, scoped_session):
            raise ArgumentTypeError(
                f"session must be a sqlalchemy.orm.scoped_session (Flask-SQLAlchemy's"
                f" db.session is one), got {type(session).__name__} {session!r}."
            )
        settings = _defaults()
        settings.update((key, app.config[key]) for key in settings if key in app.config)
        state = _state_from_config(app, session, settings)
        # Held until the app is registered, so a function decorated meanwhile
        # in another thread is checked either here or at its decoration.
        with _registry_lock:
            for source, templates in list(_decorated.values()):
                _check_templates(app, state, source, templates)
            watch(session)
            # Only now, so a failed init_app leaves app.config as it was.
            for key, value in settings.items():
                app.config.setdefault(key, value)
            app.extensions[EXTENSION_KEY] = state
            for mode in state.modes.values():
                mode.init_app(app)
            app.teardown_appcontext(_teardown)
            appcontext_tearing_down.connect(_after_teardown, sender=app, weak=False)
            _initialised.add(app)
        app.cli.add_command(cli)


# Decorated functions (wrapper -> its source and compiled templates) and the
# apps initialised so far, both weakly held: each is checked against the other
# when it appears. Reentrant: a channel's check_template may decorate.
_registry_lock = threading.RLock()
_decorated: weakref.WeakKeyDictionary[t.Callable[..., t.Any], tuple[str, t.Any]] = (
    weakref.WeakKeyDictionary()
)
_initialised: weakref.WeakSet[Flask] = weakref.WeakSet()


def register_decorated(
    function: t.Callable[..., t.Any], source: str, templates: dict[str, t.Any]
) -> None:
    """Check a decorated function's templates against every initialised app.

    Then remember them, so an app initialised later checks them too. Only
    channels an app configures and enables are checked: another app may not
    use the function at all.

    :param templates: channel name -> compiled template.
    :raises TemplateError: naming the function, the app and the channel.
    """
    with _registry_lock:
        for app in list(_initialised):
            state = app.extensions.get(EXTENSION_KEY)
            if state is not None:
                _check_templates(app, state, source, templates)
        _decorated[function] = (source, templates)


def _check_templates(
    app: Flask, state: State, source: str, templates: dict[str, t.Any]
) -> None:
    for name, template in templates.items():
        channel = state.channels.get(name)
        if channel is None:
            continue  # not configured here, or disabled
        try:
            channel.check_template(template)
        except ValueError as exc:
            raise TemplateError(
                f"@deferred_notify on {source}(): channel {name!r} of app"
                f" {app.name!r} (type {state.options[name]['type']!r}) refuses its"
                f" template: {exc}"
            ) from exc


def _flask_sqlalchemy_session(app: Flask) -> scoped_session[t.Any]:
    db = app.extensions.get("sqlalchemy")
    if db is None:
        raise LifecycleError(
            "NotifyQueue needs a session to follow: initialise Flask-SQLAlchemy on"
            " the app first (db.init_app(app) before notify.init_app(app)), or pass"
            " init_app(app, session=your_scoped_session)."
        )
    return t.cast("scoped_session[t.Any]", db.session)


def _teardown(exc: BaseException | None) -> None:
    """Mark the ending app context; what it leaves uncommitted goes at the end.

    Flask runs teardown functions newest first, so a function the app
    registered before ``init_app`` runs after this one: if it commits, that
    commit must still dispatch. Discarding waits for ``_after_teardown``.
    """
    begin_teardown()


def _after_teardown(app: Flask, **kwargs: t.Any) -> None:
    """Once every teardown function has run, drop what the context queued."""
    end_teardown(existing_session(state_of(app), current_context()))
