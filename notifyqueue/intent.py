"""What travels through the queue: :class:`Intent` and :class:`BatchResult`."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import typing as t
from datetime import datetime, timezone

# Intent ids: 20 random hex digits drawn once per process, then a 12-digit
# counter. One os.urandom() per id cost a third of queueing an intent (a
# getrandom() system call each); the counter keeps ids apart within a process
# (next() on itertools.count is atomic under the GIL), 80 random bits keep
# processes apart, and a forked child draws its own prefix.
_COUNTER_LIMIT = 16**12
# The prefix and its counter, read together so no id mixes two generations.
_source: tuple[str, t.Iterator[int]] = ("", iter(()))


def _new_source() -> None:
    global _source
    _source = (os.urandom(10).hex(), itertools.count())


_new_source()
os.register_at_fork(after_in_child=_new_source)


_time_ns = time.time_ns
_UTC = timezone.utc
_object_new = object.__new__
# What Intent.new keeps for the two fields it makes only when read.
_QUEUED = "_queued"


class _Lazy:
    """A field of :class:`Intent` made on its first read, then kept.

    :meth:`Intent.new` records the id's prefix and number and the time in
    nanoseconds; turning them into a 32-hex string and an aware datetime
    cost 0.4 µs per intent, which a channel that never reads them (most
    read only the payload) need not pay. A non-data descriptor: once the
    value is in the instance's ``__dict__``, reads find it there without
    calling this; an intent made by ``__init__`` has both fields there from
    the start.
    """

    __slots__ = ("name", "make")

    def __init__(
        self, name: str, make: t.Callable[[tuple[str, int, int]], t.Any]
    ) -> None:
        self.name = name
        self.make = make

    def __get__(self, intent: object, owner: type[t.Any] | None = None) -> t.Any:
        if intent is None:
            return self
        fields = intent.__dict__
        value = fields[self.name] = self.make(fields[_QUEUED])
        return value


def _id_of(queued: tuple[str, int, int]) -> str:
    return f"{queued[0]}{queued[1]:012x}"


def _time_of(queued: tuple[str, int, int]) -> datetime:
    # Whole microseconds, as datetime.now() gives them.
    return datetime.fromtimestamp(queued[2] // 1000 / 1e6, _UTC)


@dataclasses.dataclass(frozen=True)
class Intent:
    """One rendered notification waiting for (or past) its transaction's commit.

    :param id: 32 hex characters, unique; use it as an idempotency key. It
        is not a secret: ids of one process share a prefix and count up.
    :param channel: the name of the channel that delivers it.
    :param payload: what the channel rendered at queue time (``str`` for a log
        channel; a dict with ``subject``, ``body``, ``recipients`` and
        ``sender`` for a mail channel). Treat it as read-only.
    :param source: ``module.qualname`` of the decorated function, or
        ``"enqueue"``.
    :param created_at: when it was queued, an aware UTC datetime.
    """

    id: str
    channel: str
    payload: t.Any
    source: str
    created_at: datetime

    # A dict payload is unhashable; the id alone identifies an intent.
    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def new(cls, channel: str, payload: t.Any, source: str) -> Intent:
        """Make an intent with a fresh id and the current UTC time."""
        return new_intent(channel, payload, source)

    def to_dict(self) -> dict[str, t.Any]:
        """Return the intent as plain JSON types (``created_at`` in ISO 8601)."""
        return {
            "id": self.id,
            "channel": self.channel,
            "payload": self.payload,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> Intent:
        """Rebuild an intent from :meth:`to_dict` output.

        :raises ValueError: if a key is missing or a value has the wrong form.
        """
        try:
            created_at = datetime.fromisoformat(data["created_at"])
            intent = cls(
                str(data["id"]),
                str(data["channel"]),
                data["payload"],
                str(data["source"]),
                created_at,
            )
        except KeyError as exc:
            raise ValueError(
                f"Intent.from_dict() needs the key {exc.args[0]!r}."
            ) from exc
        except TypeError as exc:
            raise ValueError(
                "Intent.from_dict() needs created_at as an ISO 8601 string,"
                f" got {data['created_at']!r}."
            ) from exc
        if created_at.tzinfo is None:
            raise ValueError(
                "Intent.from_dict() needs an aware created_at,"
                f" got {data['created_at']!r}."
            )
        return intent


@dataclasses.dataclass
class BatchResult:
    """What became of one batch of intents.

    :param committed: whether the batch's transaction committed.
    :param dispatched: intents handed to their channels without error, in
        dispatch order.
    :param failed: ``(intent, exception)`` for each intent that failed.
    :param discarded: intents dropped without dispatch: by a savepoint
        rollback inside the transaction, or all of them when it did not commit.
    :param pending: intents handed off to be delivered after the commit
        returned (``"delivery": "background"``), whose outcome is not known
        yet: the ``intent_dispatched`` and ``intent_failed`` signals tell it.
    """

    committed: bool
    dispatched: list[Intent] = dataclasses.field(default_factory=list)
    failed: list[tuple[Intent, BaseException]] = dataclasses.field(default_factory=list)
    discarded: list[Intent] = dataclasses.field(default_factory=list)
    pending: list[Intent] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` when the transaction committed and nothing failed (so far:
        what is ``pending`` may still fail)."""
        return self.committed and not self.failed

    def __bool__(self) -> bool:
        return self.ok


# Set after the class is made: as class attributes in its body, dataclasses
# would take them for the fields' defaults.
Intent.id = _Lazy("id", _id_of)  # type: ignore[assignment]
Intent.created_at = _Lazy("created_at", _time_of)  # type: ignore[assignment]


def new_intent(channel: str, payload: t.Any, source: str) -> Intent:
    """:meth:`Intent.new`, without the class method's look-up: the queue's path.

    Filling ``__dict__`` directly skips the five ``object.__setattr__`` calls
    of a frozen dataclass's ``__init__``; the id and the time are kept raw
    (see :class:`_Lazy`).
    """
    source_ = _source
    number = next(source_[1])
    if number >= _COUNTER_LIMIT:  # after 2.8e14 ids: a fresh prefix
        _new_source()
        source_ = _source
        number = next(source_[1])
    intent = _object_new(Intent)
    fields = intent.__dict__
    fields["channel"] = channel
    fields["payload"] = payload
    fields["source"] = source
    fields[_QUEUED] = (source_[0], number, _time_ns())
    return intent
