"""``examples/``: the README's Usage code is ``examples/quickstart.py``, which runs.

The README's snippets must be exact excerpts of the files (so that they cannot
drift apart), and ``python examples/quickstart.py`` must print what its
comments say, as a user runs it: in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import SMTPServer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"
TEST_QUICKSTART = ROOT / "examples" / "test_quickstart.py"

# What main() prints, in order: each line is also a comment in main().
PRINTED = [
    "INFO Froggy colour updated: 123; new value: bright_pink",
    "INFO Made froggy jump: 123; jump height: 50 metres",
    "INFO Email not sent (MAIL_SUPPRESS_SEND): Made froggy jump",
    "Committed: 3 dispatched, 0 failed.",
    "Rolled back: froggy 123 still jumps 50 metres.",
]


def readme_python_block(section: str) -> str:
    """The first ```python block of the README section with this heading."""
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def run_quickstart(**env: str) -> tuple[int, str, str]:
    """Run ``python examples/quickstart.py`` from the checkout, as the README says."""
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith("FLASK_")
    }
    environ.update(env, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "examples/quickstart.py"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    return process.returncode, stdout, stderr


def test_readme_usage_is_an_exact_excerpt_of_examples_quickstart() -> None:
    snippet = readme_python_block("Usage")
    source = QUICKSTART.read_text()

    assert snippet in source
    # The excerpt is the app, not a line of it.
    for part in (
        "db = SQLAlchemy(",
        "class Froggy(",
        "notify.init_app(app)",
        "def make_froggy_brightpink_and_highjump(",
        "def main()",
        'if __name__ == "__main__":',
    ):
        assert part in snippet


def test_readme_testing_is_an_exact_excerpt_of_examples_test_quickstart() -> None:
    snippet = readme_python_block("Testing your app")
    source = TEST_QUICKSTART.read_text()

    assert snippet in source
    for fixture in ("def app(", "def db(", "def client(", "notifications"):
        assert fixture in snippet


def test_each_printed_line_is_a_comment_of_quickstart() -> None:
    comments = [
        line.strip().removeprefix("# ")
        for line in QUICKSTART.read_text().splitlines()
        if line.strip().startswith("# ")
    ]
    for line in PRINTED:
        assert line in comments


def test_quickstart_prints_what_its_comments_say() -> None:
    returncode, stdout, stderr = run_quickstart()

    assert returncode == 0, stderr
    assert stdout.splitlines() == PRINTED
    assert stderr == ""
    assert not (ROOT / "examples" / "instance").exists()


def test_quickstart_sends_through_the_mail_server_of_the_environment(
    smtp_server: SMTPServer,
) -> None:
    returncode, stdout, stderr = run_quickstart(
        FLASK_MAIL_SERVER=smtp_server.host, FLASK_MAIL_PORT=str(smtp_server.port)
    )

    assert returncode == 0, stderr
    assert stdout.splitlines() == [
        line.replace("Email not sent (MAIL_SUPPRESS_SEND)", "Email sent")
        for line in PRINTED
    ]
    assert [message["Subject"] for message in smtp_server.messages] == [
        "Made froggy jump"
    ]
    assert smtp_server.envelopes == [["admins@example.com"]]
    assert smtp_server.messages[0].get_content().strip() == (
        "Froggy: 123; jump height: 50 metres"
    )
