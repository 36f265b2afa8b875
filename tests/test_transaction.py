"""The transaction rules: when a batch dispatches, when it is discarded."""

from __future__ import annotations

import logging
import threading
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.orm import scoped_session, sessionmaker

from notifyqueue import (
    Channel,
    NotifyQueue,
    deferred_notify,
    enqueue,
    finalise,
    signals,
)

from .helpers import Item, RecordingChannel, db

REC = {"type": "tests.helpers:RecordingChannel"}


@pytest.fixture
def discards() -> t.Iterator[list[tuple[str, list[str]]]]:
    """Every batch_discarded signal as (reason, payloads)."""
    seen: list[tuple[str, list[str]]] = []

    def receiver(sender: Flask, *, intents: list[t.Any], reason: str) -> None:
        seen.append((reason, [intent.payload for intent in intents]))

    with signals.batch_discarded.connected_to(receiver):
        yield seen


def add(name: str) -> None:
    """Change the database and queue an intent naming the change."""
    db.session.add(Item(name=name))
    db.session.flush()
    enqueue("rec", "{name}", name=name)


def names() -> list[str]:
    return sorted(db.session.scalars(sa.select(Item.name)))


# Rule 1


def test_nothing_dispatches_before_the_root_commit(app, rec, ctx):
    add("a")
    add("b")
    assert rec.sent == []
    db.session.commit()
    assert rec.sent == ["a", "b"]
    assert len(rec.batches) == 1


def test_queueing_outside_a_transaction_begins_one_like_session_add(
    app, rec, ctx, discards
):
    enqueue("rec", "early")
    assert db.session().in_transaction()
    db.session.rollback()
    assert discards == [("rollback", ["early"])]
    enqueue("rec", "early")
    add("a")
    assert rec.sent == []
    db.session.commit()
    assert rec.sent == ["early", "a"]


def test_batch_committed_is_sent_before_anything_is_dispatched(app, rec, ctx):
    seen: list[tuple[list[str], list[t.Any]]] = []

    def receiver(sender: Flask, *, intents: list[t.Any]) -> None:
        seen.append(([intent.payload for intent in intents], list(rec.sent)))

    with signals.batch_committed.connected_to(receiver, sender=app):
        add("a")
        db.session.commit()
    assert seen == [(["a"], [])]
    assert rec.sent == ["a"]


# Rule 2


def test_plain_session_commit_dispatches(app, rec, ctx):
    add("a")
    db.session.commit()
    assert rec.sent == ["a"]


def test_finalise_commits_then_dispatches_and_returns_the_result(app, rec, ctx):
    add("a")
    add("b")
    result = finalise(commit=True)
    assert result.committed and result.ok and bool(result)
    assert [intent.payload for intent in result.dispatched] == ["a", "b"]
    assert result.failed == [] and result.discarded == []
    assert rec.sent == ["a", "b"]
    db.session.rollback()  # the data is committed, not merely flushed
    assert names() == ["a", "b"]


def test_finalise_with_nothing_queued_commits(app, rec, ctx):
    db.session.add(Item(name="a"))
    result = finalise()
    assert result.ok and result.dispatched == []
    assert names() == ["a"]


# Rule 3


def test_rollback_discards_the_batch(app, rec, ctx, discards):
    add("a")
    db.session.rollback()
    assert discards == [("rollback", ["a"])]
    db.session.commit()
    assert rec.sent == []


def test_finalise_without_commit_rolls_back_and_discards(app, rec, ctx, discards):
    add("a")
    result = finalise(commit=False)
    assert not result.committed and not result
    assert [intent.payload for intent in result.discarded] == ["a"]
    assert discards == [("rollback", ["a"])]
    assert names() == []
    assert rec.sent == []


def test_finalise_without_commit_discards_intents_queued_outside_a_transaction(
    app, rec, ctx, discards
):
    enqueue("rec", "early")
    result = finalise(commit=False)
    assert [intent.payload for intent in result.discarded] == ["early"]
    assert discards == [("rollback", ["early"])]
    db.session.commit()
    assert rec.sent == []


def test_close_discards_the_batch(app, rec, ctx, discards):
    add("a")
    db.session.close()
    assert discards == [("close", ["a"])]
    add("b")
    db.session.commit()
    assert rec.sent == ["b"]


def test_remove_discards_the_batch(app, rec, ctx, discards):
    add("a")
    db.session.remove()
    assert discards == [("close", ["a"])]
    db.session.commit()
    assert rec.sent == []


def test_app_context_teardown_without_commit_discards_the_batch(app, rec, discards):
    with app.app_context():
        add("a")
    assert discards == [("teardown", ["a"])]
    with app.app_context():
        db.session.commit()
        assert names() == []
    assert rec.sent == []


def test_without_autobegin_intents_wait_for_the_transaction_begun_next(
    database_url, discards
):
    engine = sa.create_engine(database_url)
    session = scoped_session(sessionmaker(bind=engine, autobegin=False))
    app = Flask("no_autobegin")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    NotifyQueue(app, session=session)
    rec = app.extensions["notifyqueue"].channels["rec"]
    try:
        with app.app_context():
            enqueue("rec", "early")
            assert not session().in_transaction()
            session.begin()
            enqueue("rec", "inside")
            session.commit()
            assert rec.sent == ["early", "inside"]
            enqueue("rec", "never committed")
        # The app context ended with the intent still pending: discarded.
        assert discards == [("teardown", ["never committed"])]
        with app.app_context():
            session.begin()
            session.commit()
        assert rec.sent == ["early", "inside"]
    finally:
        session.remove()
        engine.dispose()


def test_rolled_back_intents_do_not_leak_into_the_next_transaction(app, rec, ctx):
    add("a")
    db.session.rollback()
    add("b")
    db.session.commit()
    assert rec.sent == ["b"]
    assert len(rec.batches) == 1


def test_failed_commit_dispatches_nothing_and_reraises(app, rec, ctx, discards):
    add("a")
    db.session.commit()
    add("b")
    db.session.add(Item(name="a"))  # violates the unique constraint at flush
    with pytest.raises(sa.exc.IntegrityError):
        finalise()
    assert discards == [("commit failed", ["b"])]
    assert rec.sent == ["a"]
    # The same app context goes on: the next batch carries only its own intents.
    add("c")
    result = finalise()
    assert [intent.payload for intent in result.dispatched] == ["c"]
    assert rec.sent == ["a", "c"]
    assert names() == ["a", "c"]


def test_failed_plain_commit_dispatches_nothing(app, rec, ctx, discards):
    add("a")
    db.session.add(Item(name="a"))
    with pytest.raises(sa.exc.IntegrityError):
        db.session.commit()
    db.session.rollback()
    assert discards == [("commit failed", ["a"])]
    add("b")
    db.session.commit()
    assert rec.sent == ["b"]


# Rule 4


def test_savepoint_release_dispatches_nothing(app, rec, ctx):
    add("a")
    savepoint = db.session.begin_nested()
    add("b")
    savepoint.commit()  # SQLAlchemy fires after_commit here
    assert rec.sent == []
    db.session.commit()
    assert rec.sent == ["a", "b"]


def test_savepoint_rollback_discards_exactly_its_intents(app, rec, ctx, discards):
    add("a")
    savepoint = db.session.begin_nested()
    add("b")
    savepoint.rollback()
    add("c")
    assert discards == [("savepoint rollback", ["b"])]
    result = finalise()
    assert rec.sent == ["a", "c"]
    assert [intent.payload for intent in result.discarded] == ["b"]
    assert names() == ["a", "c"]


def test_savepoint_rollback_discards_released_inner_savepoints(app, rec, ctx, discards):
    add("a")
    outer = db.session.begin_nested()
    add("b")
    inner = db.session.begin_nested()
    add("c")
    inner.commit()
    add("d")
    outer.rollback()
    assert discards == [("savepoint rollback", ["b", "c", "d"])]
    db.session.commit()
    assert rec.sent == ["a"]
    assert names() == ["a"]


def test_inner_savepoint_rollback_keeps_the_outer_savepoints_intents(app, rec, ctx):
    outer = db.session.begin_nested()
    add("a")
    inner = db.session.begin_nested()
    add("b")
    inner.rollback()
    add("c")
    outer.commit()
    db.session.commit()
    assert rec.sent == ["a", "c"]


def test_savepoint_context_manager_rolls_back_on_error(app, rec, ctx):
    add("a")
    with pytest.raises(sa.exc.IntegrityError):
        with db.session.begin_nested():
            add("b")
            db.session.add(Item(name="a"))
            db.session.flush()
    db.session.commit()
    assert rec.sent == ["a"]
    assert names() == ["a"]


def test_savepoint_begun_before_any_intent_discards_what_it_queued(app, rec, ctx):
    savepoint = db.session.begin_nested()
    add("a")
    savepoint.rollback()
    add("b")
    db.session.commit()
    assert rec.sent == ["b"]


# Rule 5


def test_each_of_a_thousand_transactions_dispatches_once(app, rec, ctx):
    for number in range(1000):
        enqueue("rec", "{n}", n=number)
        if number % 7 == 3:
            db.session.rollback()
        else:
            db.session.commit()
    expected = [[str(n)] for n in range(1000) if n % 7 != 3]
    assert [[intent.payload for intent in batch] for batch in rec.batches] == expected


def test_a_second_commit_does_not_dispatch_again(app, rec, ctx):
    add("a")
    db.session.commit()
    db.session.commit()
    finalise()
    assert rec.sent == ["a"]


# Rule 7


def test_a_handler_may_query_and_commit_its_own_transaction(app, rec, ctx):
    seen: list[list[str]] = []

    def handler(sender: Flask, *, intent: t.Any) -> None:
        if intent.payload == "a":
            seen.append(names())  # a query: the session has left the commit
            add("a-followup")
            db.session.commit()

    with signals.intent_dispatched.connected_to(handler, sender=app):
        add("a")
        add("b")
        result = finalise()
    assert seen == [["a", "b"]]
    assert [intent.payload for intent in result.dispatched] == ["a", "b"]
    assert [len(batch) for batch in rec.batches] == [2, 1]
    assert rec.sent == ["a", "b", "a-followup"]
    assert names() == ["a", "a-followup", "b"]


def test_intents_a_handler_queues_without_commit_wait_for_the_next_commit(
    app, rec, ctx
):
    def handler(sender: Flask, *, intent: t.Any) -> None:
        if intent.payload == "a":
            enqueue("rec", "queued by handler")

    with signals.intent_dispatched.connected_to(handler, sender=app):
        add("a")
        db.session.commit()
        assert rec.sent == ["a"]
        add("b")
        db.session.commit()
    assert rec.sent == ["a", "queued by handler", "b"]


# Rule 8


def test_threads_never_see_each_others_queue(app, rec):
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(number: int) -> None:
        try:
            with app.app_context():
                for step in range(20):
                    enqueue("rec", "{n}-{s}", n=number, s=step)
                    barrier.wait(timeout=10)
                    if number % 2:
                        db.session.rollback()
                    else:
                        db.session.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(len(batch) == 1 for batch in rec.batches)
    assert sorted(rec.sent) == sorted(f"{n}-{s}" for n in (0, 2) for s in range(20))


def test_plain_scoped_session_follows_savepoints_and_threads(database_url, tmp_path):
    engine = sa.create_engine(database_url)
    session = scoped_session(sessionmaker(bind=engine))
    db.metadata.drop_all(engine)
    db.metadata.create_all(engine)
    app = Flask("plain")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    NotifyQueue(app, session=session)
    rec = app.extensions["notifyqueue"].channels["rec"]
    assert isinstance(rec, RecordingChannel)

    def other_thread() -> None:
        with app.app_context():
            enqueue("rec", "other")
            session.rollback()
            session.remove()

    try:
        with app.app_context():
            session.add(Item(name="a"))
            enqueue("rec", "a")
            savepoint = session.begin_nested()
            enqueue("rec", "b")
            savepoint.rollback()
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            session.commit()
        assert rec.sent == ["a"]
    finally:
        session.remove()
        db.metadata.drop_all(engine)
        engine.dispose()


def test_a_commit_that_fails_at_commit_time_dispatches_nothing(app, rec, ctx, discards):
    # A deferred foreign key is only checked by COMMIT itself, after every
    # flush has succeeded: the case a flag set "before commit" gets wrong.
    for statement in (
        "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER"
        " REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    ):
        db.session.execute(sa.text(statement))
    db.session.commit()
    try:
        if db.engine.dialect.name == "sqlite":
            db.session.execute(sa.text("PRAGMA foreign_keys = ON"))
        db.session.execute(sa.text("INSERT INTO child VALUES (1, 42)"))
        enqueue("rec", "orphan")
        with pytest.raises(sa.exc.IntegrityError):
            finalise()
        assert discards == [("commit failed", ["orphan"])]
        assert rec.sent == []
        enqueue("rec", "next")
        assert [i.payload for i in finalise().dispatched] == ["next"]
        assert rec.sent == ["next"]
        assert db.session.scalar(sa.text("SELECT count(*) FROM child")) == 0
    finally:
        db.session.rollback()
        db.session.execute(sa.text("DROP TABLE child"))
        db.session.execute(sa.text("DROP TABLE parent"))
        db.session.commit()


class AppContextProbe(Channel):
    """Records which app was current when it was sent a batch."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen: list[tuple[str, list[t.Any]]] = []

    def send(self, intents: t.Sequence[t.Any]) -> None:
        self.seen.append((current_app.name, [intent.payload for intent in intents]))


@pytest.fixture
def probe_app(database_url: str) -> t.Iterator[tuple[Flask, t.Any, t.Any]]:
    """An app following a plain thread-local scoped_session, with a probe channel."""
    engine = sa.create_engine(database_url)
    session = scoped_session(sessionmaker(bind=engine))
    app = Flask("probe_app")
    app.config["NOTIFYQUEUE_CHANNELS"] = {
        "probe": {"type": "tests.test_transaction:AppContextProbe"}
    }
    NotifyQueue(app, session=session)
    yield app, session, app.extensions["notifyqueue"].channels["probe"]
    session.remove()
    engine.dispose()


def test_teardown_discards_even_when_a_thread_local_session_lives_on(
    probe_app, discards
):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "queued in a request")
    assert discards == [("teardown", ["queued in a request"])]
    assert session().in_transaction()  # nothing removed this session
    session.commit()
    assert probe.seen == []


def test_a_savepoint_left_open_by_teardown_still_discards_what_it_queued(probe_app):
    app, session, probe = probe_app
    with app.app_context():
        savepoint = session.begin_nested()
        enqueue("probe", "discarded by teardown")
    with app.app_context():
        enqueue("probe", "queued in the same savepoint")
        savepoint.rollback()
        enqueue("probe", "after the savepoint")
        session.commit()
    assert probe.seen == [("probe_app", ["after the savepoint"])]


def test_channels_run_with_their_own_app_current(probe_app):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "x")
        with Flask("another_app").app_context():
            session.commit()
    assert probe.seen == [("probe_app", ["x"])]


def test_a_session_joined_to_an_outer_test_transaction_dispatches_on_commit(
    database_url,
):
    # The common test-fixture pattern: every session.commit() only releases a
    # savepoint of an outer transaction the fixture rolls back at the end.
    engine = sa.create_engine(database_url)
    connection = engine.connect()
    outer = connection.begin()
    session = scoped_session(
        sessionmaker(bind=connection, join_transaction_mode="create_savepoint")
    )
    app = Flask("outer_transaction")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    NotifyQueue(app, session=session)
    rec = app.extensions["notifyqueue"].channels["rec"]
    try:
        with app.app_context():
            enqueue("rec", "a")
            session.commit()
            enqueue("rec", "b")
            session.rollback()
        assert rec.sent == ["a"]
    finally:
        session.remove()
        outer.rollback()
        connection.close()
        engine.dispose()


# App contexts own what they queue


def test_a_nested_app_context_keeps_the_outer_contexts_intents(probe_app, discards):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "outer")
        with app.app_context():
            pass
        assert discards == []
        session.commit()
    assert probe.seen == [("probe_app", ["outer"])]


def test_a_nested_app_context_discards_only_what_it_queued(probe_app, discards):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "outer")
        with app.app_context():
            enqueue("probe", "inner")
        assert discards == [("teardown", ["inner"])]
        enqueue("probe", "outer again")
        session.commit()
    assert probe.seen == [("probe_app", ["outer", "outer again"])]


def test_a_nested_app_context_that_commits_dispatches_the_whole_transaction(
    probe_app, discards
):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "outer")
        with app.app_context():
            enqueue("probe", "inner")
            session.commit()
        assert probe.seen == [("probe_app", ["outer", "inner"])]
    assert discards == []


def test_a_savepoint_begun_in_a_nested_context_still_rolls_back_after_it(
    probe_app, discards
):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "outer")
        with app.app_context():
            savepoint = session.begin_nested()
            enqueue("probe", "inner")
        enqueue("probe", "in the savepoint")
        savepoint.rollback()
        session.commit()
    assert discards == [
        ("teardown", ["inner"]),
        ("savepoint rollback", ["in the savepoint"]),
    ]
    assert probe.seen == [("probe_app", ["outer"])]


@pytest.mark.parametrize("registered", ["before init_app", "after init_app"])
def test_what_an_apps_own_teardown_commits_is_dispatched(
    make_app, registered, discards
):
    app = make_app(init=False)

    def commit_on_teardown(exc: BaseException | None) -> None:
        db.session.commit()

    if registered == "before init_app":
        app.teardown_appcontext(commit_on_teardown)
    NotifyQueue(app)
    if registered == "after init_app":
        app.teardown_appcontext(commit_on_teardown)
    rec = app.extensions["notifyqueue"].channels["rec"]
    with app.app_context():
        add("a")
    assert rec.sent == ["a"]
    assert discards == []
    with app.app_context():
        assert names() == ["a"]


def test_a_thread_local_session_committed_by_teardown_dispatches(
    database_url, discards
):
    engine = sa.create_engine(database_url)
    session = scoped_session(sessionmaker(bind=engine))
    app = Flask("commit_at_teardown")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    app.teardown_appcontext(lambda exc: session.commit())
    NotifyQueue(app, session=session)
    rec = app.extensions["notifyqueue"].channels["rec"]
    try:
        with app.app_context():
            enqueue("rec", "committed by teardown")
        assert rec.sent == ["committed by teardown"]
        assert discards == []
    finally:
        session.remove()
        engine.dispose()


# Session classes related by inheritance


class FollowUp(Channel):
    """Queues a follow-up (without committing) for every intent it is sent."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sent: list[t.Any] = []

    def send(self, intents: t.Sequence[t.Any]) -> None:
        for intent in intents:
            self.sent.append(intent.payload)
            if not intent.payload.startswith("follow-up"):
                enqueue(self.name, "follow-up of {p}", p=intent.payload)


@pytest.mark.parametrize("first", ["base class", "subclass"])
def test_listeners_act_once_per_event_whatever_the_class_hierarchy(
    database_url, first, discards
):
    engine = sa.create_engine(database_url)
    # A class of this test's own: listeners stay on the classes they were put on.
    app_session = type("AppSession", (sa.orm.Session,), {})
    on_base = scoped_session(app_session)
    on_base(bind=engine)
    # sessionmaker(class_=...) makes a subclass of AppSession.
    on_sub = scoped_session(sessionmaker(bind=engine, class_=app_session))
    sessions = {"base class": on_base, "subclass": on_sub}
    order = [first] + [name for name in sessions if name != first]
    apps = {}
    for name in order:
        app = Flask(f"hierarchy_{name.replace(' ', '_')}")
        app.config["NOTIFYQUEUE_CHANNELS"] = {
            "up": {"type": "tests.test_transaction:FollowUp"}
        }
        NotifyQueue(app, session=sessions[name])
        apps[name] = app
    # And a subclass made after both were watched.
    sessions["late subclass"] = scoped_session(
        sessionmaker(bind=engine, class_=app_session)
    )
    apps["late subclass"] = Flask("hierarchy_late")
    apps["late subclass"].config["NOTIFYQUEUE_CHANNELS"] = {
        "up": {"type": "tests.test_transaction:FollowUp"}
    }
    NotifyQueue(apps["late subclass"], session=sessions["late subclass"])
    try:
        for name, app in apps.items():
            channel = app.extensions["notifyqueue"].channels["up"]
            with app.app_context():
                enqueue("up", name)
                sessions[name].commit()
                # The handler's follow-up waits for the next commit.
                assert discards == []
                sessions[name].commit()
            assert channel.sent == [name, f"follow-up of {name}"]
    finally:
        for session in sessions.values():
            session.remove()
        engine.dispose()


# Intents queued while the transaction ends


@pytest.mark.parametrize("earlier", [False, True], ids=["empty batch", "with earlier"])
@pytest.mark.parametrize("insert", [False, True], ids=["after ours", "before ours"])
def test_an_intent_queued_by_an_after_commit_listener_joins_that_commit(
    probe_app, discards, earlier, insert
):
    app, session, probe = probe_app

    def queue_from_after_commit(session: sa.orm.Session) -> None:
        if not session.in_nested_transaction():
            enqueue("probe", "from after_commit")

    session_class = session.session_factory.class_
    sa.event.listen(
        session_class, "after_commit", queue_from_after_commit, insert=insert
    )
    try:
        with app.app_context():
            if earlier:
                enqueue("probe", "earlier")
            session.commit()
            assert discards == []
            expected = (
                ["earlier", "from after_commit"] if earlier else ["from after_commit"]
            )
            assert probe.seen == [("probe_app", expected)]
    finally:
        sa.event.remove(session_class, "after_commit", queue_from_after_commit)


# Sessions without autobegin


@pytest.fixture
def no_autobegin(database_url: str) -> t.Iterator[tuple[Flask, t.Any, t.Any]]:
    engine = sa.create_engine(database_url)
    session = scoped_session(sessionmaker(bind=engine, autobegin=False))
    app = Flask("no_autobegin")
    app.config["NOTIFYQUEUE_CHANNELS"] = {"rec": REC}
    NotifyQueue(app, session=session)
    yield app, session, app.extensions["notifyqueue"].channels["rec"]
    session.remove()
    engine.dispose()


@pytest.mark.parametrize(
    ("end", "reason"),
    [
        ("close", "close"),
        ("rollback", "rollback"),
        pytest.param(
            "reset",
            "close",
            marks=pytest.mark.skipif(
                not hasattr(sa.orm.Session, "reset"),
                reason="Session.reset() is new in SQLAlchemy 2.0.22",
            ),
        ),
        ("remove", "close"),
    ],
)
def test_without_autobegin_ending_the_session_discards_waiting_intents(
    no_autobegin, discards, end, reason
):
    app, session, rec = no_autobegin
    with app.app_context():
        enqueue("rec", "abandoned")
        assert not session().in_transaction()
        getattr(session, end)()
        assert discards == [(reason, ["abandoned"])]
        session.begin()
        enqueue("rec", "next")
        session.commit()
    assert rec.sent == ["next"]
    assert discards == [(reason, ["abandoned"])]


def test_without_autobegin_finalise_false_discards_waiting_intents_once(
    no_autobegin, discards
):
    app, session, rec = no_autobegin
    with app.app_context():
        enqueue("rec", "abandoned")
        result = finalise(commit=False)
        assert [intent.payload for intent in result.discarded] == ["abandoned"]
        assert discards == [("rollback", ["abandoned"])]
        session.begin()
        session.commit()
    assert rec.sent == []


def test_without_autobegin_waiting_intents_leave_the_sessions_methods_alone(
    no_autobegin,
):
    app, session, rec = no_autobegin
    with app.app_context():
        enqueue("rec", "waits")
        session.begin()
        # Once the batch has joined a transaction, nothing of ours stays on the
        # session: its methods are its class's again.
        assert not {"close", "rollback", "reset", "invalidate"} & set(vars(session()))
        session.commit()
    assert rec.sent == ["waits"]


# One ending, one batch_discarded


@pytest.mark.parametrize("end", ["close", "remove"])
def test_closing_with_a_savepoint_open_discards_everything_as_close(
    app, rec, ctx, discards, end
):
    add("a")
    db.session.begin_nested()
    add("b")
    db.session.begin_nested()
    add("c")
    getattr(db.session, end)()
    assert discards == [("close", ["a", "b", "c"])]
    db.session.commit()
    assert rec.sent == []


def test_teardown_with_a_savepoint_open_discards_everything_as_teardown(
    app, rec, discards
):
    with app.app_context():
        add("a")
        db.session.begin_nested()
        add("b")
    assert discards == [("teardown", ["a", "b"])]
    assert rec.sent == []


def test_rollback_with_a_savepoint_open_rolls_the_savepoint_back_first(
    app, rec, ctx, discards
):
    add("a")
    db.session.begin_nested()
    add("b")
    db.session.rollback()
    assert discards == [("savepoint rollback", ["b"]), ("rollback", ["a"])]
    db.session.commit()
    assert rec.sent == []


# A batch discarded by close() or teardown is logged as a forgotten commit


@pytest.fixture
def forgotten(caplog):
    """The messages of the WARNING records on the notifyqueue logger."""
    caplog.set_level(logging.WARNING, logger="notifyqueue")

    def messages():
        return [
            record.getMessage()
            for record in caplog.records
            if record.name == "notifyqueue" and record.levelno == logging.WARNING
        ]

    return messages


@deferred_notify(rec="jumped {height}")
def jump(height):
    pass


def test_a_batch_closed_with_intents_is_logged_as_a_forgotten_commit(
    app, rec, ctx, forgotten
):
    jump(1)
    jump(2)
    db.session.close()

    [message] = forgotten()
    assert message.startswith("2 notification(s) discarded by close() or remove()")
    assert "forget to commit" in message
    assert "rec from tests.test_transaction.jump (2 intents)" in message


def test_a_batch_discarded_at_teardown_is_logged_as_a_forgotten_commit(
    app, rec, forgotten
):
    with app.app_context():
        jump(1)

    [message] = forgotten()
    assert message.startswith("1 notification(s) discarded at the end of its app")
    assert "rec from tests.test_transaction.jump." in message


def test_what_a_nested_app_context_drops_is_logged_as_a_forgotten_commit(
    probe_app, forgotten
):
    app, session, probe = probe_app
    with app.app_context():
        enqueue("probe", "outer")
        with app.app_context():
            enqueue("probe", "inner")
        assert len(forgotten()) == 1
        session.commit()

    assert forgotten()[0].startswith("1 notification(s) discarded at the end")


def test_the_warning_names_the_function_that_called_enqueue(app, rec, ctx, forgotten):
    add("a")
    db.session.close()

    [message] = forgotten()
    assert "rec from enqueue in tests.test_transaction.add." in message


def _roll_back_a_savepoint():
    add("a")
    with pytest.raises(RuntimeError):
        with db.session.begin_nested():
            add("b")
            raise RuntimeError("undo b")
    db.session.commit()


def _fail_a_commit():
    add("a")
    db.session.add(Item(name="a"))
    with pytest.raises(sa.exc.IntegrityError):
        finalise()


@pytest.mark.parametrize(
    "end",
    [
        pytest.param(lambda: (add("a"), db.session.rollback()), id="rollback"),
        pytest.param(lambda: (add("a"), finalise(commit=False)), id="finalise-false"),
        pytest.param(_roll_back_a_savepoint, id="savepoint-rollback"),
        pytest.param(_fail_a_commit, id="commit-failed"),
    ],
)
def test_rollbacks_and_failed_commits_are_not_logged_as_forgotten(
    app, rec, ctx, forgotten, end
):
    end()

    assert forgotten() == []
