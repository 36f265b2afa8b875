"""The benchmark cases B1-B4, each against the naive queue of :mod:`.naive`.

Every timing is taken pair by pair in one process: notifyqueue, the naive
queue and (where it applies) the bare transaction run one after the other in
each repeat, so a ratio compares runs that met the same machine state.
"""

from __future__ import annotations

import gc
import logging
import statistics
import subprocess
import sys
import time
import tracemalloc
import typing as t
from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from sqlalchemy import event, select

import notifyqueue
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
    """Seconds per transaction of bare, and per intent of the two queues.

    The sides run interleaved transaction by transaction (in a rotating
    order), so a slow stretch of the machine falls on all three alike. A
    queue's cost is the median over the transactions of its time less the
    bare transaction's beside it: a median, because one transaction that met
    a page fault or a stolen time slice is worth up to a millisecond, a
    hundred times what one intent costs.
    """
    colours = [f"c{i}" for i in range(intents)]
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    gc.collect()
    for n in range(transactions):
        for k in range(3):
            side = SIDES[(n + k) % 3]
            times[side].append(_transaction(side, froggy, colours))
    bare = times["bare"]
    return {
        "bare": statistics.median(bare),
        **{
            side: statistics.median(
                (spent - base) / intents
                for spent, base in zip(times[side], bare, strict=True)
            )
            for side in ("notifyqueue", "naive")
        },
    }


def b1_per_intent(
    database_url: str, sizes: t.Sequence[int], repeats: int, budget: float
) -> dict[str, t.Any]:
    """Per-intent cost of notifyqueue and of the naive queue, commit apart.

    ``bare`` is the same calls and commit with no notification (the model
    changes, the row's reload and the COMMIT), reported as "bare
    transaction"; a side's per-intent cost is its time less bare's, over the
    number of intents.
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
            bares: list[float] = []
            costs: dict[str, list[float]] = {"notifyqueue": [], "naive": []}
            ratios = []
            for _ in range(repeats):
                sample = _sample(froggy, intents, transactions)
                bares.append(sample["bare"])
                for side, side_costs in costs.items():
                    side_costs.append(sample[side])
                ratios.append(sample["notifyqueue"] / sample["naive"])
            rows.append(
                {
                    "intents": intents,
                    "transactions per sample": transactions,
                    "bare transaction": Spread.of(bares).as_dict(),
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
    # Without sender=: blinker keeps a receiver disconnected from one sender
    # in signal.receivers, and notifyqueue would still look it up.
    signals.batch_committed.disconnect(logs._log_commit)
    signals.intent_dispatched.disconnect(logs._log_email)
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

    def sample() -> tuple[float, float]:
        """Median seconds per request with and without notifyqueue, the two
        alternating request by request (a median: a SQLite COMMIT's fsync
        now and then takes ten times the usual)."""
        functions = {"notifyqueue": decorated, "undecorated": undecorated}
        times: dict[str, list[float]] = {side: [] for side in functions}
        for i in range(requests):
            for side in sorted(functions, reverse=i % 2 == 1):
                vars(views)["update_froggy_colour"] = functions[side]
                started = time.perf_counter()
                response = client.put(path, json={"colour": f"{side} {i}"})
                times[side].append(time.perf_counter() - started)
                assert response.status_code == 200, response.json
        return (
            statistics.median(times["notifyqueue"]),
            statistics.median(times["undecorated"]),
        )

    try:
        sample()
        times: dict[str, list[float]] = {"notifyqueue": [], "undecorated": []}
        ratios = []
        for _ in range(repeats):
            with_nq, without = sample()
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


def b3_mail(
    database_url: str, emails: int, repeats: int, relay: bool = False
) -> dict[str, t.Any]:
    """``emails`` emails in one transaction to a real SMTP server on loopback
    (aiosmtpd, in a process of its own): notifyqueue's batch on one
    connection against one connection per message, as a naive drain calling
    Flask-Mail's ``mail.send()`` for each would do.

    ``relay``: the server requires STARTTLS and AUTH, as a mail relay does.
    """
    from flask_mail import Mail, Message

    from notifyqueue import enqueue

    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.smtp_sink"] + (["--tls"] if relay else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("B3: the SMTP server did not start (see its stderr)")
        port = int(line)
        app = Flask("benchmarks_mail")
        app.config.update(
            SQLALCHEMY_DATABASE_URI=database_url,
            MAIL_SERVER="127.0.0.1",
            MAIL_PORT=port,
            MAIL_SUPPRESS_SEND=False,
            MAIL_USE_TLS=relay,
            MAIL_USERNAME="bench" if relay else None,
            MAIL_PASSWORD="bench" if relay else None,
            MAIL_DEFAULT_SENDER="froggy-api@example.com",
            NOTIFYQUEUE_CHANNELS={
                "mail": {"type": "mail", "recipients": ["froggy-admins@example.com"]}
            },
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

        with app.app_context():
            with_notifyqueue()
            one_connection_each()
            times: dict[str, list[float]] = {"notifyqueue": [], "naive": []}
            ratios = []
            for repeat in range(repeats):
                if repeat % 2:
                    each, batch = one_connection_each(), with_notifyqueue()
                else:
                    batch, each = with_notifyqueue(), one_connection_each()
                times["notifyqueue"].append(batch)
                times["naive"].append(each)
                ratios.append(each / batch)
            db.session.remove()
            db.engine.dispose()
    finally:
        server.stdin.close()
        received = server.stdout.readline()
        server.wait(timeout=30)
    expected = emails * 2 * (repeats + 1)
    if int(received or 0) != expected:
        raise RuntimeError(f"B3: the server received {received} of {expected} emails")
    return {
        "emails": emails,
        "server": "STARTTLS + AUTH" if relay else "plain SMTP",
        "notifyqueue": Spread.of(times["notifyqueue"]).as_dict(),
        "naive": Spread.of(times["naive"]).as_dict(),
        "speed-up": Spread.of(ratios).as_dict(),
    }


# -- B4: memory ----------------------------------------------------------------


def b4_memory(database_url: str, transactions: int, intents: int) -> dict[str, t.Any]:
    """Bytes still allocated after ``transactions`` transactions (after a
    warm-up): in all, and by notifyqueue's own code; and the peak bytes per
    intent while ``intents`` wait in one transaction, on both sides."""
    app = make_app(database_url)
    package = str(Path(notifyqueue.__file__).parent)
    with app.app_context():
        froggy = db.session.get(Froggy, 1)
        assert froggy is not None
        for i in range(200):
            nq_update_colour(froggy, f"w{i}")
            db.session.commit()
        gc.collect()
        tracemalloc.start()
        try:
            before = _snapshot()
            for i in range(transactions):
                nq_update_colour(froggy, f"c{i}")
                db.session.commit()
            gc.collect()
            growth = _snapshot().compare_to(before, "filename")
            retained = sum(stat.size_diff for stat in growth)
            largest = {
                _short(stat.traceback[0].filename): stat.size_diff
                for stat in sorted(growth, key=lambda stat: -stat.size_diff)[:3]
            }
            retained_by_notifyqueue = sum(
                stat.size_diff
                for stat in growth
                if stat.traceback[0].filename.startswith(package)
            )
            peaks = {}
            for side in ("notifyqueue", "naive"):
                froggy.id  # noqa: B018  (reload it outside the measurement)
                gc.collect()
                tracemalloc.reset_peak()
                start = tracemalloc.get_traced_memory()[0]
                for i in range(intents):
                    if side == "notifyqueue":
                        nq_update_colour(froggy, f"p{i}")
                    else:
                        naive_update_colour(froggy, f"p{i}")
                peak = tracemalloc.get_traced_memory()[1]
                peaks[side] = (peak - start) / intents
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
        "retained bytes allocated by notifyqueue": retained_by_notifyqueue,
        "retained bytes, largest by file": largest,
        "intents": intents,
        "peak bytes per intent": peaks,
    }


def _snapshot() -> tracemalloc.Snapshot:
    """What is allocated now, less tracemalloc's own bookkeeping."""
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def _short(filename: str) -> str:
    """A path from its package on: ``sqlalchemy/pool/base.py``."""
    parts = Path(filename).parts
    for marker in ("site-packages", "lib"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    return filename
