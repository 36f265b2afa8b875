"""Property-based tests of the sample app's endpoints: whatever arrives, the app
answers 2xx or 4xx, never 5xx, and its database and notifications agree.

Hypothesis sends arbitrary JSON, near-valid bodies and raw bytes to every
endpoint (those that read no body get one too), about existing and missing
froggy ids. Each example starts from the same three froggies, so a failure
replays and shrinks. The app, its database and the SMTP server are shared by
the examples of one test, so each check compares the state after the request
with the state before it. An independent oracle (``expected_statuses``) says
which answers the input allows, and a model of each endpoint says what a 2xx
must have changed and notified.
"""

from __future__ import annotations

import json
import logging
import os
import typing as t
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete

from sample_app import create_app
from sample_app.extensions import db
from sample_app.models import Froggy

from .conftest import SMTPServer
from .load import LogRecords
from .test_sample_app import table

MAX_ID = 2**31 - 1
MAX_BODY = 64 * 1024  # the sample app's MAX_CONTENT_LENGTH
LIMITS = {"name": 80, "colour": 32, "jump_height": 32}
OPERATIONS = ("create", "colour", "jump")

# Every example starts from these rows. The ids are far above any id a
# PostgreSQL sequence reaches in a test run, so a created froggy never takes one.
SEED: tuple[dict[str, t.Any], ...] = (
    {
        "id": 1_000_001,
        "name": "Kermit",
        "colour": "green",
        "is_jumping": False,
        "jump_height": None,
    },
    {
        "id": 1_000_002,
        "name": "Freddie",
        "colour": "blue",
        "is_jumping": True,
        "jump_height": "1 metre",
    },
    {
        "id": 1_000_003,
        "name": "Hoppy",
        "colour": "yellow",
        "is_jumping": False,
        "jump_height": None,
    },
)
SEED_IDS = [row["id"] for row in SEED]

SUBJECTS = {"colour": "Froggy colour updated", "jump": "Made froggy jump"}


def log_line(kind: str, froggy_id: int, value: str) -> str:
    if kind == "colour":
        return f"Froggy colour updated: {froggy_id}; new value: {value}"
    return f"Made froggy jump: {froggy_id}; jump height: {value}"


def mail_body(kind: str, froggy_id: int, value: str) -> str:
    if kind == "colour":
        return f"Froggy: {froggy_id}; new colour: {value}"
    return f"Froggy: {froggy_id}; jump height: {value}"


# -- fixtures --------------------------------------------------------------


@pytest.fixture
def app(database_url: str, smtp_server: SMTPServer) -> t.Iterator[Flask]:
    """The sample app, not in TESTING mode: an unhandled error becomes a 500."""
    app = create_app(
        {"SQLALCHEMY_DATABASE_URI": database_url, "PROPAGATE_EXCEPTIONS": False}
        | smtp_server.config()
    )
    yield app
    with app.app_context():
        db.session.remove()
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def records(app: Flask) -> t.Iterator[LogRecords]:
    """The records of the app's logger (its log channel too) and notifyqueue's."""
    handler = LogRecords()
    loggers = [app.logger, logging.getLogger("notifyqueue")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def reset(app: Flask) -> None:
    """Replace every froggy with the seed rows (no notification involved)."""
    with app.app_context():
        db.session.execute(delete(Froggy))
        db.session.add_all(Froggy(**row) for row in SEED)
        db.session.commit()
        db.session.remove()


# -- strategies ------------------------------------------------------------

EDGE_INTS = [
    0,
    -1,
    1,
    MAX_ID,
    MAX_ID + 1,
    -(2**31),
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    2**64,
]
FIELDS = ["name", "colour", "jump_height", "id", "op", "operations"]
# Strings at and around the checks: empty, blank, control characters, the
# length limits counted in characters (not bytes), lookalikes.
EDGE_TEXTS = [
    "",
    " ",
    "red",
    "red ",
    " red",
    "\x00",
    "red\x00",
    "a\nb",
    "a\rb",
    "\t",
    "\x7f",
    "\x85",
    "\u00a0",
    "\u2028",
    "\ufeff",
    "\U0001f438",
    "Kermit",
    "kermit",
    "Kermit ",
    "Twin",
    "{froggy.id}",
    "{0}",
    "%s %d",
    "x" * 32,
    "x" * 33,
    "x" * 80,
    "x" * 81,
    "\u00e9" * 32,
    "\u00e9" * 33,
    "\U0001f438" * 32,
    "\U0001f438" * 33,
    "\U0001f438" * 80,
    "\U0001f438" * 81,
]

# Any code point: controls, NUL, unassigned, and lone surrogates (sent as
# \ud800 escapes, or as surrogatepass bytes that json.loads also decodes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
texts = st.one_of(st.sampled_from(EDGE_TEXTS), any_text, st.text(max_size=90))
keys = st.one_of(st.sampled_from(FIELDS), any_text)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    # up to about the most digits Python's int() parses
    st.sampled_from([100, 4000]).map(lambda digits: 10**digits),
    st.floats(),  # nan and infinities included: json.loads accepts them
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def weighted(
    *choices: tuple[int, st.SearchStrategy[t.Any]],
) -> st.SearchStrategy[t.Any]:
    """Draw from one of the strategies, each as often as its weight says.

    It shrinks towards the first, so list the valid choice first.
    """
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


PRINTABLE = st.characters(exclude_categories=["C", "Z"], include_characters=" ")
# What a name, colour or height must not contain: controls, format characters,
# surrogates, unassigned code points, line and paragraph separators, and every
# space but " ".
UNPRINTABLE = st.characters(
    codec=None, categories=["C", "Z"], exclude_characters=" "
) | st.sampled_from(["\x00", "\n", "\r", "\t", "\x7f", "\x85", "\u00a0"])


def field_values(field: str, rarity: int = 7) -> st.SearchStrategy[t.Any]:
    """Values for a text field: valid ``rarity`` times in ``rarity + 3``; else
    just past a check (one character too many, one unprintable), or anything."""
    limit = LIMITS[field]
    valid = st.one_of(
        st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1),
        st.text(PRINTABLE, min_size=1, max_size=limit),
    ).filter(lambda text: len(text) <= limit)
    # Length is counted in characters: the full width is valid in every script.
    widths = st.sampled_from(["x", "\u00e9", "\U0001f438"]).flatmap(
        lambda char: st.sampled_from([char * limit, char * (limit + 1)])
    )
    spoilt = st.builds(
        lambda text, char, at: text[:at] + char + text[at:],
        valid,
        UNPRINTABLE,
        st.integers(0, limit),
    )
    edges = st.one_of(widths, spoilt, st.just(""))
    return weighted((rarity, valid), (2, edges), (1, st.one_of(texts, json_scalars)))


def froggy_ids(rarity: int) -> st.SearchStrategy[t.Any]:
    """Ids for a batch: a seed froggy's ``rarity`` times in ``rarity + 5``."""
    return weighted(
        (rarity, st.sampled_from(SEED_IDS)),
        # just above the seed (sqlite) or low (a PostgreSQL sequence): the ids
        # a froggy created earlier in the same batch gets
        (1, st.integers(SEED_IDS[-1] + 1, SEED_IDS[-1] + 3) | st.integers(1, 40)),
        # out of range, or not quite an integer
        (1, st.sampled_from(EDGE_INTS) | st.integers()),
        (2, st.sampled_from([True, False, 1_000_001.0, "1000001", None])),
    )


def names(rarity: int = 7) -> st.SearchStrategy[t.Any]:
    """Names: often one that is taken, or "Twin" (which a batch may repeat)."""
    taken = st.sampled_from([row["name"] for row in SEED] + ["Twin"])
    return weighted((4, field_values("name", rarity)), (1, taken))


@st.composite
def near_valid(
    draw: st.DrawFn,
    required: dict[str, st.SearchStrategy[t.Any]],
    optional: dict[str, st.SearchStrategy[t.Any]] | None = None,
    rarity: int = 5,
) -> dict[str, t.Any]:
    """A JSON object with the right fields; once in ``rarity`` one is dropped or
    an unknown one added."""
    body = draw(st.fixed_dictionaries(required, optional=optional or {}))
    mutation = draw(st.sampled_from(["none"] * (2 * rarity - 2) + ["drop", "add"]))
    if mutation == "drop" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif mutation == "add":
        body[draw(keys)] = draw(json_values)
    return body


def operations() -> st.SearchStrategy[t.Any]:
    """Operations of a batch: mostly well-formed, on existing froggies."""
    create = near_valid(
        {"op": st.just("create"), "name": names(60)},
        {"colour": field_values("colour", 60)},
        rarity=30,
    )
    colour = near_valid(
        {
            "op": st.just("colour"),
            "id": froggy_ids(12),
            "colour": field_values("colour", 60),
        },
        rarity=30,
    )
    jump = near_valid(
        {
            "op": st.just("jump"),
            "id": weighted((29, froggy_ids(12)), (1, json_scalars)),
            "jump_height": field_values("jump_height", 60),
        },
        rarity=30,
    )
    wrong_op = near_valid(
        {"op": json_scalars, "id": froggy_ids(12), "colour": field_values("colour")}
    )
    return weighted(
        (28, st.one_of(create, colour, jump)), (1, wrong_op), (1, json_values)
    )


def bodies(endpoint: str) -> st.SearchStrategy[t.Any]:
    """What to send: near-valid bodies for the endpoint, or any JSON at all."""
    near: st.SearchStrategy[t.Any]
    if endpoint == "create":
        near = near_valid({"name": names()}, {"colour": field_values("colour")})
    elif endpoint == "colour":
        near = near_valid({"colour": field_values("colour")})
    elif endpoint == "jump":
        near = near_valid({"jump_height": field_values("jump_height")})
    elif endpoint == "batch":
        near = near_valid(
            {
                "operations": weighted(
                    (9, st.lists(operations(), min_size=1, max_size=5)),
                    (1, st.lists(operations(), max_size=102)),
                )
            },
            rarity=10,
        )
    else:  # brightpink-and-highjump and reading take no body
        near = st.none()
    return weighted((4, near), (1, json_values))


@dataclass(frozen=True)
class Call:
    """One HTTP request to an endpoint of ``ROUTES``.

    ``segment`` is the froggy id as the path spells it.
    """

    endpoint: str
    method: str
    path: str
    segment: str | None
    data: bytes
    content_type: str | None


JSON_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/merge-patch+json",
]
OTHER_TYPES = [None, "text/plain", "application/x-www-form-urlencoded"]
ENCODINGS = ["json"] * 14 + [
    "utf-16",
    "bom",
    "raw",
    "truncated",
    "wrong type",
    "too large",
    "digits",
]


@st.composite
def payloads(draw: st.DrawFn, endpoint: str) -> tuple[bytes, str | None]:
    """The body's bytes and Content-Type: mostly JSON, sometimes not at all."""
    value = draw(bodies(endpoint))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    data = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(ENCODINGS))
    content_type: str | None = draw(st.sampled_from(JSON_TYPES))
    if how == "utf-16":  # json.loads detects UTF-16 and UTF-32 by the zero bytes
        codec = draw(st.sampled_from(["utf-16-le", "utf-32-be"]))
        data = text.encode(codec, "surrogatepass")
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    elif how == "raw":
        data = draw(st.binary(max_size=40))
    elif how == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif how == "wrong type":
        content_type = draw(st.sampled_from(OTHER_TYPES))
    elif how == "too large":
        data += b" " * MAX_BODY
    elif how == "digits":
        # More digits than Python's int() parses: json.loads refuses it.
        data = b'{"operations": [{"op": "colour", "id": ' + b"9" * 5000 + b"}]}"
    return data, content_type


ODD_SEGMENTS = [
    "0",
    "-1",
    "01000001",
    str(MAX_ID),
    str(MAX_ID + 1),
    "\u0661\u0660\u0660\u0660\u0660\u0660\u0661",  # 1000001 in Arabic-Indic digits
    "1000001.0",
    " 1000001",
]
path_segments = weighted(
    (6, st.sampled_from([str(i) for i in SEED_IDS])),
    (1, st.sampled_from(ODD_SEGMENTS)),
    (1, st.integers(min_value=-(10**40), max_value=10**40).map(str)),
    (1, st.text(max_size=8)),
)
ROUTES = {
    "create": ("POST", "/froggies"),
    "colour": ("PUT", "/froggies/{}/colour"),
    "jump": ("POST", "/froggies/{}/jump"),
    "brightpink": ("POST", "/froggies/{}/brightpink-and-highjump"),
    "batch": ("POST", "/batch"),
    "read": ("GET", "/froggies/{}"),
}


@st.composite
def calls(draw: st.DrawFn, endpoint: str) -> Call:
    method, route = ROUTES[endpoint]
    segment = draw(path_segments) if "{}" in route else None
    data, content_type = draw(payloads(endpoint))
    path = route.format(None if segment is None else quote(segment, safe=""))
    return Call(endpoint, method, path, segment, data, content_type)


# -- the oracle ------------------------------------------------------------

_NOT_JSON = object()


def parsed(call: Call) -> t.Any:
    """The body as Python's json (Flask's parser) reads it, or ``_NOT_JSON``."""
    try:
        return json.loads(call.data)
    except (ValueError, RecursionError):
        return _NOT_JSON


def body_error(call: Call) -> int | None:
    """The status for a body that is not JSON at all, or None."""
    content_type = (call.content_type or "").split(";")[0]
    if not (
        content_type == "application/json"
        or (content_type.startswith("application/") and content_type.endswith("+json"))
    ):
        return 415
    if len(call.data) > MAX_BODY:
        return 413
    if parsed(call) is _NOT_JSON:
        return 400
    return None


def valid_text(value: t.Any, field: str) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= LIMITS[field]
        and value.isprintable()
    )


def valid_id(value: t.Any) -> bool:
    return type(value) is int and 1 <= value <= MAX_ID


def valid_object(value: t.Any, required: set[str], optional: set[str]) -> bool:
    return (
        isinstance(value, dict)
        and required <= set(value) <= required | optional
        and all(
            valid_id(item) if key == "id" else valid_text(item, key)
            for key, item in value.items()
        )
    )


def valid_operation(value: t.Any) -> bool:
    if not isinstance(value, dict) or value.get("op") not in OPERATIONS:
        return False
    fields = {key: item for key, item in value.items() if key != "op"}
    if value["op"] == "create":
        return valid_object(fields, {"name"}, {"colour"})
    return valid_object(
        fields, {"id", "colour" if value["op"] == "colour" else "jump_height"}, set()
    )


def valid_batch(value: t.Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"operations"}
        and isinstance(value["operations"], list)
        and 1 <= len(value["operations"]) <= 100
        and all(map(valid_operation, value["operations"]))
    )


def batch_statuses(operations: list[dict[str, t.Any]]) -> set[int]:
    """The answers a valid batch allows, run against the seed rows.

    An id the seed lacks may name a froggy an earlier operation created
    (its id is assigned at the flush), so both outcomes are allowed then.
    """
    statuses = set()
    taken = {row["name"] for row in SEED}
    duplicate = created = False
    for operation in operations:
        if operation["op"] == "create":
            duplicate |= operation["name"] in taken
            taken.add(operation["name"])
            created = True
        elif operation["id"] not in SEED_IDS:
            # Looking the id up flushes the pending creates first.
            statuses.add(409 if duplicate else 404)
            if not created:
                return statuses
    return statuses | {409 if duplicate else 200}


def expected_statuses(call: Call) -> set[int]:
    """Every status the spec allows for this call on the seed rows."""
    endpoint = call.endpoint
    statuses: set[int] = set()
    froggy_id: int | None = None
    if call.segment is not None:
        segment = call.segment
        if not segment.isdecimal():
            return {404}  # no route: <int:...> takes decimal digits only
        if not segment.isascii():
            statuses.add(404)  # digits of another script: a route may refuse them
        if len(segment) > 4300:
            statuses.add(404)  # too long for int(): the route may not match
        else:
            froggy_id = int(segment)
    exists = froggy_id in SEED_IDS
    if endpoint in ("brightpink", "read"):  # the body is not read
        return statuses | {200 if exists else 404}
    error = body_error(call)
    if error is not None:
        return statuses | {error}
    body = parsed(call)
    if endpoint == "batch":
        if not valid_batch(body):
            return {400}
        return batch_statuses(body["operations"])
    if endpoint == "create":
        if not valid_object(body, {"name"}, {"colour"}):
            return {400}
        return {409 if body["name"] in {row["name"] for row in SEED} else 201}
    field = "colour" if endpoint == "colour" else "jump_height"
    if not valid_object(body, {field}, set()):
        return statuses | {400}
    return statuses | {200 if exists else 404}


# -- the checks ------------------------------------------------------------


@dataclass
class Change:
    """One notifying change a 2xx made: which notifications it owes."""

    kind: str  # "colour" or "jump"
    froggy_id: int
    value: str
    channels: tuple[str, ...] = ("log", "mail")


def model_after(
    call: Call, answer: dict[str, t.Any]
) -> tuple[list[dict[str, t.Any]], list[Change]]:
    """The rows a 2xx must have left, and the notifications it owes.

    Checks the answer's own rows against the request on the way.
    """
    endpoint = call.endpoint
    rows = {row["id"]: dict(row) for row in SEED}
    changes: list[Change] = []

    def change(kind: str, froggy_id: int, value: str) -> None:
        assert froggy_id in rows, f"{kind} of froggy {froggy_id}, which is not there"
        if kind == "colour":
            rows[froggy_id]["colour"] = value
        else:
            rows[froggy_id] |= {"is_jumping": True, "jump_height": value}
        changes.append(Change(kind, froggy_id, value))

    def create(fields: dict[str, t.Any], row: dict[str, t.Any]) -> None:
        assert row["id"] not in rows, f"created froggy {row} reuses an id"
        rows[row["id"]] = {
            "id": row["id"],
            "name": fields["name"],
            "colour": fields.get("colour", "green"),
            "is_jumping": False,
            "jump_height": None,
        }

    if endpoint == "brightpink":
        froggy_id = int(t.cast(str, call.segment))
        change("colour", froggy_id, "bright_pink")
        change("jump", froggy_id, "50 metres")
        changes[0].channels = ("log",)
        answered = [answer["froggy"]]
    elif endpoint == "batch":
        operations = json.loads(call.data)["operations"]
        answered = answer["froggies"]
        assert len(answered) == len(operations)
        for operation, row in zip(operations, answered, strict=True):
            if operation["op"] == "create":
                create(operation, row)
            else:
                assert row["id"] == operation["id"]
                value = operation[
                    "colour" if operation["op"] == "colour" else "jump_height"
                ]
                change(operation["op"], operation["id"], value)
    elif endpoint == "create":
        create(json.loads(call.data), answer["froggy"])
        answered = [answer["froggy"]]
    elif endpoint == "read":
        assert list(answer) == ["froggy"]
        answered = [answer["froggy"]]
    else:
        froggy_id = int(t.cast(str, call.segment))
        (value,) = json.loads(call.data).values()
        change(endpoint, froggy_id, value)
        answered = [answer["froggy"]]
    # The answer shows each froggy as it was committed.
    assert answered == [rows[row["id"]] for row in answered]
    return sorted(rows.values(), key=lambda row: row["id"]), changes


def check_notifications(
    changes: list[Change],
    notifications: dict[str, t.Any],
    emails: list[t.Any],
    lines: list[logging.LogRecord],
) -> None:
    """Every dispatched intent delivered once, nothing more, nothing failed."""
    assert notifications["failed"] == [] and notifications["pending"] == []
    dispatched = notifications["dispatched"]
    logged = [c for c in changes if "log" in c.channels]
    mailed = [c for c in changes if "mail" in c.channels]
    # The log channel first, then mail (NOTIFYQUEUE_ORDER "channel").
    assert [d["channel"] for d in dispatched] == ["log"] * len(logged) + ["mail"] * len(
        mailed
    )
    ids = [d["id"] for d in dispatched]
    assert len(set(ids)) == len(ids)
    log_ids = ids[: len(logged)]
    mail_ids = ids[len(logged) :]

    # Each mail intent arrived exactly once, and no other email arrived.
    assert [m["X-Notifyqueue-Intent"] for m in emails] == mail_ids
    # SMTP carries the body with CRLF line ends.
    contents = [
        m.get_body(("plain",)).get_content().replace("\r\n", "\n").removesuffix("\n")
        for m in emails
    ]
    assert [(m["Subject"], c) for m, c in zip(emails, contents, strict=True)] == [
        (SUBJECTS[c.kind], mail_body(c.kind, c.froggy_id, c.value)) for c in mailed
    ]

    # The log channel wrote one line per log intent; the app logged the
    # commit and each email sent; notifyqueue logged no failure.
    channel_lines = [r for r in lines if hasattr(r, "notifyqueue_intent")]
    assert [r.notifyqueue_intent for r in channel_lines] == log_ids
    expected = [log_line(c.kind, c.froggy_id, c.value) for c in logged]
    expected += [f"Sent email: {SUBJECTS[c.kind]}" for c in mailed]
    if dispatched:
        expected.insert(0, "Committed DB transaction")
    assert [r.getMessage() for r in lines] == expected


def check_call(
    call: Call,
    app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    records: LogRecords,
) -> int:
    """Send one call from the seed rows; check its answer and what it changed.

    Returns the status.
    """
    reset(app)
    before = table(app)
    assert before == list(SEED)
    mails_before = len(smtp_server.messages)
    records_before = len(records.records)

    response = client.open(
        call.path, method=call.method, data=call.data, content_type=call.content_type
    )

    status = response.status_code
    answer = response.get_json(silent=True)
    assert status < 500, answer
    assert 200 <= status < 300 or 400 <= status < 500
    assert status in expected_statuses(call), answer
    after = table(app)
    emails = smtp_server.messages[mails_before:]
    lines = records.records[records_before:]
    if status >= 400:
        # Refused: a JSON error, and nothing changed or notified.
        assert response.is_json
        assert isinstance(answer, dict) and list(answer) == ["error"]
        assert isinstance(answer["error"], str) and answer["error"].strip()
        assert after == before, f"a refused request ({status}) changed the table"
        assert emails == [], f"a refused request ({status}) sent email"
        assert [r.getMessage() for r in lines] == [], f"a {status} logged"
    else:
        assert isinstance(answer, dict)
        expected_rows, changes = model_after(call, answer)
        assert after == expected_rows, "the table does not show what was answered"
        notifications = answer.get(
            "notifications", {"dispatched": [], "failed": [], "pending": []}
        )
        check_notifications(changes, notifications, emails, lines)
        for change in changes:
            read = client.get(f"/froggies/{change.froggy_id}")
            assert read.get_json() == {
                "froggy": next(r for r in after if r["id"] == change.froggy_id)
            }
        if call.endpoint == "create":
            location = f"/froggies/{answer['froggy']['id']}"
            assert response.headers["Location"] == location
    # The app goes on answering from what the database holds.
    listed = client.get("/froggies")
    assert listed.status_code == 200
    assert listed.get_json() == {"froggies": after}
    return status


# -- the tests -------------------------------------------------------------


def json_call(endpoint: str, body: t.Any = None, froggy: str | None = None) -> Call:
    """A JSON request to ``endpoint``, about the first seed froggy by default."""
    method, route = ROUTES[endpoint]
    segment = None
    if "{}" in route:
        segment = str(SEED_IDS[0]) if froggy is None else froggy
        route = route.format(quote(segment, safe=""))
    data = json.dumps(body).encode()
    return Call(endpoint, method, route, segment, data, "application/json")


def batch_of(*operations: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"operations": list(operations)}


KERMIT, FREDDIE, _ = SEED_IDS
FROG = "\U0001f438"  # four bytes in UTF-8, one character
# Every run tries these first: each check's edges, on every endpoint.
EXPLICIT: dict[str, list[Call]] = {
    "create": [
        json_call("create", {"name": "x" * 80, "colour": FROG * 32}),
        json_call("create", {"name": FROG * 80}),
        json_call("create", {"name": "x" * 81}),
        json_call("create", {"name": "Frog", "colour": "x" * 33}),
        json_call("create", {"name": "Frog\x00"}),
        json_call("create", {"name": "Frog", "size": 3}),
        json_call("create", {"name": "Kermit"}),
    ],
    "batch": [
        json_call(
            "batch",
            batch_of(
                {"op": "colour", "id": KERMIT, "colour": "x" * 32},
                {"op": "jump", "id": FREDDIE, "jump_height": FROG * 32},
                {"op": "create", "name": "x" * 80, "colour": "red"},
                {"op": "jump", "id": KERMIT, "jump_height": "1 metre"},
            ),
        ),
        json_call("batch", batch_of({"op": "jump", "id": True, "jump_height": "1"})),
        json_call("batch", batch_of({"op": "create", "name": "Frog", "id": 3})),
        json_call(
            "batch", batch_of({"op": "jump", "id": MAX_ID + 1, "jump_height": "1"})
        ),
        json_call(
            "batch", batch_of({"op": "colour", "id": KERMIT, "colour": "x" * 33})
        ),
        # a change, then a missing froggy or a taken name: all rolled back
        json_call(
            "batch",
            batch_of(
                {"op": "colour", "id": KERMIT, "colour": "red"},
                {"op": "jump", "id": MAX_ID, "jump_height": "1"},
            ),
        ),
        json_call(
            "batch",
            batch_of(
                {"op": "jump", "id": KERMIT, "jump_height": "1"},
                {"op": "create", "name": "Twin"},
                {"op": "create", "name": "Twin"},
            ),
        ),
        # the most operations a batch may have, and one more
        json_call(
            "batch",
            batch_of(
                *(
                    {"op": "create", "name": f"f{i}"}
                    if i % 2
                    else {"op": "colour", "id": FREDDIE, "colour": f"c{i}"}
                    for i in range(100)
                )
            ),
        ),
        json_call("batch", batch_of(*[{"op": "create", "name": "A"}] * 101)),
    ],
    "brightpink": [json_call("brightpink"), json_call("brightpink", froggy=str(2**63))],
    "read": [json_call("read"), json_call("read", froggy=str(2**63))],
}
for _endpoint, _field in (("colour", "colour"), ("jump", "jump_height")):
    EXPLICIT[_endpoint] = [
        json_call(_endpoint, {_field: "x" * 32}),
        json_call(_endpoint, {_field: FROG * 32}),
        json_call(_endpoint, {_field: "x" * 33}),
        json_call(_endpoint, {_field: "red\x00"}),
        json_call(_endpoint, {_field: "red", "name": "Frog"}),
        json_call(_endpoint, {_field: "red"}, froggy=str(MAX_ID + 1)),
        json_call(_endpoint, {_field: "red"}, froggy=str(2**63)),
    ]

# Generated examples: with both databases the module takes about 22 s on two
# cores. A batch has the most to get wrong, so it gets the most examples.
EXAMPLES = 450
any_calls = weighted(
    (2, calls("create")),
    (2, calls("colour")),
    (2, calls("jump")),
    (1, calls("brightpink")),
    (3, calls("batch")),
    (1, calls("read")),
)
# NOTIFYQUEUE_PROPERTY_EXAMPLES=20000 (say) hunts with that many fresh random
# examples; by default every run tries the same ones, so CI is not flaky.
HUNT = os.environ.get("NOTIFYQUEUE_PROPERTY_EXAMPLES")


def with_examples(
    explicit: list[Call],
) -> t.Callable[[t.Callable[..., None]], t.Callable[..., None]]:
    """``@example(call=...)`` for each call."""

    def decorate(test: t.Callable[..., None]) -> t.Callable[..., None]:
        for call in explicit:
            test = example(call=call)(test)
        return test

    return decorate


@settings(
    max_examples=int(HUNT) if HUNT else EXAMPLES,
    derandomize=not HUNT,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=any_calls)
@with_examples([call for group in EXPLICIT.values() for call in group])
def test_any_request_gets_a_2xx_or_4xx_and_a_consistent_outcome(
    app: Flask, smtp_server: SMTPServer, records: LogRecords, call: Call
) -> None:
    """Arbitrary and near-valid bodies to every endpoint, about existing and
    missing froggies: see :func:`check_call` for what is checked."""
    status = check_call(call, app, app.test_client(), smtp_server, records)
    # pytest --hypothesis-show-statistics shows how often each answer came.
    event(f"{call.endpoint} {status}")


@pytest.mark.parametrize("endpoint", ["colour", "jump", "brightpink", "read"])
def test_a_froggy_id_too_long_for_int_is_not_found(
    endpoint: str, app: Flask, smtp_server: SMTPServer, records: LogRecords
) -> None:
    """No froggy has an id that long: 404, like any other missing id."""
    body = {"colour": "red"} if endpoint == "colour" else {"jump_height": "1"}
    call = json_call(endpoint, body, froggy="9" * 5000)
    check_call(call, app, app.test_client(), smtp_server, records)
