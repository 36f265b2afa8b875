from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import pickle
import re
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from notifyqueue import BatchResult, Intent
from notifyqueue import intent as intent_module

MAIL_PAYLOAD = {
    "subject": "Made froggy jump",
    "body": "Froggy: 7; jump height: 50 metres",
    "recipients": ["admins@example.com", "ops@example.com"],
    "sender": "notify@example.com",
}


def mail_intent() -> Intent:
    return Intent.new("mail", dict(MAIL_PAYLOAD), "app.api.make_froggy_jump")


def test_id_is_32_hex_characters() -> None:
    intent = Intent.new("log", "hello", "enqueue")

    assert re.fullmatch(r"[0-9a-f]{32}", intent.id)


def test_ids_are_unique() -> None:
    ids = {Intent.new("log", "hello", "enqueue").id for _ in range(20_000)}

    assert len(ids) == 20_000


def test_ids_are_unique_across_threads() -> None:
    def make(_: int) -> list[str]:
        return [Intent.new("log", "hello", "enqueue").id for _ in range(5_000)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = [intent_id for batch in pool.map(make, range(8)) for intent_id in batch]

    assert len(set(ids)) == len(ids) == 40_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        ids = " ".join(Intent.new("log", "x", "enqueue").id for _ in range(100))
        os.write(write, ids.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [Intent.new("log", "x", "enqueue").id for _ in range(100)]

    assert len(child) == 100
    assert not set(child) & set(parent)
    assert child[0][:20] != parent[0][:20]


def test_ids_stay_32_hex_characters_when_the_counter_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = "0" * 20
    monkeypatch.setattr(intent_module, "_source", (prefix, itertools.count(16**12 - 1)))

    last, after = (Intent.new("log", "x", "enqueue").id for _ in range(2))

    assert last == prefix + "f" * 12
    assert re.fullmatch(r"[0-9a-f]{32}", after)
    assert not after.startswith(prefix)


def test_created_at_is_aware_utc_and_current() -> None:
    before = datetime.now(timezone.utc)
    intent = Intent.new("log", "hello", "enqueue")
    after = datetime.now(timezone.utc)

    assert intent.created_at.tzinfo is not None
    assert intent.created_at.utcoffset() == timedelta(0)
    assert before <= intent.created_at <= after


def test_new_keeps_channel_payload_and_source() -> None:
    intent = mail_intent()

    assert intent.channel == "mail"
    assert intent.payload == MAIL_PAYLOAD
    assert intent.source == "app.api.make_froggy_jump"


@pytest.mark.parametrize("field", ["id", "channel", "payload", "source", "created_at"])
def test_intent_is_frozen(field: str) -> None:
    intent = Intent.new("log", "hello", "enqueue")

    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(intent, field, "changed")
    assert intent.payload == "hello"


@pytest.mark.parametrize(
    "make", [lambda: Intent.new("log", "x", "enqueue"), mail_intent]
)
def test_to_dict_survives_a_json_round_trip(make: t.Callable[[], Intent]) -> None:
    data = make().to_dict()

    assert json.loads(json.dumps(data)) == data


def test_to_dict_gives_plain_types() -> None:
    intent = mail_intent()

    data = intent.to_dict()

    assert set(data) == {"id", "channel", "payload", "source", "created_at"}
    assert all(type(data[key]) is str for key in ("id", "channel", "source"))
    assert type(data["created_at"]) is str
    assert datetime.fromisoformat(data["created_at"]) == intent.created_at
    assert type(data["payload"]) is dict


@pytest.mark.parametrize(
    "make", [lambda: Intent.new("log", "x", "enqueue"), mail_intent]
)
def test_from_dict_rebuilds_an_equal_intent(make: t.Callable[[], Intent]) -> None:
    intent = make()

    assert Intent.from_dict(intent.to_dict()) == intent


def test_from_dict_of_json_rebuilds_an_equal_intent() -> None:
    intent = mail_intent()

    rebuilt = Intent.from_dict(json.loads(json.dumps(intent.to_dict())))

    assert rebuilt == intent
    assert rebuilt.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("key", ["id", "channel", "payload", "source", "created_at"])
def test_from_dict_with_a_missing_key_raises_value_error(key: str) -> None:
    data = Intent.new("log", "x", "enqueue").to_dict()
    del data[key]

    with pytest.raises(ValueError, match=f"needs the key '{key}'"):
        Intent.from_dict(data)


def test_from_dict_with_a_naive_datetime_raises_value_error() -> None:
    data = Intent.new("log", "x", "enqueue").to_dict()
    data["created_at"] = "2024-05-01T12:00:00"

    with pytest.raises(ValueError, match="aware created_at"):
        Intent.from_dict(data)


@pytest.mark.parametrize("created_at", ["yesterday", 1714564800, None])
def test_from_dict_with_a_malformed_datetime_raises_value_error(
    created_at: t.Any,
) -> None:
    data = Intent.new("log", "x", "enqueue").to_dict()
    data["created_at"] = created_at

    with pytest.raises(ValueError):
        Intent.from_dict(data)


def test_intent_with_a_dict_payload_is_hashable() -> None:
    intent = mail_intent()
    rebuilt = Intent.from_dict(intent.to_dict())

    assert hash(intent) == hash(rebuilt)
    assert {intent, rebuilt} == {intent}
    assert {intent: "seen"}[rebuilt] == "seen"


def test_intents_with_different_ids_differ() -> None:
    first = Intent.new("log", "same", "enqueue")
    second = dataclasses.replace(first, id=Intent.new("log", "same", "enqueue").id)

    assert first != second
    assert len({first, second}) == 2


# -- BatchResult --------------------------------------------------------------


def test_batch_result_committed_without_failures_is_ok() -> None:
    intent = Intent.new("log", "x", "enqueue")
    result = BatchResult(committed=True, dispatched=[intent], discarded=[intent])

    assert result.ok is True
    assert bool(result) is True


def test_batch_result_not_committed_is_not_ok() -> None:
    result = BatchResult(committed=False)

    assert result.ok is False
    assert bool(result) is False


def test_batch_result_with_a_failure_is_not_ok() -> None:
    intent = Intent.new("log", "x", "enqueue")
    result = BatchResult(committed=True, failed=[(intent, OSError("down"))])

    assert result.ok is False
    assert bool(result) is False


def test_batch_result_lists_start_empty_and_unshared() -> None:
    first, second = BatchResult(committed=True), BatchResult(committed=True)
    first.dispatched.append(Intent.new("log", "x", "enqueue"))

    assert second.dispatched == []
    assert (second.failed, second.discarded) == ([], [])


# -- id and created_at are made when first read ---------------------------------


def test_created_at_is_the_queue_time_even_when_read_later() -> None:
    before = datetime.now(timezone.utc)
    intent = Intent.new("log", "hello", "enqueue")
    after = datetime.now(timezone.utc)
    time.sleep(0.01)

    assert before <= intent.created_at <= after


def test_id_and_created_at_are_made_once_and_kept() -> None:
    intent = Intent.new("log", "hello", "enqueue")

    assert "id" not in vars(intent)  # not made until read
    first = intent.id
    assert vars(intent)["id"] == first
    assert intent.id is first
    assert intent.created_at is intent.created_at


@pytest.mark.parametrize(
    "copy_of",
    [
        copy.copy,
        copy.deepcopy,
        lambda intent: pickle.loads(pickle.dumps(intent)),
        lambda intent: dataclasses.replace(intent),
    ],
)
def test_an_unread_intent_copies_with_its_id_and_time(
    copy_of: t.Callable[[Intent], Intent],
) -> None:
    intent = Intent.new("log", "hello", "enqueue")

    copied = copy_of(intent)

    assert copied == intent
    assert (copied.id, copied.created_at) == (intent.id, intent.created_at)


def test_an_intent_made_by_its_constructor_is_the_same_as_one_made_new() -> None:
    made = Intent.new("log", "hello", "enqueue")

    built = Intent(made.id, "log", "hello", "enqueue", made.created_at)

    assert built == made
    assert dataclasses.asdict(built) == dataclasses.asdict(made)
    assert repr(built) == repr(made)
