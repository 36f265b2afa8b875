"""The ``notifications`` fixture of ``notifyqueue.pytest_plugin`` (entry point
``pytest11``), in this suite and in generated ones run by ``pytester``; and the
README's "Testing your app" claims about app contexts and requests.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy.orm.exc
from flask import Flask

from notifyqueue import Intent, enqueue, finalise

from .helpers import Item, db

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The fixture does not depend on the database: SQLite only."""
    return f"sqlite:///{tmp_path / 'test.db'}"


def test_the_plugin_is_registered_as_a_pytest11_entry_point(
    pytestconfig: pytest.Config,
) -> None:
    (entry_point,) = [
        entry_point
        for entry_point in importlib.metadata.entry_points(group="pytest11")
        if entry_point.name == "notifyqueue"
    ]
    assert entry_point.value == "notifyqueue.pytest_plugin"
    assert pytestconfig.pluginmanager.has_plugin("notifyqueue")


def test_importing_notifyqueue_does_not_import_pytest() -> None:
    code = (
        "import sys, notifyqueue, notifyqueue.testing\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pytest', '_pytest')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_notifications_records_what_this_suites_app_dispatches(
    app: Flask, notifications: list[Intent]
) -> None:
    with app.app_context():
        first = enqueue("rec", "one")
        second = enqueue("log", "two")
        finalise()
        enqueue("rec", "rolled back")
        finalise(commit=False)

    assert notifications == [second, first]  # dispatch order: log, then rec


def test_notifications_records_nothing_a_held_app_context_never_commits(
    app: Flask, notifications: list[Intent]
) -> None:
    with app.app_context():
        enqueue("rec", "never committed")
    # The context's teardown discarded it.
    assert notifications == []


def test_an_object_committed_in_one_app_context_is_detached_in_the_next(
    app: Flask,
) -> None:
    with app.app_context():
        item = Item(name="made in a fixture")
        db.session.add(item)
        db.session.commit()
    with app.app_context(), pytest.raises(sqlalchemy.orm.exc.DetachedInstanceError):
        item.name  # noqa: B018 (loading the expired attribute is the point)


def _add_views(app: Flask) -> None:
    @app.post("/queue")
    def queue_only() -> str:
        enqueue("rec", "left uncommitted")
        return "queued"

    @app.post("/commit")
    def queue_and_commit() -> str:
        enqueue("rec", "committed")
        finalise()
        return "committed"


def test_each_request_has_its_own_session_without_an_outer_app_context(
    app: Flask, notifications: list[Intent]
) -> None:
    _add_views(app)
    client = app.test_client()
    client.post("/queue")
    client.post("/commit")

    assert [intent.payload for intent in notifications] == ["committed"]


def test_an_app_context_held_across_requests_shares_its_session_with_them(
    app: Flask, notifications: list[Intent]
) -> None:
    _add_views(app)
    client = app.test_client()
    with app.app_context():
        client.post("/queue")
        client.post("/commit")

    assert [intent.payload for intent in notifications] == [
        "left uncommitted",
        "committed",
    ]


def test_the_readme_fixtures_pass_in_a_suite_of_their_own(
    pytester: pytest.Pytester,
) -> None:
    # The user's suite: examples/ as it is, warnings as errors, run by a
    # pytest of its own that finds the plugin through the entry point.
    for name in ("quickstart.py", "test_quickstart.py"):
        shutil.copy(ROOT / "examples" / name, pytester.path / name)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")

    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_a_jump_request_notifies_after_its_commit*"])


def test_a_suite_without_an_app_fixture_fails_only_where_notifications_is_used(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_without(tmp_path):
            assert tmp_path.exists()

        def test_with(notifications):
            pass
        """
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'app' not found*"])


def test_notifications_refuses_an_app_fixture_that_is_not_a_flask_app(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def app():
            return "not an app"

        def test_with(notifications):
            pass
        """
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*needs the 'app' fixture to return a Flask app, got str 'not an app'*"]
    )
