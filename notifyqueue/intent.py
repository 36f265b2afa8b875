"""What travels through the queue: :class:`Intent` and :class:`BatchResult`."""

from __future__ import annotations

import dataclasses
import os
import typing as t
from datetime import datetime, timezone


@dataclasses.dataclass(frozen=True)
class Intent:
    """One rendered notification waiting for (or past) its transaction's commit.

    :param id: 32 hex characters, unique; use it as an idempotency key.
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
        # os.urandom is several times cheaper than uuid4() and as unique.
        return cls(
            os.urandom(16).hex(), channel, payload, source, datetime.now(timezone.utc)
        )

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
    """

    committed: bool
    dispatched: list[Intent] = dataclasses.field(default_factory=list)
    failed: list[tuple[Intent, BaseException]] = dataclasses.field(default_factory=list)
    discarded: list[Intent] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` when the transaction committed and nothing failed."""
        return self.committed and not self.failed

    def __bool__(self) -> bool:
        return self.ok
