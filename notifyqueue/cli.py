"""``flask notifyqueue``: list the configured channels, send a test notification."""

from __future__ import annotations

import json

import click
from flask import current_app
from flask.cli import AppGroup

from .errors import DeliveryError
from .extension import get_state
from .queue import enqueue, finalise

cli = AppGroup("notifyqueue", help="Inspect and test notifyqueue channels.")


@cli.command("channels")
def list_channels() -> None:
    """List the configured channels, in dispatch order, with their options."""
    _, state = get_state()
    for name, options in state.options.items():
        shown = {key: value for key, value in options.items() if key != "type"}
        click.echo(
            f"{name}: type={options['type']}"
            f" options={json.dumps(shown, sort_keys=True, default=repr)}"
        )
    click.echo(f"order={state.order} strict={state.strict}")


@cli.command("send-test")
@click.argument("channel")
def send_test(channel: str) -> None:
    """Send a test notification through CHANNEL, committing an empty transaction."""
    _, state = get_state()
    if channel not in state.channels:
        raise click.BadParameter(
            f"unknown channel {channel!r}; configured: {', '.join(state.channels)}.",
            param_hint="CHANNEL",
        )
    template = state.channels[channel].test_template
    intent = enqueue(channel, template, app=current_app.name)
    try:
        result = finalise(commit=True)
    except DeliveryError as exc:  # NOTIFYQUEUE_STRICT: report it like the others
        if exc.result is None:
            raise
        result = exc.result
    for failed, error in result.failed:
        click.echo(f"FAILED {failed.id} via {channel}: {error!r}", err=True)
    if not result.ok:
        raise SystemExit(1)
    click.echo(f"Sent {intent.id} via {channel}.")
