"""How a ``"type"`` in NOTIFYQUEUE_CHANNELS finds its channel class, at init_app."""

from __future__ import annotations

import re
import sys
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from notifyqueue import Channel, ConfigurationError, NotifyQueue, enqueue, finalise
from notifyqueue.channels.log import LogChannel
from notifyqueue.channels.mail import MailChannel

from .helpers import RecordingChannel

KEY = re.escape("NOTIFYQUEUE_CHANNELS['x']['type']")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Resolving a channel type does not depend on the database: SQLite only."""
    return f"sqlite:///{tmp_path / 'test.db'}"


def build(make_app: t.Callable[..., Flask], options: dict[str, t.Any]) -> Flask:
    """An app whose only channel is ``x`` with ``options``, initialised."""
    app = make_app(init=False, NOTIFYQUEUE_CHANNELS={"x": options})
    NotifyQueue().init_app(app)
    return app


def fails(make_app: t.Callable[..., Flask], options: dict[str, t.Any]) -> str:
    """Initialise an app with channel ``x``; return the ConfigurationError text."""
    app = make_app(init=False, NOTIFYQUEUE_CHANNELS={"x": options})
    with pytest.raises(ValueError) as excinfo:
        NotifyQueue().init_app(app)
    assert isinstance(excinfo.value, ConfigurationError)
    assert "notifyqueue" not in app.extensions
    return str(excinfo.value)


class FakeDistribution:
    """Writes a real ``*.dist-info`` with entry points, and modules, on sys.path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def install(self, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for name, source in modules.items():
            (self.root / f"{name}.py").write_text(source)
            self.modules.append(name)
        info = self.root / "fakechan-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fakechan\nVersion: 1.0\n"
        )
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[notifyqueue.channels]\n{lines}")


@pytest.fixture
def fake_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> t.Iterator[FakeDistribution]:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    fake = FakeDistribution(root)
    yield fake
    for name in fake.modules:
        sys.modules.pop(name, None)


FAKE_CHANNEL = """
from notifyqueue import Channel


class FakeChannel(Channel):
    def __init__(self, name, *, colour="blue"):
        super().__init__(name)
        self.colour = colour
        self.sent = []

    def send(self, intents):
        self.sent.extend(intent.payload for intent in intents)


class NotAChannel:
    def __init__(self, name):
        self.name = name
"""


# --- what resolves -----------------------------------------------------------


def test_log_type_is_the_built_in_log_channel(make_app: t.Callable[..., Flask]) -> None:
    app = build(make_app, {"type": "log", "level": "WARNING"})
    built = app.extensions["notifyqueue"].channels["x"]
    assert type(built) is LogChannel
    assert built.name == "x"


def test_mail_type_is_the_built_in_mail_channel(
    make_app: t.Callable[..., Flask],
) -> None:
    app = build(make_app, {"type": "mail", "recipients": ["admin@example.com"]})
    built = app.extensions["notifyqueue"].channels["x"]
    assert type(built) is MailChannel
    assert built.recipients == ["admin@example.com"]


def test_import_path_type_builds_that_class_with_its_options(
    make_app: t.Callable[..., Flask],
) -> None:
    app = build(make_app, {"type": "tests.helpers:RecordingChannel", "fail_on": "z"})
    built = app.extensions["notifyqueue"].channels["x"]
    assert type(built) is RecordingChannel
    assert (built.name, built.fail_on) == ("x", "z")


def test_entry_point_type_builds_the_class_it_names(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"fake": "fakechan_ok:FakeChannel"}, {"fakechan_ok": FAKE_CHANNEL}
    )
    app = build(make_app, {"type": "fake", "colour": "green"})
    built = app.extensions["notifyqueue"].channels["x"]
    assert type(built) is sys.modules["fakechan_ok"].FakeChannel
    assert isinstance(built, Channel)
    assert (built.name, built.colour) == ("x", "green")
    with app.app_context():
        enqueue("x", "through the entry point {n}", n=1)
        finalise()
    assert built.sent == ["through the entry point 1"]


def test_built_in_type_wins_over_an_entry_point_of_the_same_name(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"log": "fakechan_shadow:FakeChannel"}, {"fakechan_shadow": FAKE_CHANNEL}
    )
    app = build(make_app, {"type": "log"})
    assert type(app.extensions["notifyqueue"].channels["x"]) is LogChannel


# --- what fails, naming the key ----------------------------------------------


def test_import_path_to_a_missing_module_fails(
    make_app: t.Callable[..., Flask],
) -> None:
    message = fails(make_app, {"type": "tests.no_such_module:Channel"})
    assert re.search(KEY, message)
    assert "tests.no_such_module" in message


def test_import_path_to_a_missing_attribute_fails(
    make_app: t.Callable[..., Flask],
) -> None:
    message = fails(make_app, {"type": "tests.helpers:NoSuchChannel"})
    assert re.search(KEY + r".*'tests\.helpers'.*'NoSuchChannel'", message)


def test_import_path_without_a_module_fails(make_app: t.Callable[..., Flask]) -> None:
    message = fails(make_app, {"type": ":RecordingChannel"})
    assert re.search(KEY, message)


def test_import_path_whose_module_raises_on_import_fails(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {}, {"fakechan_boom": 'raise RuntimeError("fakechan_boom is broken")\n'}
    )
    message = fails(make_app, {"type": "fakechan_boom:FakeChannel"})
    assert re.search(KEY + r".*fakechan_boom is broken", message)


@pytest.mark.parametrize(
    "type_name",
    ["tests.helpers:NotAChannel", "tests.helpers:db", "notifyqueue:enqueue"],
)
def test_import_path_to_something_not_a_channel_subclass_fails(
    make_app: t.Callable[..., Flask], type_name: str
) -> None:
    message = fails(make_app, {"type": type_name})
    assert re.search(KEY + ".*" + re.escape(repr(type_name)), message)
    assert "not a subclass of notifyqueue.Channel" in message


def test_entry_point_whose_module_raises_on_import_fails_naming_it(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"broken": "fakechan_broken:FakeChannel"},
        {"fakechan_broken": 'raise RuntimeError("fakechan_broken is broken")\n'},
    )
    message = fails(make_app, {"type": "broken"})
    assert re.search(KEY + r" is 'broken'", message)
    assert "fakechan_broken:FakeChannel" in message
    assert "fakechan_broken is broken" in message


def test_entry_point_to_a_missing_attribute_fails_naming_it(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"gone": "fakechan_gone:NoSuchChannel"}, {"fakechan_gone": FAKE_CHANNEL}
    )
    message = fails(make_app, {"type": "gone"})
    assert re.search(KEY + r" is 'gone'", message)
    assert "fakechan_gone:NoSuchChannel" in message


def test_entry_point_to_something_not_a_channel_subclass_fails(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"plain": "fakechan_plain:NotAChannel"}, {"fakechan_plain": FAKE_CHANNEL}
    )
    message = fails(make_app, {"type": "plain"})
    assert re.search(KEY + r" is 'plain'.*not a subclass", message)


def test_unknown_type_name_lists_the_known_types(
    make_app: t.Callable[..., Flask], fake_distribution: FakeDistribution
) -> None:
    fake_distribution.install(
        {"fake": "fakechan_known:FakeChannel"}, {"fakechan_known": FAKE_CHANNEL}
    )
    message = fails(make_app, {"type": "nosuch"})
    assert re.search(KEY + r" is 'nosuch'", message)
    assert "Known types: fake, log, mail" in message
    assert "'package.module:Class'" in message


@pytest.mark.parametrize("type_name", ["", None, 3, ["log"]])
def test_type_that_is_not_a_name_fails(
    make_app: t.Callable[..., Flask], type_name: t.Any
) -> None:
    message = fails(make_app, {"type": type_name})
    assert re.search(KEY + " must be a channel type", message)
