"""``flask notifyqueue``: list the channels, send a test, drain and run the outbox."""

from __future__ import annotations

import json
import signal
import threading
import time
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from . import signals
from .celery.guard import FINAL
from .errors import DeliveryError, OutboxError
from .intent import BatchResult, Intent
from .queue import enqueue, finalise
from .state import get_state
from .templates import Raw
from .testing import wait

if t.TYPE_CHECKING:
    from .channels import Channel
    from .delivery.celery import CeleryDelivery
    from .state import State

# How long send-test waits for a background or Celery channel's delivery.
_SEND_TEST_TIMEOUT = 60.0

cli = AppGroup("notifyqueue", help="Inspect and test notifyqueue channels.")


@cli.command("channels")
def list_channels() -> None:
    """List the configured channels, in dispatch order, with their delivery
    mode and options."""
    _, state = get_state()
    for name, options in state.options.items():
        if name in state.disabled:
            click.echo(f"{name}: type={options.get('type')} disabled")
            continue
        shown = {
            key: value
            for key, value in options.items()
            if key not in ("type", "enabled", "delivery", "durable")
        }
        shown.pop("celery_queue", None)
        durable = " durable=True" if name in state.durable else ""
        queue = ""
        if state.delivery[name] == "celery":
            mode = t.cast("CeleryDelivery", state.modes["celery"])
            queue = f" queue={mode.queue_of(state, name)}"
        click.echo(
            f"{name}: type={options['type']} delivery={state.delivery[name]}"
            f"{queue}{durable}"
            f" options={json.dumps(shown, sort_keys=True, default=repr)}"
        )
    click.echo(f"order={state.order} strict={state.strict}")


@cli.command("send-test")
@click.argument("channel")
@click.option(
    "--to",
    "address",
    metavar="ADDRESS",
    help="A mail channel: send the test to ADDRESS instead of its recipients.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=_SEND_TEST_TIMEOUT,
    show_default=True,
    help="Seconds to wait for a background or Celery channel's delivery.",
)
def send_test(channel: str, address: str | None, timeout: float) -> None:
    """Send a test notification through CHANNEL, committing an empty transaction.

    Exits 1 if delivery failed. A mail channel of an app with Flask-Mail's
    ``MAIL_SUPPRESS_SEND`` builds the message and sends nothing, and says so.
    """
    _, state = get_state()
    if channel in state.disabled:
        raise click.BadParameter(
            f"channel {channel!r} is disabled ('enabled': False in"
            " NOTIFYQUEUE_CHANNELS), so it sends nothing; enable it to test it.",
            param_hint="CHANNEL",
        )
    if channel not in state.channels:
        raise click.BadParameter(
            f"unknown channel {channel!r}; configured: {', '.join(state.channels)}.",
            param_hint="CHANNEL",
        )
    is_mail = _is_mail(state.channels[channel])
    if (
        is_mail
        and address is None
        and not getattr(state.channels[channel], "recipients", None)
    ):
        raise click.UsageError(
            f"channel {channel!r} has no 'recipients' option, so its test mail has"
            " nobody to go to; pass --to ADDRESS."
        )
    template = state.channels[channel].test_template
    if address is not None:
        if not is_mail:
            raise click.BadParameter(
                f"only a mail channel has recipients; {channel!r} is a"
                f" {state.options[channel]['type']!r} channel.",
                param_hint="'--to'",
            )
        # Raw: the address is final text, not a template (a brace stays a brace).
        template = Raw(
            {key: value.format(app=current_app.name) for key, value in template.items()}
            | {"recipients": [address]}
        )
    try:
        intent = enqueue(channel, template, app=current_app.name)
    except ValueError as exc:  # a malformed --to address, a channel without one
        if address is not None:
            raise click.BadParameter(str(exc), param_hint="'--to'") from exc
        raise click.ClickException(str(exc)) from exc
    if intent is None:  # pragma: no cover - only a disabled channel, refused above
        raise click.ClickException(f"channel {channel!r} queued nothing.")
    # Connected before the commit: a background channel may fail at once.
    late_failures: list[tuple[Intent, BaseException]] = []

    def record(sender: t.Any, intent: Intent, exception: BaseException) -> None:
        late_failures.append((intent, exception))

    with signals.intent_failed.connected_to(record):
        try:
            result = finalise(commit=True)
        except DeliveryError as exc:  # NOTIFYQUEUE_STRICT: report it like the others
            if exc.result is None:
                raise
            result = exc.result
        if result.pending:
            result = _outcome_of_pending(result, late_failures, timeout)
    for failed, error in result.failed:
        click.echo(f"FAILED {failed.id} via {channel}: {error!r}", err=True)
    if not result.ok:
        raise SystemExit(1)
    to = f" to {address}" if address is not None else ""
    if state.delivery[channel] == "celery":
        _worker_outcome(state, channel, intent, to, timeout)
        return
    if is_mail and current_app.extensions["mail"].suppress:
        click.echo(
            f"Suppressed {intent.id} via {channel} (MAIL_SUPPRESS_SEND):"
            f" nothing was sent{to}."
        )
    else:
        click.echo(f"Sent {intent.id} via {channel}{to}.")


def _worker_outcome(
    state: State, channel: str, intent: Intent, to: str, timeout: float
) -> None:
    """Wait for a Celery worker to deliver the published test notification.

    The worker's never-twice guard records each intent's final outcome: read
    there, so the test goes through the broker and a worker like any intent.
    """
    mode = t.cast("CeleryDelivery", state.modes["celery"])
    queue = mode.queue_of(state, channel)
    click.echo(f"Published {intent.id} via {channel} to Celery queue {queue!r}.")
    deadline = time.monotonic() + timeout
    outcome = None
    while outcome not in FINAL and time.monotonic() < deadline:
        time.sleep(0.1)
        outcome = mode.guard.outcome(intent.id)
    if outcome == "done":
        click.echo(f"Sent {intent.id} via {channel}{to}, by a Celery worker.")
        return
    if outcome is None or outcome not in FINAL:
        click.echo(
            f"FAILED {intent.id} via {channel}: no Celery worker delivered it within"
            f" {timeout:g} s. Is a worker consuming queue {queue!r}"
            " (celery -A <your module> worker -Q"
            f" {queue})?",
            err=True,
        )
    else:
        click.echo(
            f"FAILED {intent.id} via {channel}: the Celery worker recorded it as"
            f" {outcome}; its log says why.",
            err=True,
        )
    raise SystemExit(1)


def _outcome_of_pending(
    result: BatchResult, failures: list[tuple[Intent, BaseException]], timeout: float
) -> BatchResult:
    """Wait for a handed-off test notification; return what became of it.

    :param failures: every ``intent_failed`` sent since before the commit.
    """
    try:
        wait(timeout=timeout)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from exc
    pending = {intent.id for intent in result.pending}
    late = [(intent, exc) for intent, exc in failures if intent.id in pending]
    decided = {intent.id for intent, _ in late}
    return BatchResult(
        committed=True,
        dispatched=result.dispatched
        + [intent for intent in result.pending if intent.id not in decided],
        failed=result.failed + late,
    )


def _is_mail(channel: Channel) -> bool:
    """Whether ``channel`` is the mail channel (or a subclass of it)."""
    try:
        from .channels.mail import MailChannel
    except ImportError:  # no Flask-Mail (the mail extra): no mail channel
        return False
    return isinstance(channel, MailChannel)


# -- the outbox ---------------------------------------------------------------


class _GraceExpired(BaseException):
    """A stopping drainer's in-flight work outlived NOTIFYQUEUE_SHUTDOWN_TIMEOUT."""


@cli.command("drain")
@click.option("--once", is_flag=True, help="Deliver what is due, then exit.")
@click.option(
    "--channel",
    "channels",
    multiple=True,
    metavar="NAME",
    help="Only this channel (repeat for more); default every configured one.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Rows per claim.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds a claim holds its rows; default NOTIFYQUEUE_OUTBOX_LEASE.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds to wait when nothing is due.",
)
def drain_command(
    once: bool,
    channels: tuple[str, ...],
    batch: int,
    lease: float | None,
    poll: float,
) -> None:
    """Deliver durable notifications from the outbox: what a crash, a failure or
    an expired lease left. Runs until SIGTERM or SIGINT (or, with --once, until
    nothing is due).

    On SIGTERM it stops claiming, finishes the commit it is delivering (for up
    to NOTIFYQUEUE_SHUTDOWN_TIMEOUT seconds), hands the rest of its claim
    back, and exits 0; past that timeout, or on a second signal, it exits 1
    at once and what was in flight is retried once its lease expires.
    """
    from .outbox import drain
    from .outbox.drainer import delivering

    app, state = get_state()
    for name in channels:
        if name not in state.channels:
            raise click.BadParameter(
                f"unknown channel {name!r}; configured: {', '.join(state.channels)}.",
                param_hint="'--channel'",
            )
    _engine()  # the table must exist
    grace = float(app.config.get("NOTIFYQUEUE_SHUTDOWN_TIMEOUT", 10))
    stop = threading.Event()
    finished: list[bool] = []  # drain() returned: a late alarm has nothing to stop

    def on_stop(signum: int, frame: t.Any) -> None:
        if stop.is_set():
            if not finished:
                raise _GraceExpired(f"a second {signal.Signals(signum).name}")
            return
        stop.set()
        signal.setitimer(signal.ITIMER_REAL, max(grace, 0.001))

    def on_alarm(signum: int, frame: t.Any) -> None:
        # Only a delivery is cut short: between deliveries the stop is seen
        # anyway, and no new one starts.
        if not finished and delivering():
            raise _GraceExpired(f"NOTIFYQUEUE_SHUTDOWN_TIMEOUT ({grace:g} s) passed")

    handlers = {
        signal.SIGTERM: on_stop,
        signal.SIGINT: on_stop,
        signal.SIGALRM: on_alarm,
    }
    previous = {
        number: signal.signal(number, handler) for number, handler in handlers.items()
    }
    try:
        stats = drain(
            app,
            once=once,
            channels=list(channels) or None,
            batch=batch,
            lease=lease,
            poll=poll,
            stop=stop,
        )
        finished.append(True)
    except _GraceExpired as exc:
        click.echo(
            f"Stopped before the delivery in flight finished ({exc}); its rows"
            " stay leased and are retried when the lease expires.",
            err=True,
        )
        raise SystemExit(1) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in previous.items():
            signal.signal(number, handler)
    click.echo(
        f"Drained: {stats.claimed} claimed, {stats.delivered} delivered,"
        f" {stats.retrying} to retry, {stats.dead} dead, {stats.uncertain}"
        f" uncertain, {stats.reclaimed} taken over from expired leases,"
        f" {stats.released} handed back."
    )


@cli.group("outbox")
def outbox_group() -> None:
    """Create, inspect and repair the durable outbox table."""


def _engine(*, table: bool = True) -> t.Any:
    """The app's engine; with ``table``, refuse if the outbox table is missing."""
    from .outbox.store import engine_of, require_table

    _, state = get_state()
    engine = engine_of(state)
    if table:
        try:
            require_table(engine)
        except OutboxError as exc:
            raise click.ClickException(str(exc)) from exc
    return engine


@outbox_group.command("create")
def outbox_create() -> None:
    """Create the notifyqueue_outbox table (and its indexes) if it is missing."""
    from .outbox import TABLE_NAME, create

    engine = _engine(table=False)
    where = engine.url.render_as_string(hide_password=True)
    if create(engine):
        click.echo(f"Created {TABLE_NAME} in {where}.")
    else:
        click.echo(f"{TABLE_NAME} already exists in {where}.")


@outbox_group.command("sql")
def outbox_sql() -> None:
    """Print the outbox table's DDL for the app's database (for a migration)."""
    from .outbox import ddl

    click.echo(ddl(_engine(table=False)), nl=False)


@outbox_group.command("status")
def outbox_status() -> None:
    """Rows per channel and state, the oldest due row's age, expired leases."""
    from .outbox.settle import now
    from .outbox.store import status

    rows = status(_engine(), now())
    if not rows:
        click.echo("The outbox is empty.")
        return
    for row in rows:
        extra = ""
        if row.oldest_due_age is not None:
            extra = f" oldest_due={row.oldest_due_age.total_seconds():.0f}s"
        if row.expired_leases:
            extra += f" expired_leases={row.expired_leases}"
        click.echo(f"{row.channel} {row.state} {row.count}{extra}")


@outbox_group.command("retry")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--dead", is_flag=True, help="Every dead row.")
@click.option("--uncertain", is_flag=True, help="Every uncertain row.")
def outbox_retry(ids: tuple[str, ...], dead: bool, uncertain: bool) -> None:
    """Make rows due again now, their attempts counted from zero: the rows with
    these intent IDs (dead, uncertain or pending), and with --dead or
    --uncertain every row in that state. Exits 1 if an ID was refused."""
    from .outbox.settle import now
    from .outbox.store import make_due
    from .outbox.table import DEAD, UNCERTAIN

    states = [state for state, on in ((DEAD, dead), (UNCERTAIN, uncertain)) if on]
    if not ids and not states:
        raise click.UsageError("Name the rows to retry: IDs, --dead or --uncertain.")
    made, refused = make_due(_engine(), now(), ids=ids, states=states)
    click.echo(f"{len(made)} row(s) due again.")
    for intent_id, why in refused.items():
        click.echo(f"Not retried {intent_id}: {why}.", err=True)
    if refused:
        raise SystemExit(1)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> float:
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise click.BadParameter(
            f"{value!r} is not a duration; use seconds or a number with s, m, h or d"
            " (for example 7d).",
            param_hint="'--older-than'",
        )
    return seconds


@outbox_group.command("prune")
@click.option(
    "--older-than",
    "older_than",
    metavar="DURATION",
    default=None,
    help="Finished longer ago than this (30s, 15m, 12h, 7d); default"
    " NOTIFYQUEUE_OUTBOX_RETAIN.",
)
@click.option(
    "--dead",
    is_flag=True,
    help="Also dead and uncertain rows, not only done ones (needs --older-than).",
)
def outbox_prune(older_than: str | None, dead: bool) -> None:
    """Delete finished rows, in small transactions."""
    from datetime import timedelta

    from .outbox.settle import now
    from .outbox.store import prune
    from .outbox.table import DEAD, DONE, UNCERTAIN

    app, state = get_state()
    if dead and older_than is None:
        raise click.UsageError(
            "--dead deletes dead and uncertain rows, which say what never arrived:"
            " name their age with --older-than (for example --older-than 30d)."
        )
    seconds = state.outbox_retain if older_than is None else _duration(older_than)
    states = (DONE, DEAD, UNCERTAIN) if dead else (DONE,)
    count = prune(_engine(), now() - timedelta(seconds=seconds), states=states)
    click.echo(f"Pruned {count} row(s).")
