"""The benchmark cases B1-B4, each against the naive queue of :mod:`.naive`.

Every timing is taken pair by pair in one process: notifyqueue, the naive
queue and (where it applies) the bare transaction run one after the other in
each repeat, so a ratio compares runs that met the same machine state.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
import tracemalloc
import typing as t
from dataclasses import dataclass

from flask import Flask
from sqlalchemy import event, select

from notifyqueue import Channel, Intent, NotifyQueue, deferred_notify
from sample_app.extensions import db
from sample_app.models import Froggy

from . import naive


def sink(message: t.Any) -> None:
    """The channel function both sides deliver to: it does nothing."""


class NullChannel(Channel):
    """notifyqueue's side of the do-nothing channel: ``sink`` per intent."""

    def send(self, intents: t.Sequence[Intent]) -> None:
        for intent in intents:
            sink(intent.payload)


@deferred_notify(null="Froggy colour updated: {froggy.id}; new value: {colour}")
def nq_update_colour(froggy: Froggy, colour: str) -> None:
    froggy.colour = colour


def naive_update_colour(froggy: Froggy, colour: str, last: bool = False) -> None:
    froggy.colour = colour
    naive.queue(
        db.session,
        sink,
        message=f"Froggy colour updated: {froggy.id}; new value: {colour}",
    )
    if last:
        naive.commit_and_drain(db.session)


def bare_update_colour(froggy: Froggy, colour: str) -> None:
    """The same change, and the same read of ``froggy.id`` (after a commit it
    reloads the row), with no notification."""
    froggy.colour = colour
    froggy.id  # noqa: B018


@dataclass
class Spread:
    """The median of repeated measurements, with their minimum and maximum."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}


def make_app(database_url: str) -> Flask:
    """A minimal app on the sample's model, with the do-nothing channel only."""
    app = Flask("benchmarks")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        NOTIFYQUEUE_CHANNELS={"null": {"type": "benchmarks.cases:NullChannel"}},
    )
    db.init_app(app)
    NotifyQueue(app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            # Without fsync at COMMIT, commit time stops drowning the
            # per-intent costs in disk noise; both sides get the same database.
            event.listen(db.engine, "connect", _no_fsync)
            db.engine.dispose()
        db.drop_all()
        db.create_all()
        db.session.add(Froggy(id=1, name="kermit", colour="green", is_jumping=False))
        db.session.commit()
    return app


def _no_fsync(dbapi_connection: t.Any, record: t.Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


def sqlite_url(directory: str) -> str:
    return f"sqlite:///{directory}/benchmarks.db"


# -- B1: per-intent cost ---------------------------------------------------------


SIDES = ("bare", "notifyqueue", "naive")


def _transaction(side: str, froggy: Froggy, colours: list[str]) -> float:
    """Seconds for one transaction of ``len(colours)`` calls and a commit."""
    started = time.perf_counter()
    if side == "notifyqueue":
        for colour in colours:
            nq_update_colour(froggy, colour)
        db.session.commit()
    elif side == "naive":
        last = len(colours) - 1
        for i, colour in enumerate(colours):
            naive_update_colour(froggy, colour, last=i == last)
    else:
        for colour in colours:
            bare_update_colour(froggy, colour)
        db.session.commit()
    return time.perf_counter() - started


def _sample(froggy: Froggy, intents: int, transactions: int) -> dict[str, float]:
    """Mean seconds per transaction of each side, the sides interleaved
    transaction by transaction (in a rotating order), so that a slow stretch
    of the machine falls on all three alike."""
    colours = [f"c{i}" for i in range(intents)]
    totals = dict.fromkeys(SIDES, 0.0)
    gc.collect()
    for n in range(transactions):
        for k in range(3):
            side = SIDES[(n + k) % 3]
            totals[side] += _transaction(side, froggy, colours)
    return {side: total / transactions for side, total in totals.items()}


def b1_per_intent(
    database_url: str, sizes: t.Sequence[int], repeats: int, budget: float
) -> dict[str, t.Any]:
    """Per-intent cost of notifyqueue and of the naive queue, commit apart.

    ``bare`` is the same calls and commit with no notification; a side's
    per-intent cost is its time less bare's, over the number of intents.
    Each repeat takes about ``budget`` seconds per side.
    """
    app = make_app(database_url)
    rows = []
    with app.app_context():
        froggy = db.session.get(Froggy, 1)
        assert froggy is not None
        for intents in sizes:
            transactions = max(10, int(budget / (intents * 4e-6 + 5e-4)))
            _sample(froggy, intents, max(1, transactions // 5))  # warm up
            commits: list[float] = []
            costs: dict[str, list[float]] = {"notifyqueue": [], "naive": []}
            ratios = []
            for _ in range(repeats):
                times = _sample(froggy, intents, transactions)
                commits.append(times["bare"])
                for side, side_costs in costs.items():
                    side_costs.append((times[side] - times["bare"]) / intents)
                ratios.append(costs["notifyqueue"][-1] / costs["naive"][-1])
            rows.append(
                {
                    "intents": intents,
                    "transactions per sample": transactions,
                    "commit": Spread.of(commits).as_dict(),
                    "notifyqueue per intent": Spread.of(costs["notifyqueue"]).as_dict(),
                    "naive per intent": Spread.of(costs["naive"]).as_dict(),
                    "ratio": Spread.of(ratios).as_dict(),
                }
            )
        db.session.remove()
        db.engine.dispose()
    return {"rows": rows}


# -- B2: request overhead ----------------------------------------------------------


def b2_request_overhead(
    database_url: str, requests: int, repeats: int
) -> dict[str, t.Any]:
    """The sample's colour endpoint (a log and a mail intent) against the same
    endpoint with ``update_froggy_colour`` undecorated, through the test client.

    The log channel's records go to a handler that drops them; mail is
    suppressed. The sample's own receivers (which log the commit and each
    email) are disconnected, so only notifyqueue's work differs.
    """
    from notifyqueue import signals
    from sample_app import create_app, froggies, logs, views

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "MAIL_SERVER": None})
    app.logger.handlers[:] = [logging.NullHandler()]
    app.logger.propagate = False
    signals.batch_committed.disconnect(logs._log_commit, sender=app)
    signals.intent_dispatched.disconnect(logs._log_email, sender=app)
    decorated = froggies.update_froggy_colour
    undecorated = decorated.__wrapped__  # type: ignore[attr-defined]
    with app.app_context():
        db.drop_all()
        db.create_all()
        db.session.add(Froggy(name="kermit", colour="green", is_jumping=False))
        db.session.commit()
        froggy_id = db.session.scalars(select(Froggy.id)).one()
        db.session.remove()
    client = app.test_client()
    path = f"/froggies/{froggy_id}/colour"

    def sample(function: t.Any) -> float:
        vars(views)["update_froggy_colour"] = function
        started = time.perf_counter()
        for i in range(requests):
            response = client.put(path, json={"colour": f"c{i}"})
            assert response.status_code == 200, response.json
        return (time.perf_counter() - started) / requests

    try:
        sample(decorated)
        sample(undecorated)
        times: dict[str, list[float]] = {"notifyqueue": [], "undecorated": []}
        ratios = []
        for repeat in range(repeats):
            if repeat % 2:
                without, with_nq = sample(undecorated), sample(decorated)
            else:
                with_nq, without = sample(decorated), sample(undecorated)
            times["notifyqueue"].append(with_nq)
            times["undecorated"].append(without)
            ratios.append(with_nq / without)
    finally:
        vars(views)["update_froggy_colour"] = decorated
        with app.app_context():
            db.session.remove()
            db.drop_all()
            db.engine.dispose()
    return {
        "requests per sample": requests,
        "notifyqueue": Spread.of(times["notifyqueue"]).as_dict(),
        "undecorated": Spread.of(times["undecorated"]).as_dict(),
        "ratio": Spread.of(ratios).as_dict(),
    }


# -- B3: mail ------------------------------------------------------------------


def b3_mail(emails: int, repeats: int) -> dict[str, t.Any]:
    """``emails`` emails in one transaction to a real SMTP server on loopback:
    notifyqueue's batch on one connection against one connection per message,
    as a naive drain calling ``mail.send()`` for each would do."""
    from flask_mail import Mail, Message

    from notifyqueue import enqueue
    from tests.smtp import start_smtp_server

    server, stop = start_smtp_server()
    directory = tempfile.mkdtemp()
    app = Flask("benchmarks_mail")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=sqlite_url(directory),
        MAIL_DEFAULT_SENDER="froggy-api@example.com",
        NOTIFYQUEUE_CHANNELS={
            "mail": {"type": "mail", "recipients": ["froggy-admins@example.com"]}
        },
        **server.config(),
    )
    db.init_app(app)
    mail = Mail(app)
    NotifyQueue(app)
    template = {"subject": "Froggy {n} updated", "body": "Froggy {n}: new colour."}

    def with_notifyqueue() -> float:
        started = time.perf_counter()
        for n in range(emails):
            enqueue("mail", template, n=n)
        db.session.commit()
        return time.perf_counter() - started

    def one_connection_each() -> float:
        started = time.perf_counter()
        entries = []
        for n in range(emails):
            entries.append(
                Message(
                    subject=f"Froggy {n} updated",
                    body=f"Froggy {n}: new colour.",
                    recipients=["froggy-admins@example.com"],
                )
            )
        db.session.commit()
        for message in entries:
            mail.send(message)
        return time.perf_counter() - started

    try:
        with app.app_context():
            with_notifyqueue()
            one_connection_each()
            times: dict[str, list[float]] = {"notifyqueue": [], "naive": []}
            ratios = []
            for _ in range(repeats):
                batch, each = with_notifyqueue(), one_connection_each()
                times["notifyqueue"].append(batch)
                times["naive"].append(each)
                ratios.append(each / batch)
            received = len(server.messages)
            db.session.remove()
            db.engine.dispose()
    finally:
        stop()
    expected = emails * 2 * (repeats + 1)
    if received != expected:
        raise RuntimeError(f"B3: the server received {received} of {expected} emails")
    return {
        "emails": emails,
        "notifyqueue": Spread.of(times["notifyqueue"]).as_dict(),
        "naive": Spread.of(times["naive"]).as_dict(),
        "speed-up": Spread.of(ratios).as_dict(),
    }


# -- B4: memory ----------------------------------------------------------------


def b4_memory(database_url: str, transactions: int, intents: int) -> dict[str, t.Any]:
    """Bytes still allocated after ``transactions`` transactions (after a
    warm-up), and the peak bytes per intent while ``intents`` wait in one."""
    app = make_app(database_url)
    with app.app_context():
        froggy = db.session.get(Froggy, 1)
        assert froggy is not None
        for i in range(200):
            nq_update_colour(froggy, f"w{i}")
            db.session.commit()
        gc.collect()
        tracemalloc.start()
        try:
            for i in range(transactions):
                nq_update_colour(froggy, f"c{i}")
                db.session.commit()
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0]
            peaks = {}
            for side in ("notifyqueue", "naive"):
                froggy.id  # noqa: B018  (reload it outside the measurement)
                gc.collect()
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                for i in range(intents):
                    if side == "notifyqueue":
                        nq_update_colour(froggy, f"p{i}")
                    else:
                        naive_update_colour(froggy, f"p{i}")
                peak = tracemalloc.get_traced_memory()[1]
                peaks[side] = (peak - before) / intents
                if side == "notifyqueue":
                    db.session.commit()
                else:
                    naive.commit_and_drain(db.session)
        finally:
            tracemalloc.stop()
        db.session.remove()
        db.engine.dispose()
    return {
        "transactions": transactions,
        "retained bytes": retained,
        "intents": intents,
        "peak bytes per intent": peaks,
    }
