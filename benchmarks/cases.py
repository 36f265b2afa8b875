"""The benchmark cases: B1-B4, each against the naive queue of :mod:`.naive`;
B5, the request time of the sample app against a slow mail server; B6, the
outbox drainer's throughput.

Every timing is taken pair by pair in one process: notifyqueue, the naive
queue and (where it applies) the bare transaction run one after the other in
each repeat, so a ratio compares runs that met the same machine state.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import logging
import re
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import typing as t
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event, select
from werkzeug.serving import WSGIRequestHandler, make_server

import notifyqueue
from notifyqueue import Channel, Intent, NotifyQueue, deferred_notify, outbox
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


def sqlite_url(directory: str, name: str = "benchmarks") -> str:
    return f"sqlite:///{directory}/{name}.db"


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
        # The whole transaction, commit included and nothing subtracted.
        "whole ratio": statistics.median(
            ours / theirs
            for ours, theirs in zip(times["notifyqueue"], times["naive"], strict=True)
        ),
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
            whole = []
            for _ in range(repeats):
                sample = _sample(froggy, intents, transactions)
                bares.append(sample["bare"])
                for side, side_costs in costs.items():
                    side_costs.append(sample[side])
                ratios.append(sample["notifyqueue"] / sample["naive"])
                whole.append(sample["whole ratio"])
            rows.append(
                {
                    "intents": intents,
                    "transactions per sample": transactions,
                    "bare transaction": Spread.of(bares).as_dict(),
                    "notifyqueue per intent": Spread.of(costs["notifyqueue"]).as_dict(),
                    "naive per intent": Spread.of(costs["naive"]).as_dict(),
                    "ratio": Spread.of(ratios).as_dict(),
                    "whole transaction ratio": Spread.of(whole).as_dict(),
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

    ``notifyqueue background`` is the decorated endpoint on a second app whose
    channels are all ``"delivery": "background"``: the request's own cost of
    handing its intents off. After each of its requests the pool is waited
    for, untimed, so its work does not land in the next side's request.
    ``notifyqueue durable`` is the decorated endpoint on a third app whose
    mail channel is ``"durable": True`` (still inline): its ratio is to
    ``notifyqueue`` (the same, not durable), and ``statements`` lists what
    one request of each of the two sends to the database (after the timed
    samples), split at the request's COMMIT: the outbox's extra cost is one
    INSERT before it and the settlement (a DELETE) after it.

    The log channel's records go to a handler that drops them; mail is
    suppressed. The sample's own receivers (which log the commit and each
    email) are disconnected, so only notifyqueue's work differs.
    """
    from notifyqueue import signals, testing
    from sample_app import DEFAULT_CONFIG, create_app, froggies, logs, views

    config = {"SQLALCHEMY_DATABASE_URI": database_url, "MAIL_SERVER": None}
    app = create_app(config)
    background = create_app(config | {"NOTIFYQUEUE_DELIVERY": "background"})
    channels = DEFAULT_CONFIG["NOTIFYQUEUE_CHANNELS"]
    durable = create_app(
        config
        | {
            "NOTIFYQUEUE_CHANNELS": {
                "log": channels["log"],
                "mail": channels["mail"] | {"durable": True},
            }
        }
    )
    # Both apps share the logger of their name, sample_app.
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
    with durable.app_context():
        outbox.metadata.drop_all(db.engine)
        outbox.create(db.engine)
    path = f"/froggies/{froggy_id}/colour"
    sides = {
        "notifyqueue": (decorated, app.test_client()),
        "notifyqueue background": (decorated, background.test_client()),
        "undecorated": (undecorated, app.test_client()),
        "notifyqueue durable": (decorated, durable.test_client()),
    }
    names = list(sides)

    def sample() -> dict[str, float]:
        """Median seconds per request of each side, the three taking turns
        request by request in a rotating order (a median: a SQLite COMMIT's
        fsync now and then takes ten times the usual)."""
        times: dict[str, list[float]] = {side: [] for side in sides}
        for i in range(requests):
            for k in range(len(names)):
                side = names[(i + k) % len(names)]
                function, client = sides[side]
                vars(views)["update_froggy_colour"] = function
                started = time.perf_counter()
                response = client.put(path, json={"colour": f"{side} {i}"})
                times[side].append(time.perf_counter() - started)
                assert response.status_code == 200, response.json
                if side == "notifyqueue background":
                    testing.wait(background)
        return {side: statistics.median(spent) for side, spent in times.items()}

    try:
        sample()
        times: dict[str, list[float]] = {side: [] for side in sides}
        ratios: dict[str, list[float]] = {
            "notifyqueue": [],
            "background": [],
            "durable": [],
        }
        for _ in range(repeats):
            medians = sample()
            for side, median in medians.items():
                times[side].append(median)
            ratios["notifyqueue"].append(
                medians["notifyqueue"] / medians["undecorated"]
            )
            ratios["background"].append(
                medians["notifyqueue background"] / medians["undecorated"]
            )
            ratios["durable"].append(
                medians["notifyqueue durable"] / medians["notifyqueue"]
            )
        stats = notifyqueue.background_stats(background)
        vars(views)["update_froggy_colour"] = decorated
        statements = {
            side: _statements(served, sides[side][1], path, f"{side} counted")
            for side, served in (("notifyqueue", app), ("notifyqueue durable", durable))
        }
        with durable.app_context(), db.engine.connect() as connection:
            left = connection.execute(
                select(sa.func.count()).select_from(outbox.table)
            ).scalar_one()
    finally:
        vars(views)["update_froggy_colour"] = decorated
        testing.shutdown(background)
        for other in (background, durable):
            with other.app_context():
                db.engine.dispose()
        with app.app_context():
            db.session.remove()
            db.drop_all()
            outbox.metadata.drop_all(db.engine)
            db.engine.dispose()
    if stats.failed or stats.inline_fallbacks or stats.delivered != stats.handed_off:
        raise RuntimeError(f"B2: background delivery went wrong: {stats}")
    if left:
        raise RuntimeError(f"B2: {left} rows left in the durable app's outbox")
    inline, durable_statements = (
        statements["notifyqueue"],
        statements["notifyqueue durable"],
    )
    return {
        "requests per sample": requests,
        "notifyqueue": Spread.of(times["notifyqueue"]).as_dict(),
        "undecorated": Spread.of(times["undecorated"]).as_dict(),
        "ratio": Spread.of(ratios["notifyqueue"]).as_dict(),
        "notifyqueue background": Spread.of(times["notifyqueue background"]).as_dict(),
        "background ratio": Spread.of(ratios["background"]).as_dict(),
        "notifyqueue durable": Spread.of(times["notifyqueue durable"]).as_dict(),
        "durable ratio": Spread.of(ratios["durable"]).as_dict(),
        "statements": statements,
        "durable extra statements": {
            part: _extra(durable_statements[part], inline[part])
            for part in ("in the transaction", "after the commit")
        },
    }


def _statements(
    app: Flask, client: t.Any, path: str, colour: str
) -> dict[str, list[str]]:
    """What one request sends to the database, as ``VERB table`` (``COMMIT``
    for a commit), split at the request's COMMIT: ``"in the transaction"``
    (the COMMIT included) and ``"after the commit"``."""
    with app.app_context():
        engine = db.engine
    sent: list[str] = []

    def statement(*args: t.Any) -> None:
        sent.append(_label(args[2]))

    def commit(connection: t.Any) -> None:
        sent.append("COMMIT")

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        response = client.put(path, json={"colour": colour})
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
    if response.status_code != 200 or response.json["notifications"]["failed"]:
        raise RuntimeError(f"B2: PUT {path} answered {response.status_code}")
    end = sent.index("COMMIT") + 1 if "COMMIT" in sent else len(sent)
    return {"in the transaction": sent[:end], "after the commit": sent[end:]}


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def _label(statement: str) -> str:
    """``INSERT notifyqueue_outbox``, ``SELECT froggy``, ``BEGIN IMMEDIATE``..."""
    words = statement.split()
    verb = words[0].upper() if words else "?"
    if verb == "BEGIN":
        return " ".join(words).upper()
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1)}" if table else verb


def _extra(these: list[str], those: list[str]) -> list[str]:
    """The statements of ``these`` that ``those`` does not have (as multisets)."""
    return list((Counter(these) - Counter(those)).elements())


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


# -- B5: response time with a slow mail server ----------------------------------


B5_CONFIGS = ("background", "no mail", "inline")
"""B5's apps: the sample's mail channel on ``"delivery": "background"``,
disabled, and on ``"inline"``."""


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        pass  # an access-log line per request is not what is measured


@contextlib.contextmanager
def _serve(app: Flask) -> t.Iterator[tuple[str, int]]:
    """Serve ``app`` on a free loopback port, one thread per request."""
    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.port
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _put_colour(address: tuple[str, int], path: str, colour: str) -> float:
    """Seconds for one ``PUT`` of a colour on a new connection, as a client
    sees them: from the connection to the last byte of the answer."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request(
            "PUT",
            path,
            json.dumps({"colour": colour}),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    spent = time.perf_counter() - started
    if response.status != 200 or json.loads(body)["notifications"]["failed"]:
        raise RuntimeError(f"B5: PUT {path} answered {response.status}: {body!r}")
    return spent


def b5_slow_mail(
    database_url: str,
    requests: int,
    repeats: int,
    inline_requests: int,
    delay: float = 1.0,
    threads: int = 16,
) -> dict[str, t.Any]:
    """The sample's colour endpoint (a log and a mail intent) through a real
    threaded HTTP server, against an SMTP server (aiosmtpd, in a process of
    its own) that stalls ``delay`` seconds before answering each DATA.

    Three apps of the sample, each on its own server: mail on
    ``"delivery": "background"`` (``threads`` pool threads), mail disabled
    (``"enabled": False``: an app without the channel at all answers the
    endpoint with a 500, as its function names the channel), and mail
    ``"inline"``. Requests are sequential, each on a new connection;
    background and no mail take turns request by request, ``requests`` pairs
    per sample (their figures and ratio are spreads of ``repeats`` sample
    medians), and the ``inline_requests`` (over ``delay`` each; their figure
    is a spread of single requests) fall evenly between them. The pool's
    threads work throughout, beside both sides' requests: the ratio is the
    request's own cost of rendering and handing its email off.

    Afterwards every email committed must have reached the server exactly
    once, counted by its ``X-Notifyqueue-Intent`` header.
    """
    from notifyqueue import signals, testing
    from sample_app import DEFAULT_CONFIG, create_app

    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.smtp_sink"]
        + ["--data-delay", str(delay), "--ids"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert server.stdin is not None and server.stdout is not None
    committed: list[Intent] = []

    def record(sender: Flask, *, intents: list[Intent], **kwargs: t.Any) -> None:
        committed.extend(intents)  # list.extend is atomic

    apps: dict[str, Flask] = {}
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("B5: the SMTP server did not start (see its stderr)")
        port = int(line)
        channels = DEFAULT_CONFIG["NOTIFYQUEUE_CHANNELS"]
        mail_options = {
            "background": {"delivery": "background"},
            "no mail": {"enabled": False},
            "inline": {"delivery": "inline"},
        }
        for config in B5_CONFIGS:
            apps[config] = app = create_app(
                {
                    "SQLALCHEMY_DATABASE_URI": database_url,
                    "MAIL_SERVER": "127.0.0.1",
                    "MAIL_PORT": port,
                    "MAIL_SUPPRESS_SEND": False,
                    "NOTIFYQUEUE_CHANNELS": {
                        "log": channels["log"],
                        "mail": channels["mail"] | mail_options[config],
                    },
                    "NOTIFYQUEUE_BACKGROUND_THREADS": threads,
                }
            )
            signals.batch_committed.connect(record, sender=app, weak=False)
        # The three apps share one database, and the logger of their name.
        app = apps["no mail"]
        app.logger.handlers[:] = [logging.NullHandler()]
        app.logger.propagate = False
        with app.app_context():
            db.drop_all()
            db.create_all()
            db.session.add(Froggy(name="kermit", colour="green", is_jumping=False))
            db.session.commit()
            froggy_id = db.session.scalars(select(Froggy.id)).one()
            db.session.remove()
        path = f"/froggies/{froggy_id}/colour"
        with contextlib.ExitStack() as stack:
            addresses = {
                config: stack.enter_context(_serve(served))
                for config, served in apps.items()
            }
            for config in B5_CONFIGS:  # warm up
                _put_colour(addresses[config], path, f"warm-up {config}")
            pairs = requests * repeats
            inline_at = {
                (pairs * (2 * k + 1)) // (2 * inline_requests)
                for k in range(inline_requests)
            }
            times: dict[str, list[float]] = {config: [] for config in B5_CONFIGS}
            medians: dict[str, list[float]] = {"background": [], "no mail": []}
            ratios = []
            for n in range(pairs):
                if n in inline_at:
                    times["inline"].append(
                        _put_colour(addresses["inline"], path, f"inline {n}")
                    )
                order = ("background", "no mail")
                for config in order if n % 2 == 0 else order[::-1]:
                    times[config].append(
                        _put_colour(addresses[config], path, f"{config} {n}")
                    )
                if n % requests == requests - 1:
                    for config, config_medians in medians.items():
                        config_medians.append(
                            statistics.median(times[config][-requests:])
                        )
                    ratios.append(medians["background"][-1] / medians["no mail"][-1])
        background = apps["background"]
        handed_off = notifyqueue.background_stats(background).handed_off
        started = time.perf_counter()
        testing.wait(background, timeout=delay * (handed_off / threads + 2) + 30)
        settled = time.perf_counter() - started
        stats = notifyqueue.background_stats(background)
    finally:
        for app in apps.values():
            signals.batch_committed.disconnect(record, sender=app)
        if "background" in apps:
            testing.shutdown(apps["background"])
        for app in apps.values():
            with app.app_context():
                db.session.remove()
                db.drop_all()
                db.engine.dispose()
        server.stdin.close()
        received = server.stdout.readline()
        ids = server.stdout.readline()
        server.wait(timeout=30)
    arrived: dict[str, int] = json.loads(ids or "{}")
    expected = {intent.id for intent in committed if intent.channel == "mail"}
    wrong = {
        intent_id: arrived.get(intent_id, 0)
        for intent_id in expected | arrived.keys()
        if arrived.get(intent_id, 0) != (1 if intent_id in expected else 0)
    }
    if wrong:
        raise RuntimeError(
            f"B5: the server received {received.strip()} emails for {len(expected)}"
            f" committed; intent id -> times received, where not once: {wrong}"
        )
    no_mail = Spread.of(medians["no mail"])
    inline = Spread.of(times["inline"])
    return {
        "requests per sample": requests,
        "inline requests": inline_requests,
        "smtp data delay": delay,
        "background threads": threads,
        "background": Spread.of(medians["background"]).as_dict(),
        "no mail": no_mail.as_dict(),
        "inline": inline.as_dict(),
        "background ratio": Spread.of(ratios).as_dict(),
        "inline ratio": inline.median / no_mail.median,
        "emails expected": len(expected),
        "emails received": int(received or 0),
        "seconds to settle": settled,
        "background stats": asdict(stats),
    }


# -- B6: drainer throughput -------------------------------------------------------


class CountingChannel(Channel):
    """The do-nothing channel, durable in B6: it keeps the id of each intent."""

    delivered: t.ClassVar[list[str]] = []

    def send(self, intents: t.Sequence[Intent]) -> None:
        self.delivered.extend(intent.id for intent in intents)


def b6_drainer(
    database_url: str,
    rows: int,
    repeats: int,
    per_commit: t.Sequence[int] = (1, 10),
    batch: int = 100,
) -> dict[str, t.Any]:
    """Intents per second one ``drain(app, once=True, batch=batch)`` delivers
    from an outbox of ``rows`` due rows, to a durable do-nothing channel.

    The rows are inserted directly (``pending``, due), ``per_commit`` of them
    to a commit (the drainer sends and settles each commit's rows together);
    the layouts take turns, ``repeats`` runs each. Timed: the drain call,
    from its first claim to its last settlement. Afterwards every row must
    have been delivered exactly once and the outbox be empty. On SQLite the
    database is in WAL mode (as the README advises beside drainers), with
    SQLite's default synchronous setting; on PostgreSQL the table is
    vacuumed and analysed before each run.
    """
    app = Flask("benchmarks_drainer")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        NOTIFYQUEUE_CHANNELS={
            "null": {"type": "benchmarks.cases:CountingChannel", "durable": True}
        },
    )
    db.init_app(app)
    NotifyQueue(app)
    template = Intent.new("null", "Froggy colour updated: 1; new value: c", "enqueue")
    times: dict[int, list[float]] = {size: [] for size in per_commit}
    with app.app_context():
        engine = db.engine
        dialect = engine.dialect.name
        if dialect == "sqlite":
            with engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        outbox.metadata.drop_all(engine)
        outbox.create(engine)
        db.session.remove()
    try:
        for repeat in range(repeats):
            order = list(per_commit) if repeat % 2 == 0 else list(per_commit)[::-1]
            for size in order:
                _fill_outbox(engine, template, rows, size)
                CountingChannel.delivered.clear()
                started = time.perf_counter()
                stats = outbox.drain(app, once=True, batch=batch)
                times[size].append(time.perf_counter() - started)
                delivered = CountingChannel.delivered
                with engine.connect() as connection:
                    left = connection.execute(
                        select(sa.func.count()).select_from(outbox.table)
                    ).scalar_one()
                if (
                    stats.claimed != rows
                    or stats.delivered != rows
                    or len(delivered) != rows
                    or len(set(delivered)) != rows
                    or left
                ):
                    raise RuntimeError(
                        f"B6: {rows} rows, {size} per commit: {stats},"
                        f" {len(delivered)} sends ({len(set(delivered))} intents),"
                        f" {left} rows left"
                    )
    finally:
        CountingChannel.delivered.clear()
        outbox.metadata.drop_all(engine)
        engine.dispose()
    return {
        "rows": rows,
        "batch": batch,
        "runs": repeats,
        **{
            f"{size} per commit": {
                "seconds": Spread.of(times[size]).as_dict(),
                "intents per second": Spread.of(
                    [rows / spent for spent in times[size]]
                ).as_dict(),
            }
            for size in per_commit
        },
    }


def _fill_outbox(engine: sa.Engine, template: Intent, rows: int, size: int) -> None:
    """``rows`` due ``pending`` rows, ``size`` to a commit, as the write path
    makes them (an intent of ``template``'s, each with an id of its own)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        ) as connection:
            connection.exec_driver_sql(f"VACUUM ANALYZE {outbox.TABLE_NAME}")
    created = datetime.now(timezone.utc) - timedelta(minutes=1)
    data = template.to_dict()
    values = []
    commit_id = ""
    for n in range(rows):
        intent_id = f"{template.id[:20]}{n:012x}"
        if n % size == 0:
            commit_id = intent_id
        values.append(
            {
                "intent_id": intent_id,
                "commit_id": commit_id,
                "position": n % size,
                "channel": template.channel,
                "intent": json.dumps(data | {"id": intent_id}),
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": created,
                "created_at": created,
            }
        )
    with engine.begin() as connection:
        connection.execute(outbox.table.insert(), values)
