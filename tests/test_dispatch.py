"""Rule 6 and strict mode: failures are isolated, reported, and never undo a commit."""

from __future__ import annotations

import logging
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask

from notifyqueue import (
    Channel,
    DeliveryError,
    Intent,
    NotifyQueueError,
    enqueue,
    finalise,
    signals,
)

from .helpers import Item, db

CHANNELS = {
    "bad": {"type": "tests.helpers:RecordingChannel", "crash": True},
    "rec": {"type": "tests.helpers:RecordingChannel", "fail_on": "poison"},
}


class Interrupting(Channel):
    def __init__(self, name: str, *, error: str) -> None:
        super().__init__(name)
        self.error = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[
            error
        ]

    def send(self, intents: t.Sequence[Intent]) -> None:
        raise self.error()


@pytest.fixture
def failures() -> t.Iterator[list[tuple[str, BaseException]]]:
    seen: list[tuple[str, BaseException]] = []

    def receiver(sender: Flask, *, intent: Intent, exception: BaseException) -> None:
        seen.append((intent.payload, exception))

    with signals.intent_failed.connected_to(receiver):
        yield seen


def channels(app: Flask) -> t.Any:
    return app.extensions["notifyqueue"].channels


def test_a_crashing_channel_does_not_stop_the_others(make_app, failures, caplog):
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("bad", "to bad")
        enqueue("rec", "to rec")
        with caplog.at_level(logging.ERROR, logger="notifyqueue"):
            result = finalise()
        assert db.session.scalar(sa.select(sa.func.count(Item.id))) == 1
    assert channels(app)["rec"].sent == ["to rec"]
    assert [intent.payload for intent in result.dispatched] == ["to rec"]
    assert [(intent.payload, str(exc)) for intent, exc in result.failed] == [
        ("to bad", "channel bad is down")
    ]
    assert result.committed and not result.ok
    assert [(payload, str(exc)) for payload, exc in failures] == [
        ("to bad", "channel bad is down")
    ]
    [record] = [r for r in caplog.records if r.name == "notifyqueue"]
    assert record.levelno == logging.ERROR
    assert "to channel 'bad'" in record.getMessage()
    assert record.exc_info is not None and "channel bad is down" in caplog.text
    assert "Traceback" in caplog.text


def test_a_failing_intent_does_not_stop_the_rest_of_its_batch(make_app, failures):
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS)
    with app.app_context():
        for payload in ("one", "poison", "three"):
            enqueue("rec", payload)
        result = finalise()
    assert channels(app)["rec"].sent == ["one", "three"]
    assert [intent.payload for intent in result.dispatched] == ["one", "three"]
    assert [intent.payload for intent, _ in result.failed] == ["poison"]
    assert [payload for payload, _ in failures] == ["poison"]


def test_a_raising_dispatch_receiver_stops_no_other(app, rec, ctx, caplog):
    def broken(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        raise RuntimeError("observer broke")

    with signals.dispatch.connected_to(broken, sender="rec"):
        enqueue("rec", "a")
        enqueue("log", "b")
        result = finalise()
    assert rec.sent == ["a"]  # the channel's own receiver still ran
    assert [(i.payload, str(e)) for i, e in result.failed] == [("a", "observer broke")]
    assert [intent.payload for intent in result.dispatched] == ["b"]


def test_a_dispatch_receiver_may_deliver_to_a_channel_of_its_own(app, rec, ctx):
    delivered: list[str] = []

    def extra(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        delivered.extend(intent.payload for intent in intents)

    with signals.dispatch.connected_to(extra, sender="rec"):
        enqueue("rec", "a")
        enqueue("log", "not for rec")
        finalise()
    assert delivered == ["a"]


def test_a_raising_signal_receiver_does_not_break_the_commit(app, rec, ctx, caplog):
    def broken(sender: Flask, **kwargs: t.Any) -> None:
        raise RuntimeError("receiver broke")

    with (
        signals.batch_committed.connected_to(broken),
        signals.intent_dispatched.connected_to(broken),
    ):
        db.session.add(Item(name="a"))
        enqueue("rec", "a")
        enqueue("rec", "b")
        result = finalise()
    assert result.ok
    assert rec.sent == ["a", "b"]
    logged = [r.getMessage() for r in caplog.records if r.name == "notifyqueue"]
    assert len(logged) == 3
    assert "'batch-committed' raised" in logged[0]
    db.session.add(Item(name="b"))  # the session is usable
    db.session.commit()


@pytest.mark.parametrize("error", ["KeyboardInterrupt", "SystemExit"])
def test_keyboard_interrupt_and_system_exit_propagate(make_app, error):
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "stop": {"type": "tests.test_dispatch:Interrupting", "error": error}
        }
    )
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("stop", "x")
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            db.session.commit()
        # The data was committed before dispatch began.
        assert db.session.scalar(sa.select(Item.name)) == "a"


def test_strict_mode_raises_after_dispatching_the_rest(make_app):
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS, NOTIFYQUEUE_STRICT=True)
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("rec", "poison")
        enqueue("bad", "to bad")
        enqueue("rec", "fine")
        with pytest.raises(DeliveryError, match="2 notification") as caught:
            finalise()
        assert isinstance(caught.value, NotifyQueueError)
        result = caught.value.result
        assert result is not None and result.committed
        assert sorted(i.payload for i, _ in result.failed) == ["poison", "to bad"]
        assert set(caught.value.failures) == {i.id for i, _ in result.failed}
        assert channels(app)["rec"].sent == ["fine"]
        # Committed, and the session goes on.
        assert db.session.scalar(sa.select(Item.name)) == "a"
        enqueue("rec", "next")
        assert finalise().ok


def test_strict_mode_raises_from_a_plain_commit(make_app):
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS, NOTIFYQUEUE_STRICT=True)
    with app.app_context():
        enqueue("bad", "x")
        with pytest.raises(DeliveryError):
            db.session.commit()


def test_strict_mode_is_quiet_when_everything_was_delivered(make_app):
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS, NOTIFYQUEUE_STRICT=True)
    with app.app_context():
        enqueue("rec", "fine")
        assert finalise().ok


# -- the shortcuts agree with the general way -----------------------------------
# With nothing but the channels' own receiver on ``dispatch``, a channel batch
# is sent to its channel directly; with one channel, the batch is one group.


def _outcome(result: t.Any) -> tuple[list[t.Any], list[tuple[t.Any, str]]]:
    return (
        [intent.payload for intent in result.dispatched],
        [(intent.payload, str(exc)) for intent, exc in result.failed],
    )


@pytest.mark.parametrize("listening", [False, True], ids=["alone", "observed"])
def test_a_channel_fails_the_same_whether_or_not_another_receiver_listens(
    make_app: t.Callable[..., Flask], listening: bool
) -> None:
    app = make_app(NOTIFYQUEUE_CHANNELS=CHANNELS)
    observed: list[str] = []

    def observer(sender: str, *, app: Flask, intents: list[Intent]) -> None:
        observed.append(sender)

    with app.app_context():
        if listening:
            signals.dispatch.connect(observer)
        try:
            for payload in ("one", "poison", "three"):
                enqueue("rec", payload)
            enqueue("bad", "to bad")
            result = finalise()
        finally:
            signals.dispatch.disconnect(observer)
    assert _outcome(result) == (
        ["one", "three"],
        [("to bad", "channel bad is down"), ("poison", "refused 'poison'")],
    )
    assert channels(app)["rec"].sent == ["one", "three"]
    assert observed == (["bad", "rec"] if listening else [])


def test_a_disconnected_channel_receiver_delivers_nothing(app, rec, ctx) -> None:
    from notifyqueue.dispatch import deliver_to_channel

    signals.dispatch.disconnect(deliver_to_channel)
    try:
        enqueue("rec", "nobody delivers this")
        result = finalise()
    finally:
        signals.dispatch.connect(deliver_to_channel, weak=False)
    assert rec.sent == []
    assert _outcome(result) == (["nobody delivers this"], [])  # no receiver failed
    enqueue("rec", "delivered again")
    finalise()
    assert rec.sent == ["delivered again"]


@pytest.mark.parametrize("order", ["channel", "call"])
def test_one_channel_dispatches_as_the_general_grouping_would(
    make_app: t.Callable[..., Flask], order: str
) -> None:
    payloads = ["a", "b", "c"]
    results = []
    for configured in (
        {"rec": {"type": "tests.helpers:RecordingChannel"}},
        {
            "rec": {"type": "tests.helpers:RecordingChannel"},
            "other": {"type": "tests.helpers:RecordingChannel"},
        },
    ):
        app = make_app(NOTIFYQUEUE_CHANNELS=configured, NOTIFYQUEUE_ORDER=order)
        with app.app_context():
            for payload in payloads:
                enqueue("rec", payload)
            results.append(_outcome(finalise()))
        assert [
            [intent.payload for intent in batch]
            for batch in channels(app)["rec"].batches
        ] == [payloads]
    assert results[0] == results[1] == (payloads, [])
