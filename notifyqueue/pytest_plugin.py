"""The ``notifications`` pytest fixture, registered through the ``pytest11`` entry
point: installing notifyqueue makes it available to every test suite.

Only pytest imports this module; ``import notifyqueue`` never imports pytest.
"""

from __future__ import annotations

import typing as t

import pytest

if t.TYPE_CHECKING:
    from flask import Flask

    from .intent import Intent


@pytest.fixture
def notifications(app: Flask) -> t.Iterator[list[Intent]]:
    """The notifications the ``app`` fixture's app dispatches during the test.

    A list of :class:`~notifyqueue.Intent`, in dispatch order, that each
    committed notification is appended to once its channels were called
    (:func:`notifyqueue.testing.capture` for the whole test). It needs a
    fixture named ``app`` that returns (or yields) the Flask app under test;
    a suite without one fails only in the tests that ask for
    ``notifications`` (pytest's "fixture 'app' not found").
    """
    # Imported here, not at the top: pytest loads this plugin at start-up in
    # every suite of an environment where notifyqueue is installed, and
    # should not import Flask and SQLAlchemy for suites that never use it.
    from flask import Flask

    from .testing import capture

    if not isinstance(app, Flask):
        raise TypeError(
            "The 'notifications' fixture needs the 'app' fixture to return a Flask"
            f" app, got {type(app).__name__} {app!r}."
        )
    with capture(app) as captured:
        yield captured
