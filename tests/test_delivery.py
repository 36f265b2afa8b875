"""The delivery layer: ``"delivery"`` options, the route, and background delivery."""

from __future__ import annotations

import logging
import threading
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import scoped_session, sessionmaker

from notifyqueue import (
    BackgroundStats,
    ConfigurationError,
    Intent,
    LifecycleError,
    NotifyQueue,
    background_stats,
    enqueue,
    finalise,
    signals,
)
from notifyqueue.delivery import MODES, DeliveryMode
from notifyqueue.testing import capture, shutdown, wait

from .conftest import SMTPServer
from .helpers import Item, RecordingChannel, db

GATED = "tests.helpers:GatedChannel"
REC = "tests.helpers:RecordingChannel"
QUERYING = "tests.test_delivery:QueryingChannel"


def _channel(app: Flask, name: str) -> t.Any:
    return app.extensions["notifyqueue"].channels[name]


def _background_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("notifyqueue-background-")
    ]


@pytest.fixture
def gated_app(make_app: t.Callable[..., Flask]) -> Flask:
    """An app whose channel ``gate`` is a background :class:`GatedChannel`."""
    return make_app(
        NOTIFYQUEUE_CHANNELS={"gate": {"type": GATED, "delivery": "background"}}
    )


# -- configuration ---------------------------------------------------------------


def test_delivery_option_is_consumed_by_the_extension_not_passed_to_the_channel(
    make_app: t.Callable[..., Flask],
) -> None:
    # RecordingChannel takes no 'delivery' parameter: passing it would fail.
    app = make_app(NOTIFYQUEUE_CHANNELS={"rec": {"type": REC, "delivery": "inline"}})
    assert isinstance(_channel(app, "rec"), RecordingChannel)
    assert app.extensions["notifyqueue"].delivery == {"rec": "inline"}


@pytest.mark.parametrize(
    "config",
    [
        {"NOTIFYQUEUE_CHANNELS": {"rec": {"type": REC, "delivery": "later"}}},
        {"NOTIFYQUEUE_DELIVERY": "later"},
        {"NOTIFYQUEUE_CHANNELS": {"rec": {"type": REC, "delivery": None}}},
    ],
)
def test_an_unknown_delivery_mode_is_a_startup_error_listing_the_known_ones(
    make_app: t.Callable[..., Flask], config: dict[str, t.Any]
) -> None:
    app = make_app(init=False, **config)
    with pytest.raises(ConfigurationError, match="'inline', 'background'") as info:
        NotifyQueue(app)
    assert "delivery" in str(info.value).lower()
    assert "notifyqueue" not in app.extensions


def test_notifyqueue_delivery_is_the_default_of_channels_without_their_own(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC},
            "log": {"type": "log", "delivery": "inline"},
        },
    )
    state = app.extensions["notifyqueue"]
    assert state.delivery == {"rec": "background", "log": "inline"}
    assert app.config["NOTIFYQUEUE_DELIVERY"] == "background"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NOTIFYQUEUE_BACKGROUND_THREADS", 0),
        ("NOTIFYQUEUE_BACKGROUND_THREADS", True),
        ("NOTIFYQUEUE_BACKGROUND_THREADS", "4"),
        ("NOTIFYQUEUE_BACKGROUND_QUEUE", 0),
        ("NOTIFYQUEUE_BACKGROUND_QUEUE", 2.5),
        ("NOTIFYQUEUE_SHUTDOWN_TIMEOUT", -1),
        ("NOTIFYQUEUE_SHUTDOWN_TIMEOUT", float("nan")),
        ("NOTIFYQUEUE_SHUTDOWN_TIMEOUT", float("inf")),
        ("NOTIFYQUEUE_SHUTDOWN_TIMEOUT", "10"),
    ],
)
def test_background_settings_are_checked_at_init_app_even_if_unused(
    make_app: t.Callable[..., Flask], key: str, value: t.Any
) -> None:
    app = make_app(init=False, **{key: value})
    with pytest.raises(ConfigurationError, match=key):
        NotifyQueue(app)


def test_background_settings_have_their_defaults_in_app_config(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app()
    assert app.config["NOTIFYQUEUE_BACKGROUND_THREADS"] == 4
    assert app.config["NOTIFYQUEUE_BACKGROUND_QUEUE"] == 1000
    assert app.config["NOTIFYQUEUE_SHUTDOWN_TIMEOUT"] == 10


def test_call_order_with_channels_of_different_modes_is_refused(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False,
        NOTIFYQUEUE_ORDER="call",
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log"},
            "rec": {"type": REC, "delivery": "background"},
        },
    )
    with pytest.raises(ConfigurationError, match="NOTIFYQUEUE_ORDER='call'.*rec="):
        NotifyQueue(app)


def test_call_order_with_every_channel_in_one_mode_is_accepted(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_ORDER="call",
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={
            "log": {"type": "log"},
            "rec": {"type": REC},
            "off": {"type": "mail", "enabled": False, "delivery": "inline"},
        },
    )
    assert set(app.extensions["notifyqueue"].modes) == {"background"}


def test_strict_with_a_background_channel_is_refused(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        init=False,
        NOTIFYQUEUE_STRICT=True,
        NOTIFYQUEUE_CHANNELS={"rec": {"type": REC, "delivery": "background"}},
    )
    with pytest.raises(ConfigurationError, match="NOTIFYQUEUE_STRICT.*'rec'"):
        NotifyQueue(app)


def test_a_disabled_channels_delivery_is_not_checked(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC},
            "off": {"type": REC, "enabled": False, "delivery": "someday"},
        },
    )
    assert app.extensions["notifyqueue"].delivery == {"rec": "inline"}


def test_no_thread_starts_at_init_app_or_before_the_first_hand_off(
    gated_app: Flask,
) -> None:
    assert _background_threads() == []
    with gated_app.app_context():
        enqueue("gate", "one")
        assert _background_threads() == []  # queued, not committed
        finalise()
        assert len(_background_threads()) == 4
        wait()


# -- the route ---------------------------------------------------------------------


def test_background_commit_returns_before_the_channel_runs(gated_app: Flask) -> None:
    gate = _channel(gated_app, "gate")
    with gated_app.app_context():
        intent = enqueue("gate", "hold me")
        result = finalise()
        try:
            assert result.ok and result.committed
            assert result.pending == [intent]
            assert result.dispatched == [] and result.failed == []
            assert gate.entered.wait(10)
            assert gate.sent == []  # still held: the commit did not wait
        finally:
            gate.gate.set()
        wait()
    assert gate.sent == ["hold me"]


def test_a_task_runs_in_an_app_context_of_the_real_app_never_the_request(
    gated_app: Flask,
) -> None:
    gate = _channel(gated_app, "gate")
    with gated_app.test_request_context("/"):
        enqueue("gate", "from a request")
        finalise()
        wait()
    (call,) = gate.calls
    assert call["app"] is gated_app
    assert call["request"] is False
    assert call["thread"].startswith("notifyqueue-background-")


def test_one_task_per_commit_delivers_channel_by_channel_one_send_each(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={"a": {"type": GATED}, "b": {"type": GATED}},
    )
    a, b = _channel(app, "a"), _channel(app, "b")
    order: list[str] = []
    with signals.dispatch.connected_to(lambda name, **kw: order.append(name)):
        with app.app_context():
            for n in range(3):
                enqueue("b", f"b{n}")
                enqueue("a", f"a{n}")
            finalise()
            wait()
    assert order == ["a", "b"]  # configured order, one batch each
    assert [len(batch) for batch in a.batches] == [3]
    assert a.sent == ["a0", "a1", "a2"] and b.sent == ["b0", "b1", "b2"]
    assert a.calls[0]["thread"] == b.calls[0]["thread"]  # one task


def test_a_rolled_back_transaction_hands_nothing_off(gated_app: Flask) -> None:
    with gated_app.app_context():
        enqueue("gate", "never")
        result = finalise(commit=False)
        assert result.pending == [] and not result.committed
        wait()
    assert _channel(gated_app, "gate").calls == []
    assert background_stats(gated_app).handed_off == 0


def test_inline_channels_are_done_when_the_commit_returns_background_ones_pending(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC},
            "gate": {"type": GATED, "delivery": "background"},
        }
    )
    gate = _channel(app, "gate")
    with app.app_context():
        inline = enqueue("rec", "now")
        later = enqueue("gate", "hold")
        result = finalise()
        try:
            assert result.dispatched == [inline]
            assert result.pending == [later]
            assert _channel(app, "rec").sent == ["now"]
        finally:
            gate.gate.set()
        wait()
    assert gate.sent == ["hold"]


def test_a_full_queue_delivers_that_commit_inline_with_a_warning(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        NOTIFYQUEUE_BACKGROUND_THREADS=1,
        NOTIFYQUEUE_BACKGROUND_QUEUE=1,
        NOTIFYQUEUE_CHANNELS={"gate": {"type": GATED, "delivery": "background"}},
    )
    gate = _channel(app, "gate")
    with app.app_context():
        enqueue("gate", "hold")
        finalise()
        try:
            assert gate.entered.wait(10)  # the one thread is busy
            enqueue("gate", "queued")
            assert finalise().pending  # the one place in the queue
            enqueue("gate", "overflow")
            with caplog.at_level(logging.WARNING, logger="notifyqueue"):
                result = finalise()
            assert [intent.payload for intent in result.dispatched] == ["overflow"]
            assert result.pending == []
            assert gate.calls[-1]["thread"] == threading.current_thread().name
        finally:
            gate.gate.set()
        wait()
    assert gate.sent == ["overflow", "hold", "queued"]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "queue is full" in warning.getMessage()
    assert "NOTIFYQUEUE_BACKGROUND_QUEUE" in warning.getMessage()
    assert "inline" in warning.getMessage()
    stats = background_stats(app)
    assert (stats.inline_fallbacks, stats.handed_off, stats.delivered) == (1, 2, 2)


def test_a_failure_in_the_pool_is_logged_signalled_counted_and_stops_nothing_else(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={
            "bad": {"type": REC, "fail_on": "boom"},
            "good": {"type": REC},
        },
    )
    failed: list[tuple[Intent, BaseException]] = []

    def on_failed(sender: Flask, intent: Intent, exception: BaseException) -> None:
        failed.append((intent, exception))

    with signals.intent_failed.connected_to(on_failed, sender=app):
        with app.app_context():
            boom = enqueue("bad", "boom")
            enqueue("bad", "fine")
            enqueue("good", "also fine")
            finalise()
            enqueue("good", "next commit")
            finalise()
            wait()
    assert [(intent.id, type(exc)) for intent, exc in failed] == [(boom.id, ValueError)]
    assert _channel(app, "bad").sent == ["fine"]
    assert _channel(app, "good").sent == ["also fine", "next commit"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and boom.id in errors[0].getMessage()
    assert background_stats(app) == BackgroundStats(handed_off=4, delivered=3, failed=1)


def test_an_error_outside_the_channels_is_logged_and_the_pool_goes_on(
    gated_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    raised: list[bool] = []

    @gated_app.teardown_appcontext
    def explode(exc: BaseException | None) -> None:
        if threading.current_thread().name.startswith("notifyqueue-background-"):
            raised.append(True)
            raise RuntimeError("teardown exploded")

    with gated_app.app_context():
        enqueue("gate", "first")
        finalise()
        wait()
        enqueue("gate", "second")
        finalise()
        wait()
    assert _channel(gated_app, "gate").sent == ["first", "second"]
    assert raised == [True, True]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all("outside the channels" in r.getMessage() for r in errors)
    assert all(isinstance(r.exc_info[1], RuntimeError) for r in errors if r.exc_info)
    assert background_stats(gated_app).delivered == 2


class QueryingChannel(RecordingChannel):
    """Reads the database in its task, then queues and (unless told) commits."""

    commit = True

    def send(self, intents: t.Sequence[Intent]) -> None:
        super().send(intents)
        names = db.session.scalars(sa.select(Item.name).order_by(Item.name)).all()
        db.session.add(Item(name=f"seen {len(names)}"))
        enqueue("rec", "follow-up of {names}", names=",".join(names))
        if self.commit:
            db.session.commit()


def test_a_task_may_query_and_commit_and_what_it_queues_follows_the_same_rules(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "query": {
                "type": "tests.test_delivery:QueryingChannel",
                "delivery": "background",
            },
            "rec": {"type": REC},
        }
    )
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("query", "go")
        finalise()
        wait()
        names = db.session.scalars(sa.select(Item.name).order_by(Item.name)).all()
    assert names == ["a", "seen 1"]
    # Queued and committed inside the task: dispatched to the inline channel.
    assert _channel(app, "rec").sent == ["follow-up of a"]


class SlowChannel(RecordingChannel):
    """Takes a fifth of a second per batch."""

    def send(self, intents: t.Sequence[Intent]) -> None:
        time.sleep(0.2)
        super().send(intents)


def test_wait_also_covers_what_a_task_hands_off_in_turn(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_DELIVERY="background",
        NOTIFYQUEUE_CHANNELS={
            "query": {"type": QUERYING},
            "rec": {"type": "tests.test_delivery:SlowChannel"},
        },
    )
    with app.app_context():
        db.session.add(Item(name="a"))
        enqueue("query", "go")
        finalise()
        wait()
    # The follow-up was handed off from the pool thread, after wait() began.
    assert _channel(app, "rec").sent == ["follow-up of a"]


def test_what_a_task_queues_without_committing_is_discarded_at_its_teardown(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "query": {
                "type": "tests.test_delivery:QueryingChannel",
                "delivery": "background",
            },
            "rec": {"type": REC},
        }
    )
    _channel(app, "query").commit = False
    discarded: list[tuple[list[t.Any], str]] = []

    def on_discard(sender: Flask, intents: list[Intent], reason: str) -> None:
        discarded.append(([i.payload for i in intents], reason))

    with signals.batch_discarded.connected_to(on_discard, sender=app):
        with app.app_context():
            enqueue("query", "go")
            finalise()
            wait()
            assert db.session.scalars(sa.select(Item.name)).all() == []
    assert _channel(app, "rec").sent == []
    assert discarded == [(["follow-up of "], "teardown")]
    assert "forget to commit" in caplog.text


def test_a_flask_sqlalchemy_session_used_in_a_task_is_removed_when_it_ends(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "query": {
                "type": "tests.test_delivery:QueryingChannel",
                "delivery": "background",
            },
            "rec": {"type": REC},
        }
    )
    used: list[t.Any] = []

    def remember(sender: str, **kwargs: t.Any) -> None:
        used.append(db.session())

    with signals.dispatch.connected_to(remember, sender="query"):
        with app.app_context():
            enqueue("query", "go")
            finalise()
            wait()
            assert db.engine.pool.checkedout() == 0
            (session,) = used
            assert session not in db.session.registry.registry.values()
    assert not session.in_transaction()


def test_a_thread_local_scoped_session_used_in_a_task_is_removed_when_it_ends(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app(init=False, NOTIFYQUEUE_CHANNELS={"rec": {"type": REC}})
    with app.app_context():
        engine = db.engine
    session = scoped_session(sessionmaker(engine))
    app.config["NOTIFYQUEUE_CHANNELS"] = {
        "rec": {"type": REC, "delivery": "background"}
    }
    NotifyQueue(app, session=session)
    seen: list[t.Any] = []

    def use_session(sender: str, **kwargs: t.Any) -> None:
        seen.append(session())
        session.execute(sa.text("SELECT 1"))

    try:
        with signals.dispatch.connected_to(use_session, sender="rec"):
            with app.app_context():
                enqueue("rec", "go")
                finalise()
                wait()
        assert len(seen) == 1 and seen[0] is not session()  # another thread's
        assert engine.pool.checkedout() == 0
        assert not seen[0].in_transaction()
    finally:
        session.remove()


# -- wait(), capture(), shutdown() ----------------------------------------------------


def test_wait_raises_timeout_error_naming_what_is_still_pending(
    gated_app: Flask,
) -> None:
    gate = _channel(gated_app, "gate")
    with gated_app.app_context():
        held = enqueue("gate", "hold")
        finalise()
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=held.id):
                wait(timeout=0.3)
            assert time.monotonic() - start < 5
        finally:
            gate.gate.set()
        wait()


def test_wait_returns_at_once_when_nothing_was_handed_off(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app()
    with app.app_context():
        wait(timeout=0)
    wait(app, timeout=0)


def test_wait_inside_a_background_task_is_refused(gated_app: Flask) -> None:
    errors: list[BaseException] = []

    def waiting(sender: str, **kwargs: t.Any) -> None:
        try:
            wait(timeout=5)
        except LifecycleError as exc:
            errors.append(exc)

    with signals.dispatch.connected_to(waiting, sender="gate"):
        with gated_app.app_context():
            enqueue("gate", "x")
            finalise()
            wait()
    assert len(errors) == 1 and "wait for itself" in str(errors[0])


def test_capture_records_a_background_intent_when_it_is_dispatched(
    gated_app: Flask,
) -> None:
    gate = _channel(gated_app, "gate")
    with gated_app.app_context(), capture() as captured:
        intent = enqueue("gate", "hold")
        finalise()
        try:
            assert gate.entered.wait(10)
            assert captured == []
        finally:
            gate.gate.set()
        wait()
        assert captured == [intent]


def test_capture_without_dispatch_records_at_commit_and_hands_nothing_off(
    gated_app: Flask,
) -> None:
    with gated_app.app_context(), capture(dispatch=False) as captured:
        intent = enqueue("gate", "x")
        result = finalise()
        assert captured == [intent]
        assert result.dispatched == [intent] and result.pending == []
    assert _channel(gated_app, "gate").calls == []
    assert _background_threads() == []


def test_shutdown_finishes_the_queue_stops_the_threads_and_a_hand_off_restarts(
    gated_app: Flask,
) -> None:
    with gated_app.app_context():
        for n in range(10):
            enqueue("gate", f"n{n}")
            finalise()
        assert shutdown(timeout=10) == []
        assert _background_threads() == []
        assert sorted(_channel(gated_app, "gate").sent) == sorted(
            f"n{n}" for n in range(10)
        )
        enqueue("gate", "again")
        assert finalise().pending
        wait()
    assert _channel(gated_app, "gate").sent[-1] == "again"


def test_shutdown_past_its_timeout_logs_the_ids_left_at_error(
    make_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        NOTIFYQUEUE_BACKGROUND_THREADS=1,
        NOTIFYQUEUE_CHANNELS={"gate": {"type": GATED, "delivery": "background"}},
    )
    gate = _channel(app, "gate")
    with app.app_context():
        running = enqueue("gate", "hold")
        finalise()
        assert gate.entered.wait(10)
        queued = enqueue("gate", "never")
        finalise()
        try:
            left = shutdown(timeout=0.2)
        finally:
            gate.gate.set()
    assert left == [queued, running]
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert f"Never started: {queued.id}" in message
    assert f"outcome unknown: {running.id}" in message
    assert background_stats(app).abandoned == 2
    # The held task ends on its own and is not counted twice.
    deadline = time.monotonic() + 10
    while _background_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _background_threads() == []
    assert gate.sent == ["hold"]
    assert background_stats(app).delivered == 0


# -- a mode's hook inside the transaction --------------------------------------------


class WritingMode(DeliveryMode):
    """Writes a row per intent in the committing transaction; delivers inline."""

    name = "writing"

    def before_commit(
        self, app: Flask, state: t.Any, session: t.Any, intents: list[Intent]
    ) -> None:
        session.add_all(Item(name=f"row {intent.payload}") for intent in intents)

    def deliver(
        self, app: Flask, state: t.Any, intents: list[Intent], result: t.Any
    ) -> None:
        from notifyqueue.dispatch import dispatch_batch

        dispatch_batch(app, state, intents, result)


def test_a_modes_before_commit_writes_in_the_same_commit_as_the_data(
    make_app: t.Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODES, "writing", WritingMode)
    app = make_app(
        NOTIFYQUEUE_CHANNELS={
            "rec": {"type": REC, "delivery": "writing"},
            "log": {"type": "log"},
        }
    )
    with app.app_context():
        db.session.add(Item(name="data"))
        enqueue("rec", "one")
        enqueue("log", "not this mode's")
        finalise()
        db.session.add(Item(name="rolled back"))
        enqueue("rec", "two")
        finalise(commit=False)
        names = db.session.scalars(sa.select(Item.name).order_by(Item.name)).all()
    assert names == ["data", "row one"]
    assert _channel(app, "rec").sent == ["one"]


# -- real mail ---------------------------------------------------------------------


def _mail_app(
    make_app: t.Callable[..., Flask], server: SMTPServer, delivery: str
) -> Flask:
    return make_app(
        **server.config(),
        NOTIFYQUEUE_CHANNELS={
            "mail": {
                "type": "mail",
                "recipients": ["ops@example.com"],
                "delivery": delivery,
            }
        },
    )


def _commit_mails(app: Flask, names: list[str]) -> list[Intent]:
    intents = []
    with app.app_context():
        db.session.add(Item(name=names[0]))
        for name in names:
            intent = enqueue("mail", {"subject": "{n}", "body": "about {n}"}, n=name)
            assert intent is not None
            intents.append(intent)
        finalise()
    return intents


def test_the_commit_does_not_wait_for_a_stalling_smtp_server(
    make_app: t.Callable[..., Flask], make_smtp_server: t.Callable[..., SMTPServer]
) -> None:
    server = make_smtp_server()
    server.data_delay = 1.0
    timings = {}
    sent: dict[str, list[Intent]] = {}
    for delivery in ("inline", "background"):
        app = _mail_app(make_app, server, delivery)
        start = time.monotonic()
        sent[delivery] = _commit_mails(app, [f"{delivery}-1", f"{delivery}-2"])
        timings[delivery] = time.monotonic() - start
        wait(app, timeout=20)
    assert timings["inline"] >= 2.0  # two stalled DATA answers
    assert timings["background"] < timings["inline"] / 4
    expected = [i.id for i in sent["inline"]] + [i.id for i in sent["background"]]
    assert server.intent_ids() == expected


def test_background_mail_arrives_once_in_order_per_commit_one_connection_each(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server, "background")
    committed: list[list[str]] = []
    for n in range(12):
        names = [f"c{n}-{k}" for k in range(3)]
        if n % 4 == 3:
            with app.app_context():
                for name in names:
                    enqueue("mail", {"subject": "{n}", "body": "x"}, n=name)
                finalise(commit=False)
        else:
            committed.append([i.id for i in _commit_mails(app, names)])
    wait(app, timeout=20)
    arrived = smtp_server.intent_ids()
    assert sorted(arrived) == sorted(i for ids in committed for i in ids)
    assert len(set(arrived)) == len(arrived)
    for ids in committed:
        positions = [arrived.index(i) for i in ids]
        assert positions == sorted(positions)
    assert smtp_server.connections == len(committed)


def test_load_of_concurrent_background_commits_loses_and_doubles_nothing(
    make_app: t.Callable[..., Flask], smtp_server: SMTPServer
) -> None:
    app = _mail_app(make_app, smtp_server, "background")
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            for n in range(10):
                mine = [i.id for i in _commit_mails(app, [f"t{number}-{n}"])]
                with lock:
                    ids.extend(mine)
        except BaseException as exc:  # reported below, with the thread's number
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    wait(app, timeout=30)
    assert sorted(smtp_server.intent_ids()) == sorted(ids)
    stats = background_stats(app)
    assert (stats.handed_off, stats.delivered, stats.failed, stats.pending) == (
        40,
        40,
        0,
        0,
    )


def test_a_refused_background_email_fails_alone_and_is_reported(
    make_app: t.Callable[..., Flask],
    smtp_server: SMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _mail_app(make_app, smtp_server, "background")
    smtp_server.refuse = {"nobody@example.com"}
    failed: list[str] = []

    def on_failed(sender: Flask, intent: Intent, exception: BaseException) -> None:
        failed.append(intent.id)

    with signals.intent_failed.connected_to(on_failed, sender=app):
        with app.app_context():
            good = enqueue("mail", {"subject": "ok", "body": "x"})
            bad = enqueue(
                "mail",
                {"subject": "no", "body": "x", "recipients": ["nobody@example.com"]},
            )
            after = enqueue("mail", {"subject": "ok too", "body": "x"})
            assert good and bad and after
            finalise()
            wait()
    assert failed == [bad.id]
    assert smtp_server.intent_ids() == [good.id, after.id]
    assert bad.id in caplog.text
    assert background_stats(app).failed == 1
