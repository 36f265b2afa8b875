"""``flask notifyqueue``: list the configured channels, send a test notification."""

from __future__ import annotations

import json
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from . import signals
from .errors import DeliveryError
from .intent import BatchResult, Intent
from .queue import enqueue, finalise
from .state import get_state
from .templates import Raw
from .testing import wait

if t.TYPE_CHECKING:
    from .channels import Channel

# How long send-test waits for a background channel's delivery.
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
            if key not in ("type", "enabled", "delivery")
        }
        click.echo(
            f"{name}: type={options['type']} delivery={state.delivery[name]}"
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
def send_test(channel: str, address: str | None) -> None:
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
            result = _outcome_of_pending(result, late_failures)
    for failed, error in result.failed:
        click.echo(f"FAILED {failed.id} via {channel}: {error!r}", err=True)
    if not result.ok:
        raise SystemExit(1)
    to = f" to {address}" if address is not None else ""
    if is_mail and current_app.extensions["mail"].suppress:
        click.echo(
            f"Suppressed {intent.id} via {channel} (MAIL_SUPPRESS_SEND):"
            f" nothing was sent{to}."
        )
    else:
        click.echo(f"Sent {intent.id} via {channel}{to}.")


def _outcome_of_pending(
    result: BatchResult, failures: list[tuple[Intent, BaseException]]
) -> BatchResult:
    """Wait for a handed-off test notification; return what became of it.

    :param failures: every ``intent_failed`` sent since before the commit.
    """
    try:
        wait(timeout=_SEND_TEST_TIMEOUT)
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
