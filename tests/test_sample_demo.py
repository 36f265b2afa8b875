"""The sample app's commands, run as a user runs them: in a subprocess.

``flask --app sample_app demo`` must print the four log lines of the issue,
in order, then the email the SMTP server received, then a failed commit that
notifies nobody. ``flask --app sample_app run`` must serve the README's curl
examples.
"""

from __future__ import annotations

import email
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import typing as t
from email import policy
from pathlib import Path

import pytest
import sqlalchemy as sa

from sample_app.extensions import Base

from .conftest import SMTPServer, free_port

ROOT = Path(__file__).resolve().parent.parent

LOG_LINE = re.compile(
    r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (.*)$"
)

FOUR_LINES = [
    ("INFO", "Committed DB transaction"),
    ("INFO", "Froggy colour updated: 123; new value: bright_pink"),
    ("INFO", "Made froggy jump: 123; jump height: 50 metres"),
    ("INFO", "Sent email: Made froggy jump"),
]


def flask_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``flask --app sample_app`` subprocess.

    The app the command line loads gets a database in ``tmp_path``, so a test
    run leaves nothing in the checkout's instance folder.
    """
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("FLASK_")
    }
    env["FLASK_SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'cli.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_demo(
    tmp_path: Path, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "sample_app", "demo", *options],
        cwd=ROOT,
        env=flask_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def log_lines(lines: t.Iterable[str]) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(LOG_LINE.match, lines) if m]


def split_output(stdout: str) -> tuple[list[str], list[str]]:
    """The demo's output before and after its failing batch begins."""
    lines = stdout.splitlines()
    (start,) = [
        i
        for i, line in enumerate(lines)
        if line.startswith("A batch whose commit fails")
    ]
    return lines[:start], lines[start:]


@pytest.fixture
def demo_database(database_url: str) -> t.Iterator[list[str]]:
    """Options that point the demo at the test database (none for SQLite:
    the demo's own throwaway database is what a newcomer gets)."""
    if database_url.startswith("sqlite"):
        yield []
        return
    engine = sa.create_engine(database_url)
    Base.metadata.drop_all(engine)
    try:
        yield ["--database-url", database_url]
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_demo_prints_the_four_lines_then_the_email_then_a_failed_commit(
    tmp_path: Path, demo_database: list[str]
) -> None:
    result = run_demo(tmp_path, *demo_database)
    assert result.returncode == 0, result.stderr
    committed, failed = split_output(result.stdout)

    # Exactly the four lines, first, in this order, and no other log line.
    assert log_lines(committed[:4]) == FOUR_LINES
    assert log_lines(committed) == FOUR_LINES

    # The message the local SMTP server received, headers and body.
    header = next(i for i, line in enumerate(committed) if "received 1 message" in line)
    assert re.match(
        r"The SMTP server on 127\.0\.0\.1:\d+ received 1 message", committed[header]
    )
    raw = textwrap.dedent("\n".join(committed[header + 1 :]))
    message = email.message_from_string(raw, policy=policy.default)
    assert message["Subject"] == "Made froggy jump"
    assert message["From"] == "froggy-api@example.com"
    assert message["To"] == "froggy-admins@example.com"
    assert re.fullmatch(r"[0-9a-f]{32}", message["X-Notifyqueue-Intent"])
    assert (
        message.get_body(("plain",)).get_content().strip()
        == "Froggy: 123; jump height: 50 metres"
    )

    # The failed commit: its error, and not one notification.
    ((level, text),) = log_lines(failed)
    assert level == "ERROR"
    assert text.startswith("Commit failed, so nothing was notified: ")
    assert "unique" in text.lower()
    assert failed[-1] == (
        "Froggy 123 still jumps 50 metres, and no notification was sent"
        " (the SMTP server received 0 more messages)."
    )


def test_demo_sends_through_a_configured_mail_server(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    result = run_demo(
        tmp_path,
        FLASK_MAIL_SERVER=smtp_server.host,
        FLASK_MAIL_PORT=str(smtp_server.port),
    )
    assert result.returncode == 0, result.stderr
    committed, failed = split_output(result.stdout)
    assert log_lines(committed) == FOUR_LINES
    assert (
        f"The email went to the MAIL_SERVER {smtp_server.host}:{smtp_server.port}."
        in committed
    )
    assert [m["Subject"] for m in smtp_server.messages] == ["Made froggy jump"]
    assert [level for level, _ in log_lines(failed)] == ["ERROR"]


def test_demo_fails_when_the_configured_mail_server_is_unreachable(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    result = run_demo(
        tmp_path, FLASK_MAIL_SERVER="127.0.0.1", FLASK_MAIL_PORT=str(port)
    )

    assert result.returncode == 1
    # The commit and the log lines happened; the email did not.
    assert log_lines(result.stdout.splitlines()) == FOUR_LINES[:3]
    assert f"The email was not delivered through MAIL_SERVER 127.0.0.1:{port}" in (
        result.stderr
    )


def test_demo_refuses_a_database_that_already_has_its_froggy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    assert run_demo(tmp_path, "--database-url", url).returncode == 0

    again = run_demo(tmp_path, "--database-url", url)

    assert again.returncode == 1
    assert "already holds froggy 123" in again.stderr
    assert log_lines(again.stdout.splitlines()) == []


# -- flask run and the README's curl examples ------------------------------


def readme_curl_commands() -> list[str]:
    """The curl commands of the README's Endpoints section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Endpoints", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("curl ")]


def wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flask run exited: {process.communicate()[1]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"flask run did not listen on port {port}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_flask_run_serves_the_readme_examples(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    commands = readme_curl_commands()
    assert len(commands) >= 8
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "sample_app",
            "run",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=flask_env(
            tmp_path,
            FLASK_MAIL_SERVER=smtp_server.host,
            FLASK_MAIL_PORT=str(smtp_server.port),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, server)
        answers = []
        for command in commands:
            argv = shlex.split(command.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (command, done.stderr)
            answers.append(json.loads(done.stdout))
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)

    # Every example but the last succeeds; the last is the failing batch.
    assert [a for a in answers[:-1] if "error" in a] == []
    assert answers[-1] == {"error": "operations[1]: no froggy with id 99."}
    kermit = answers[-2]["froggies"][1]
    assert kermit | {"jump_height": "?"} == {
        "id": 1,
        "name": "Kermit",
        "colour": "bright_pink",
        "is_jumping": True,
        "jump_height": "?",
    }
    subjects = [m["Subject"] for m in smtp_server.messages]
    assert subjects == [
        "Froggy colour updated",
        "Made froggy jump",
        "Made froggy jump",
        "Made froggy jump",
    ]
    logged = log_lines(log.splitlines())
    assert logged.count(("INFO", "Committed DB transaction")) == 4
    assert ("INFO", "Froggy colour updated: 1; new value: red") in logged
