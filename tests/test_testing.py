from __future__ import annotations

import logging
import typing as t

import pytest
import sqlalchemy.exc
from flask import Flask

from notifyqueue import Intent, LifecycleError, enqueue, finalise, signals
from notifyqueue.testing import capture

from .helpers import Item, RecordingChannel, db


def payloads(intents: t.Iterable[Intent]) -> list[t.Any]:
    return [intent.payload for intent in intents]


def test_capture_records_dispatched_intents_in_order(ctx: None) -> None:
    with capture() as captured:
        enqueue("rec", "one")
        enqueue("rec", "two")
        enqueue("rec", "three")
        result = finalise()

    assert payloads(captured) == ["one", "two", "three"]
    assert captured == result.dispatched


def test_capture_records_in_dispatch_order_across_channels(ctx: None) -> None:
    # NOTIFYQUEUE_ORDER "channel": log (configured first) before rec.
    with capture() as captured:
        first = enqueue("rec", "rec one")
        second = enqueue("log", "log one")
        third = enqueue("rec", "rec two")
        result = finalise()

    assert captured == [second, first, third]
    assert captured == result.dispatched


def test_capture_records_nothing_before_the_commit(ctx: None) -> None:
    with capture() as captured:
        enqueue("rec", "one")
        assert captured == []
        finalise()
        assert payloads(captured) == ["one"]


def test_capture_records_commits_through_the_session(ctx: None) -> None:
    with capture() as captured:
        enqueue("rec", "one")
        db.session.add(Item(name="a"))
        db.session.commit()

    assert payloads(captured) == ["one"]


def test_capture_records_nothing_after_the_block_exits(ctx: None) -> None:
    with capture() as captured:
        enqueue("rec", "queued inside, committed outside")
    finalise()
    enqueue("rec", "queued and committed outside")
    result = finalise()

    assert captured == []
    assert payloads(result.dispatched) == ["queued and committed outside"]


def test_capture_stops_recording_when_its_block_raises(ctx: None) -> None:
    with pytest.raises(KeyError), capture() as captured:
        raise KeyError("test failed")
    enqueue("rec", "later")
    finalise()

    assert captured == []


def test_capture_dispatches_to_the_channels_by_default(
    ctx: None, rec: RecordingChannel
) -> None:
    with capture():
        enqueue("rec", "one")
        finalise()

    assert rec.sent == ["one"]


def test_capture_without_dispatch_does_not_call_the_channels(
    ctx: None, rec: RecordingChannel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    called: list[t.Any] = []

    def receiver(sender: str, **kwargs: t.Any) -> None:
        called.append(sender)

    with (
        signals.dispatch.connected_to(receiver),
        capture(dispatch=False) as captured,
    ):
        enqueue("rec", "to rec")
        enqueue("log", "to log")
        finalise()

    assert payloads(captured) == ["to log", "to rec"]
    assert rec.batches == []
    assert "to log" not in caplog.messages
    assert called == []


def test_capture_without_dispatch_sends_no_intent_dispatched(ctx: None) -> None:
    sent: list[Intent] = []

    def receiver(sender: Flask, *, intent: Intent) -> None:
        sent.append(intent)

    with (
        signals.intent_dispatched.connected_to(receiver),
        capture(dispatch=False) as captured,
    ):
        enqueue("rec", "one")
        finalise()

    assert payloads(captured) == ["one"]
    assert sent == []


def test_capture_without_dispatch_lists_intents_as_dispatched(ctx: None) -> None:
    with capture(dispatch=False) as captured:
        first = enqueue("rec", "one")
        second = enqueue("rec", "two")
        result = finalise()

    assert result.ok
    assert result.dispatched == [first, second]
    assert result.failed == []
    assert captured == [first, second]


def test_capture_without_dispatch_ends_with_its_block(
    ctx: None, rec: RecordingChannel
) -> None:
    with capture(dispatch=False):
        pass
    enqueue("rec", "after")
    finalise()

    assert rec.sent == ["after"]


def test_capture_does_not_record_a_rolled_back_batch(ctx: None) -> None:
    with capture() as captured:
        enqueue("rec", "rolled back")
        db.session.add(Item(name="a"))
        finalise(commit=False)
        enqueue("rec", "committed")
        finalise()

    assert payloads(captured) == ["committed"]


def test_capture_does_not_record_a_batch_whose_commit_failed(ctx: None) -> None:
    db.session.add(Item(name="taken"))
    db.session.commit()

    with capture() as captured:
        enqueue("rec", "failed commit")
        db.session.add(Item(name="taken"))
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            finalise()
        enqueue("rec", "committed")
        finalise()

    assert payloads(captured) == ["committed"]


def test_capture_does_not_record_intents_of_a_rolled_back_savepoint(
    ctx: None,
) -> None:
    with capture() as captured:
        db.session.add(Item(name="outer"))
        enqueue("rec", "before")
        savepoint = db.session.begin_nested()
        db.session.add(Item(name="inner"))
        enqueue("rec", "inside savepoint")
        savepoint.rollback()
        enqueue("rec", "after")
        result = finalise()

    assert payloads(captured) == ["before", "after"]
    assert payloads(result.discarded) == ["inside savepoint"]


def test_capture_without_dispatch_skips_rolled_back_intents(ctx: None) -> None:
    with capture(dispatch=False) as captured:
        enqueue("rec", "rolled back")
        finalise(commit=False)
        db.session.add(Item(name="outer"))
        savepoint = db.session.begin_nested()
        enqueue("rec", "inside savepoint")
        savepoint.rollback()
        enqueue("rec", "committed")
        finalise()

    assert payloads(captured) == ["committed"]


def test_capture_does_not_record_failed_intents(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": "tests.helpers:RecordingChannel", "fail_on": "bad"}
        }
    )
    with app.app_context(), capture() as captured:
        good = enqueue("rec", "good")
        bad = enqueue("rec", "bad")
        result = finalise()

    assert [intent for intent, _ in result.failed] == [bad]
    assert captured == [good]


def test_capture_of_an_explicit_app_outside_its_context(
    make_app: t.Callable[..., Flask],
) -> None:
    watched = make_app()
    other = make_app()

    with other.app_context(), capture(watched) as captured:
        enqueue("rec", "other app")
        finalise()
        with watched.app_context():
            enqueue("rec", "watched app")
            finalise()

    assert payloads(captured) == ["watched app"]


def test_capture_of_an_explicit_app_needs_no_app_context(app: Flask) -> None:
    with capture(app) as captured:
        with app.app_context():
            enqueue("rec", "one")
            finalise()

    assert payloads(captured) == ["one"]


def test_capture_without_app_or_app_context_raises(app: Flask) -> None:
    with pytest.raises(LifecycleError, match="application context"):
        with capture():
            pass


def test_nested_captures_both_record(ctx: None) -> None:
    with capture() as outer:
        enqueue("rec", "outer only")
        finalise()
        with capture() as inner:
            enqueue("rec", "both")
            finalise()
        enqueue("rec", "outer again")
        finalise()

    assert payloads(outer) == ["outer only", "both", "outer again"]
    assert payloads(inner) == ["both"]


def test_nested_capture_without_dispatch_records_in_both(
    ctx: None, rec: RecordingChannel
) -> None:
    with capture() as outer, capture(dispatch=False) as inner:
        enqueue("rec", "one")
        finalise()

    assert payloads(outer) == ["one"]
    assert payloads(inner) == ["one"]
    assert rec.batches == []
