"""Tests of the quickstart app, as the README's "Testing your app" shows them.

Run ``python -m pytest examples/`` from a checkout; the ``notifications``
fixture comes with notifyqueue (a pytest plugin).
"""

from __future__ import annotations

import typing as t

import pytest
import quickstart
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from quickstart import Froggy, make_froggy_brightpink_and_highjump, make_froggy_jump

from notifyqueue import Intent
from notifyqueue.testing import capture


@pytest.fixture
def app() -> Flask:
    # A fresh app, and with it a fresh in-memory database, for every test.
    return quickstart.create_app({"TESTING": True})


@pytest.fixture
def db(app: Flask) -> t.Iterator[SQLAlchemy]:
    # For tests that call the app's functions: one app context, one session,
    # for the whole test. A test that makes requests needs none (see below).
    with app.app_context():
        yield quickstart.db


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def froggy_id(app: Flask) -> int:
    # Made and committed in an app context of its own, which ends here: hand
    # the test the id, not the object (it would be detached from the session).
    with app.app_context():
        froggy = Froggy(id=123)
        quickstart.db.session.add(froggy)
        quickstart.db.session.commit()
        return froggy.id


def test_brightpink_and_highjump_notifies_after_its_commit(
    db: SQLAlchemy, notifications: list[Intent]
) -> None:
    froggy = Froggy(id=7)
    db.session.add(froggy)
    make_froggy_brightpink_and_highjump(froggy)  # commits

    assert [(n.channel, n.source.rpartition(".")[2]) for n in notifications] == [
        ("log", "update_froggy_colour"),
        ("log", "make_froggy_jump"),
        ("mail", "make_froggy_jump"),
    ]
    assert notifications[1].payload == "Made froggy jump: 7; jump height: 50 metres"
    assert notifications[2].payload["subject"] == "Made froggy jump"


def test_a_rollback_notifies_nobody(
    db: SQLAlchemy, froggy_id: int, notifications: list[Intent]
) -> None:
    froggy = db.session.get(Froggy, froggy_id)
    assert froggy is not None
    make_froggy_jump(froggy, "1 metre")
    db.session.rollback()

    assert notifications == []


def test_a_jump_request_notifies_after_its_commit(
    client: FlaskClient, froggy_id: int, notifications: list[Intent]
) -> None:
    response = client.post(f"/froggies/{froggy_id}/jump", json={"jump_height": "2 m"})

    assert response.json == {"id": froggy_id, "notified": 2}
    assert [n.payload for n in notifications if n.channel == "log"] == [
        "Made froggy jump: 123; jump height: 2 m"
    ]


def test_a_jump_is_recorded_without_calling_the_channels(
    db: SQLAlchemy, froggy_id: int
) -> None:
    froggy = db.session.get(Froggy, froggy_id)
    assert froggy is not None
    with capture(dispatch=False) as sent:  # no log line, no email
        make_froggy_jump(froggy, "3 metres")
        db.session.commit()

    assert [intent.channel for intent in sent] == ["log", "mail"]
