"""End to end through the sample app: HTTP in, database, log and real SMTP out.

Every test runs on SQLite and on PostgreSQL, with a real SMTP server
(aiosmtpd) on loopback.
"""

from __future__ import annotations

import logging
import re
import typing as t

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from notifyqueue.testing import shutdown, wait
from sample_app import create_app
from sample_app.extensions import db
from sample_app.models import Froggy

from .conftest import SMTPServer

ADMINS = ["froggy-admins@example.com"]
SENDER = "froggy-api@example.com"


@pytest.fixture
def make_froggy_app() -> t.Iterator[t.Callable[[dict[str, t.Any]], Flask]]:
    """``create_app(config)``; each app's tables are dropped after the test."""
    apps: list[Flask] = []

    def make(config: dict[str, t.Any]) -> Flask:
        apps.append(create_app(config))
        return apps[-1]

    yield make
    for app in apps:
        shutdown(app)  # its background threads, if a test started them
        with app.app_context():
            db.session.remove()
            db.drop_all()
            db.engine.dispose()


@pytest.fixture
def froggy_app(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    smtp_server: SMTPServer,
) -> Flask:
    return make_froggy_app(
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url}
        | smtp_server.config()
    )


@pytest.fixture
def client(froggy_app: Flask) -> FlaskClient:
    return froggy_app.test_client()


@pytest.fixture
def app_log(caplog: pytest.LogCaptureFixture) -> t.Callable[[], list[str]]:
    """The messages the sample app logged so far (its own logger only)."""
    caplog.set_level(logging.INFO, logger="sample_app")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "sample_app"]


def add_froggies(app: Flask, *names: str) -> list[int]:
    """Insert froggies directly (no notification); return their ids."""
    with app.app_context():
        froggies = [
            Froggy(name=name, colour="green", is_jumping=False) for name in names
        ]
        db.session.add_all(froggies)
        db.session.commit()
        return [froggy.id for froggy in froggies]


def table(app: Flask) -> list[dict[str, t.Any]]:
    """Every froggy, as the database holds it now."""
    with app.app_context():
        froggies = db.session.scalars(select(Froggy).order_by(Froggy.id))
        rows = [froggy.to_dict() for froggy in froggies]
        db.session.remove()
        return rows


def kermit_id(operation: t.Any, kermit: int) -> t.Any:
    """A copy of the operation with the placeholder id "KERMIT" made real."""
    if isinstance(operation, dict) and operation.get("id") == "KERMIT":
        return operation | {"id": kermit}
    return operation


def emails(smtp_server: SMTPServer) -> list[tuple[str, str]]:
    return [
        (message["Subject"], message.get_body(("plain",)).get_content().strip())
        for message in smtp_server.messages
    ]


# -- the endpoints ---------------------------------------------------------


def test_create_read_and_list_froggies(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
) -> None:
    created = client.post("/froggies", json={"name": "Kermit"})
    assert created.status_code == 201
    kermit = created.get_json()["froggy"]
    assert kermit == {
        "id": kermit["id"],
        "name": "Kermit",
        "colour": "green",
        "is_jumping": False,
        "jump_height": None,
    }
    assert created.headers["Location"] == f"/froggies/{kermit['id']}"
    # Creating notifies nobody: nothing queued, nothing committed to report.
    assert created.get_json()["notifications"] == {
        "dispatched": [],
        "failed": [],
        "pending": [],
    }

    second = client.post("/froggies", json={"name": "Freddie", "colour": "blue"})
    freddie = second.get_json()["froggy"]

    assert client.get(f"/froggies/{kermit['id']}").get_json() == {"froggy": kermit}
    listed = client.get("/froggies")
    assert listed.status_code == 200
    assert listed.get_json() == {"froggies": [kermit, freddie]}
    assert table(froggy_app) == [kermit, freddie]
    assert smtp_server.messages == []
    assert app_log() == []


def test_changing_the_colour_commits_then_logs_then_mails(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
) -> None:
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    response = client.put(f"/froggies/{froggy_id}/colour", json={"colour": "red"})

    assert response.status_code == 200
    body = response.get_json()
    assert body["froggy"]["colour"] == "red"
    assert table(froggy_app)[0]["colour"] == "red"
    assert app_log() == [
        "Committed DB transaction",
        f"Froggy colour updated: {froggy_id}; new value: red",
        "Sent email: Froggy colour updated",
    ]
    assert emails(smtp_server) == [
        ("Froggy colour updated", f"Froggy: {froggy_id}; new colour: red")
    ]
    (message,) = smtp_server.messages
    assert message["From"] == SENDER
    assert message["To"] == ", ".join(ADMINS)
    dispatched = body["notifications"]["dispatched"]
    assert [item["channel"] for item in dispatched] == ["log", "mail"]
    assert message["X-Notifyqueue-Intent"] == dispatched[1]["id"]
    assert body["notifications"]["failed"] == []


def test_a_jump_commits_then_logs_then_mails(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
) -> None:
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    response = client.post(
        f"/froggies/{froggy_id}/jump", json={"jump_height": "2 metres"}
    )

    assert response.status_code == 200
    assert response.get_json()["froggy"] | {"id": 0} == {
        "id": 0,
        "name": "Kermit",
        "colour": "green",
        "is_jumping": True,
        "jump_height": "2 metres",
    }
    assert table(froggy_app)[0]["jump_height"] == "2 metres"
    assert app_log() == [
        "Committed DB transaction",
        f"Made froggy jump: {froggy_id}; jump height: 2 metres",
        "Sent email: Made froggy jump",
    ]
    assert emails(smtp_server) == [
        ("Made froggy jump", f"Froggy: {froggy_id}; jump height: 2 metres")
    ]


def test_the_jump_email_is_text_and_html_from_jinja_files_escaped_in_html(
    froggy_app: Flask, client: FlaskClient, smtp_server: SMTPServer
) -> None:
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    height = '<b>2</b> & "metres"'
    response = client.post(f"/froggies/{froggy_id}/jump", json={"jump_height": height})

    assert response.status_code == 200
    [message] = smtp_server.messages
    assert message.get_content_type() == "multipart/alternative"
    plain, html = message.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content_charset() == "utf-8"
    assert plain.get_content().strip() == f"Froggy: {froggy_id}; jump height: {height}"
    assert html.get_content_type() == "text/html"
    assert html.get_content().strip() == (
        f"<p>Froggy <b>{froggy_id}</b> jumped:"
        " <b>&lt;b&gt;2&lt;/b&gt; &amp; &#34;metres&#34;</b>.</p>"
    )


def test_brightpink_and_highjump_is_one_transaction_two_log_lines_one_email(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
) -> None:
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    response = client.post(f"/froggies/{froggy_id}/brightpink-and-highjump")

    assert response.status_code == 200
    assert table(froggy_app)[0] | {"id": 0} == {
        "id": 0,
        "name": "Kermit",
        "colour": "bright_pink",
        "is_jumping": True,
        "jump_height": "50 metres",
    }
    assert app_log() == [
        "Committed DB transaction",
        f"Froggy colour updated: {froggy_id}; new value: bright_pink",
        f"Made froggy jump: {froggy_id}; jump height: 50 metres",
        "Sent email: Made froggy jump",
    ]
    assert emails(smtp_server) == [
        ("Made froggy jump", f"Froggy: {froggy_id}; jump height: 50 metres")
    ]
    channels = [
        n["channel"] for n in response.get_json()["notifications"]["dispatched"]
    ]
    assert channels == ["log", "log", "mail"]


def test_a_batch_runs_every_operation_in_one_commit(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
) -> None:
    kermit, freddie = add_froggies(froggy_app, "Kermit", "Freddie")
    response = client.post(
        "/batch",
        json={
            "operations": [
                {"op": "create", "name": "Hoppy", "colour": "yellow"},
                {"op": "colour", "id": kermit, "colour": "red"},
                {"op": "jump", "id": freddie, "jump_height": "1 metre"},
            ]
        },
    )

    assert response.status_code == 200
    body = response.get_json()
    assert [f["name"] for f in body["froggies"]] == ["Hoppy", "Kermit", "Freddie"]
    hoppy = body["froggies"][0]["id"]
    assert table(froggy_app) == [
        {
            "id": kermit,
            "name": "Kermit",
            "colour": "red",
            "is_jumping": False,
            "jump_height": None,
        },
        {
            "id": freddie,
            "name": "Freddie",
            "colour": "green",
            "is_jumping": True,
            "jump_height": "1 metre",
        },
        {
            "id": hoppy,
            "name": "Hoppy",
            "colour": "yellow",
            "is_jumping": False,
            "jump_height": None,
        },
    ]
    # One commit; the log channel first (its intents in call order), then mail.
    assert app_log() == [
        "Committed DB transaction",
        f"Froggy colour updated: {kermit}; new value: red",
        f"Made froggy jump: {freddie}; jump height: 1 metre",
        "Sent email: Froggy colour updated",
        "Sent email: Made froggy jump",
    ]
    assert emails(smtp_server) == [
        ("Froggy colour updated", f"Froggy: {kermit}; new colour: red"),
        ("Made froggy jump", f"Froggy: {freddie}; jump height: 1 metre"),
    ]


@pytest.mark.parametrize(
    ("operations", "status", "error"),
    [
        pytest.param(
            [
                {"op": "colour", "id": "KERMIT", "colour": "red"},
                {"op": "jump", "id": 999999, "jump_height": "1 metre"},
            ],
            404,
            "operations[1]: no froggy with id 999999.",
            id="unknown froggy",
        ),
        pytest.param(
            [
                {"op": "colour", "id": "KERMIT", "colour": "red"},
                {"op": "create", "name": "Kermit"},
            ],
            409,
            "The change conflicts with an existing froggy: names are unique.",
            id="name taken",
        ),
        pytest.param(
            [
                {"op": "jump", "id": "KERMIT", "jump_height": "3 metres"},
                {"op": "create", "name": "Twin"},
                {"op": "create", "name": "Twin"},
            ],
            409,
            "The change conflicts with an existing froggy: names are unique.",
            id="same name twice",
        ),
        pytest.param(
            [
                {"op": "create", "name": "Hoppy"},
                {"op": "colour", "id": "KERMIT", "colour": "red"},
                {"op": "jump", "id": "KERMIT", "height": "3 metres"},
            ],
            400,
            "operations[2] has unknown field 'height'",
            id="bad operation after good ones",
        ),
    ],
)
def test_a_failing_batch_changes_nothing_and_notifies_nobody(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
    operations: list[dict[str, t.Any]],
    status: int,
    error: str,
) -> None:
    (kermit,) = add_froggies(froggy_app, "Kermit")
    operations = [kermit_id(operation, kermit) for operation in operations]
    before = table(froggy_app)

    response = client.post("/batch", json={"operations": operations})

    assert response.status_code == status
    assert response.get_json()["error"].startswith(error)
    assert table(froggy_app) == before
    assert smtp_server.messages == []
    assert app_log() == []
    # The app goes on: the next request commits and notifies as usual.
    assert (
        client.put(f"/froggies/{kermit}/colour", json={"colour": "blue"}).status_code
        == 200
    )
    assert emails(smtp_server) == [
        ("Froggy colour updated", f"Froggy: {kermit}; new colour: blue")
    ]


def test_a_refused_email_does_not_fail_the_request_or_the_commit(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    caplog: pytest.LogCaptureFixture,
    app_log: t.Callable[[], list[str]],
) -> None:
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    smtp_server.refuse.update(ADMINS)

    response = client.put(f"/froggies/{froggy_id}/colour", json={"colour": "red"})

    assert response.status_code == 200
    notifications = response.get_json()["notifications"]
    assert [n["channel"] for n in notifications["dispatched"]] == ["log"]
    assert [n["channel"] for n in notifications["failed"]] == ["mail"]
    assert table(froggy_app)[0]["colour"] == "red"
    assert app_log() == [
        "Committed DB transaction",
        f"Froggy colour updated: {froggy_id}; new value: red",
    ]
    (failure,) = [r for r in caplog.records if r.name == "notifyqueue"]
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None
    assert smtp_server.messages == []


# -- bad input -------------------------------------------------------------

TOO_LONG = "x" * 81


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        # unknown froggies and routes
        ("GET", "/froggies/999999", None, 404, "No froggy with id 999999."),
        ("GET", "/froggies/99999999999", None, 404, "No froggy with id 99999999999."),
        ("PUT", "/froggies/999999/colour", {"colour": "red"}, 404, "No froggy with id"),
        ("POST", "/froggies/999999/jump", {"jump_height": "1"}, 404, "No froggy"),
        ("POST", "/froggies/999999/brightpink-and-highjump", None, 404, "No froggy"),
        ("GET", "/frogs", None, 404, "The requested URL was not found"),
        ("DELETE", "/froggies/KERMIT", None, 405, "The method is not allowed"),
        # missing, unknown, oversized and mistyped fields
        ("POST", "/froggies", {}, 400, "The body is missing field 'name'."),
        ("POST", "/froggies", {"name": "A", "size": 3}, 400, "unknown field 'size';"),
        (
            "POST",
            "/froggies",
            {"size": 3, "age": 2},
            400,
            "The body has unknown fields 'age', 'size'; the fields are 'name',",
        ),
        (
            "POST",
            "/froggies",
            {"name": TOO_LONG},
            400,
            "is 81 characters long; the limit is 80",
        ),
        ("POST", "/froggies", {"name": ""}, 400, "field 'name' must not be empty"),
        (
            "POST",
            "/froggies",
            {"name": 7},
            400,
            "field 'name' must be a string, got a number",
        ),
        ("POST", "/froggies", {"name": None}, 400, "must be a string, got null"),
        ("POST", "/froggies", {"name": ["A"]}, 400, "must be a string, got an array"),
        (
            "POST",
            "/froggies",
            {"name": "A\nB"},
            400,
            "control or unprintable character",
        ),
        (
            "POST",
            "/froggies",
            {"name": "A\x00"},
            400,
            "control or unprintable character",
        ),
        (
            "POST",
            "/froggies",
            [{"name": "A"}],
            400,
            "The body must be a JSON object, got an array",
        ),
        ("PUT", "/froggies/KERMIT/colour", {}, 400, "missing field 'colour'"),
        (
            "PUT",
            "/froggies/KERMIT/colour",
            {"colour": "x" * 33},
            400,
            "the limit is 32",
        ),
        ("PUT", "/froggies/KERMIT/colour", {"colour": True}, 400, "got a boolean"),
        ("POST", "/froggies/KERMIT/jump", {"jump_height": 50}, 400, "got a number"),
        (
            "POST",
            "/froggies/KERMIT/jump",
            {"height": "1"},
            400,
            "unknown field 'height'",
        ),
        # batches
        (
            "POST",
            "/batch",
            {},
            400,
            "The body is missing field 'operations'.",
        ),
        (
            "POST",
            "/batch",
            {"operations": {}},
            400,
            "must be a list of operations, got an object",
        ),
        ("POST", "/batch", {"operations": []}, 400, "'operations' has 0 operations"),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "create", "name": f"f{i}"} for i in range(101)]},
            400,
            "has 101 operations; send 1 to 100",
        ),
        (
            "POST",
            "/batch",
            {"operations": [], "dry_run": True},
            400,
            "unknown field 'dry_run'",
        ),
        (
            "POST",
            "/batch",
            {"operations": ["create"]},
            400,
            "operations[0] must be a JSON object, got a string",
        ),
        (
            "POST",
            "/batch",
            {"operations": [{"name": "A"}]},
            400,
            "operations[0] is missing field 'op'",
        ),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "fly", "id": 1}]},
            400,
            "operations[0] has unknown operation 'fly'",
        ),
        ("POST", "/batch", {"operations": [{"op": 3}]}, 400, "unknown operation 3"),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "jump", "id": True, "jump_height": "1"}]},
            400,
            "operations[0]: field 'id' must be an integer, got a boolean",
        ),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "jump", "id": 1.0, "jump_height": "1"}]},
            400,
            "must be an integer, got a number",
        ),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "jump", "id": 2**40, "jump_height": "1"}]},
            400,
            "must be between 1 and 2147483647",
        ),
        (
            "POST",
            "/batch",
            {"operations": [{"op": "colour", "id": "KERMIT"}]},
            400,
            "operations[0] is missing field 'colour'",
        ),
    ],
)
def test_bad_input_is_refused_with_a_message_and_changes_nothing(
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    app_log: t.Callable[[], list[str]],
    method: str,
    path: str,
    body: t.Any,
    status: int,
    error: str,
) -> None:
    (kermit,) = add_froggies(froggy_app, "Kermit")
    path = path.replace("KERMIT", str(kermit))
    if isinstance(body, dict) and isinstance(body.get("operations"), list):
        body = body | {
            "operations": [kermit_id(op, kermit) for op in body["operations"]]
        }
    before = table(froggy_app)

    response = client.open(path, method=method, json=body)

    assert response.status_code == status
    assert error in response.get_json()["error"]
    assert table(froggy_app) == before
    assert smtp_server.messages == []
    assert app_log() == []


@pytest.mark.parametrize(
    ("data", "content_type", "status", "error"),
    [
        ('{"name": "A"', "application/json", 400, "The body is not valid JSON."),
        ("", "application/json", 400, "The body is not valid JSON."),
        (
            "name=A",
            "application/x-www-form-urlencoded",
            415,
            "Content-Type: application/json",
        ),
        ('{"name": "A"}', "text/plain", 415, "Content-Type: application/json"),
        ("[" * 30_000, "application/json", 400, "nested too deeply"),
        (
            '{"name": "' + "x" * 70_000 + '"}',
            "application/json",
            413,
            "larger than the limit of 65536 bytes",
        ),
    ],
    ids=["truncated", "empty", "form", "text", "deep", "huge"],
)
def test_a_body_that_is_not_a_json_object_is_refused(
    froggy_app: Flask,
    client: FlaskClient,
    data: str,
    content_type: str,
    status: int,
    error: str,
) -> None:
    before = table(froggy_app)
    response = client.post("/froggies", data=data, content_type=content_type)
    assert response.status_code == status
    assert error in response.get_json()["error"]
    assert table(froggy_app) == before


# -- configuration and logging ---------------------------------------------


def test_the_database_url_comes_from_the_environment_unless_config_names_one(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    tmp_path: t.Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLASK_SQLALCHEMY_DATABASE_URI", database_url)
    from_env = make_froggy_app({"TESTING": True})
    other = f"sqlite:///{tmp_path / 'other.db'}"
    from_config = make_froggy_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": other})
    with from_env.app_context():
        assert db.engine.url.render_as_string(False) == database_url
        assert db.session.scalars(select(Froggy)).all() == []
    with from_config.app_context():
        assert db.engine.url.database == str(tmp_path / "other.db")


def test_without_a_mail_server_emails_are_suppressed_and_the_log_says_so(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    app_log: t.Callable[[], list[str]],
) -> None:
    # Not TESTING: only the missing MAIL_SERVER turns sending off.
    app = make_froggy_app({"SQLALCHEMY_DATABASE_URI": database_url})
    assert app.config["MAIL_SUPPRESS_SEND"] is True
    (froggy_id,) = add_froggies(app, "Kermit")
    response = app.test_client().put(
        f"/froggies/{froggy_id}/colour", json={"colour": "red"}
    )
    assert response.status_code == 200
    assert app_log() == [
        "Committed DB transaction",
        f"Froggy colour updated: {froggy_id}; new value: red",
        "Email not sent (MAIL_SUPPRESS_SEND): Froggy colour updated",
    ]


def test_log_lines_have_the_format_once_however_many_apps_are_created(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    froggy_app: Flask,
    client: FlaskClient,
    smtp_server: SMTPServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_froggy_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    (froggy_id,) = add_froggies(froggy_app, "Kermit")
    capsys.readouterr()

    client.post(f"/froggies/{froggy_id}/jump", json={"jump_height": "1 metre"})

    lines = capsys.readouterr().err.splitlines()
    stamp = re.compile(r"INFO \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (.*)")
    # One handler, one line per record, every line in the format.
    assert [m.group(1) for m in map(stamp.fullmatch, lines) if m] == [
        "Committed DB transaction",
        f"Made froggy jump: {froggy_id}; jump height: 1 metre",
        "Sent email: Made froggy jump",
    ]
    assert len(lines) == 3


def test_background_delivery_from_the_environment_answers_before_sending(
    make_froggy_app: t.Callable[[dict[str, t.Any]], Flask],
    database_url: str,
    smtp_server: SMTPServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLASK_NOTIFYQUEUE_DELIVERY", "background")
    smtp_server.data_delay = 1.0
    app = make_froggy_app(
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url}
        | smtp_server.config()
    )
    (froggy_id,) = add_froggies(app, "Kermit")
    response = app.test_client().put(
        f"/froggies/{froggy_id}/colour", json={"colour": "red"}
    )
    assert response.status_code == 200
    notifications = response.get_json()["notifications"]
    assert notifications["dispatched"] == [] and notifications["failed"] == []
    pending = notifications["pending"]
    assert [n["channel"] for n in pending] == ["log", "mail"]
    assert smtp_server.intent_ids() == []  # answered before the server did
    wait(app)
    assert smtp_server.intent_ids() == [pending[1]["id"]]
