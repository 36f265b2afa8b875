"""The Flask extension object and the per-app state it keeps in ``app.extensions``."""

from __future__ import annotations

import dataclasses
import inspect
import threading
import typing as t
import weakref

from flask import Flask, appcontext_tearing_down, current_app
from sqlalchemy.orm import scoped_session

from .channels import Channel, resolve_channel_class
from .errors import ArgumentTypeError, ConfigurationError, LifecycleError, TemplateError
from .intent import Intent
from .transaction import begin_teardown, end_teardown, watch

_EXTENSION_KEY = "notifyqueue"
_ORDERS = ("channel", "call")
# Names a channel cannot have: keywords of @deferred_notify and its wrapper.
_RESERVED = ("notify", "when")


def _defaults() -> dict[str, t.Any]:
    """Every config key notifyqueue reads, with its default.

    Fresh on each call, so no two apps share the mutable channels dict.
    """
    return {
        "NOTIFYQUEUE_CHANNELS": {"log": {"type": "log"}},
        "NOTIFYQUEUE_ORDER": "channel",
        "NOTIFYQUEUE_STRICT": False,
    }


@dataclasses.dataclass
class _Capture:
    """One active :func:`notifyqueue.testing.capture` block."""

    intents: list[Intent]
    dispatch: bool


@dataclasses.dataclass(frozen=True)
class _State:
    """What NotifyQueue keeps for one app, read from its config in ``init_app``."""

    session: scoped_session[t.Any]
    channels: dict[str, Channel]
    """Configured channels, in dispatch order."""
    options: dict[str, dict[str, t.Any]]
    """Each channel's options as configured (for the CLI)."""
    order: str
    strict: bool
    captures: list[_Capture] = dataclasses.field(default_factory=list)
    disabled: frozenset[str] = frozenset()
    """Channels configured with ``"enabled": False``: named, never queued to."""

    @classmethod
    def from_config(
        cls, app: Flask, session: scoped_session[t.Any], settings: dict[str, t.Any]
    ) -> _State:
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
        configured = settings["NOTIFYQUEUE_CHANNELS"]
        if not isinstance(configured, t.Mapping) or not configured:
            raise ConfigurationError(
                "NOTIFYQUEUE_CHANNELS must be a non-empty dict of channel name ->"
                " options, for example {'log': {'type': 'log'}};"
                f" got {configured!r}."
            )
        channels: dict[str, Channel] = {}
        options: dict[str, dict[str, t.Any]] = {}
        disabled = set()
        for name, channel_options in configured.items():
            if _enabled(name, channel_options):
                channels[name] = _build_channel(app, name, channel_options)
            else:
                disabled.add(name)
            options[name] = dict(channel_options)
        return cls(
            session, channels, options, order, strict, disabled=frozenset(disabled)
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
    kwargs = {
        key: value for key, value in options.items() if key not in ("type", "enabled")
    }
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
        if _EXTENSION_KEY in app.extensions:
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
        state = _State.from_config(app, session, settings)
        # Held until the app is registered, so a function decorated meanwhile
        # in another thread is checked either here or at its decoration.
        with _registry_lock:
            for source, templates in list(_decorated.values()):
                _check_templates(app, state, source, templates)
            watch(session)
            # Only now, so a failed init_app leaves app.config as it was.
            for key, value in settings.items():
                app.config.setdefault(key, value)
            app.extensions[_EXTENSION_KEY] = state
            app.teardown_appcontext(_teardown)
            appcontext_tearing_down.connect(_after_teardown, sender=app, weak=False)
            _initialised.add(app)

        from .cli import cli

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
            state = app.extensions.get(_EXTENSION_KEY)
            if state is not None:
                _check_templates(app, state, source, templates)
        _decorated[function] = (source, templates)


def _check_templates(
    app: Flask, state: _State, source: str, templates: dict[str, t.Any]
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
    registry = app.extensions[_EXTENSION_KEY].session.registry
    end_teardown(registry() if registry.has() else None)


def get_state(app: Flask | None = None) -> tuple[Flask, _State]:
    """Return the app (the current one by default) and its NotifyQueue state.

    :raises LifecycleError: outside an app context, or before ``init_app``.
    """
    if app is None:
        try:
            app = t.cast("Flask", current_app._get_current_object())  # type: ignore[attr-defined]
        except RuntimeError:
            raise LifecycleError(
                "notifyqueue needs an application context: call it inside a request,"
                " a CLI command, or `with app.app_context():`."
            ) from None
    try:
        return app, app.extensions[_EXTENSION_KEY]
    except KeyError:
        raise LifecycleError(
            f"NotifyQueue is not initialised on app {app.name!r}. Did you call"
            " init_app?"
        ) from None
