"""The never-twice guard of Celery delivery: one claim per intent id, in Redis.

Celery does not deduplicate equal task ids, and the Redis broker redelivers a
task whose worker did not acknowledge it in time; a durable hand-off may
publish an intent twice. So each execution of ``notifyqueue.deliver`` first
claims its intent here, and marks it done once the channel has sent it.

Two keys per intent, in one hash slot (``{id}``) so a Redis Cluster takes the
script: ``notifyqueue:{id}:state`` holds ``claimed:<token>`` for the lease of
an execution in progress, then ``done``, ``dead`` or ``uncertain`` for
``NOTIFYQUEUE_CELERY_RETAIN`` seconds; ``notifyqueue:{id}:attempts`` counts
the executions that claimed it (retries and redeliveries after a crash alike),
so an intent that kills its worker every time still runs out of attempts.

Cost per task: two round trips (the claim script, then the outcome).
"""

from __future__ import annotations

import dataclasses
import typing as t

if t.TYPE_CHECKING:
    import redis

_CLAIMED = "claimed:"
FINAL = ("done", "dead", "uncertain")
"""The outcomes a guard remembers; an execution that finds one delivers nothing."""

# KEYS: state, attempts. ARGV: claim value, lease ms, retain ms.
# Returns {"claimed", attempt} | {"final", outcome} | {"busy", lease ms left}.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then
  if string.sub(value, 1, 8) == 'claimed:' then
    return {'busy', redis.call('PTTL', KEYS[1])}
  end
  return {'final', value}
end
local attempt = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {'claimed', attempt}
"""

# KEYS: state. ARGV: claim value. Deletes the claim only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclasses.dataclass(frozen=True)
class Claim:
    """What :meth:`Guard.claim` found.

    :param kind: ``"claimed"`` (this execution delivers), ``"final"`` (already
        done, dead or uncertain: deliver nothing) or ``"busy"`` (another
        execution holds the claim: come back when its lease ends).
    :param attempt: for ``"claimed"``, which execution this is (1 first).
    :param outcome: for ``"final"``, the outcome recorded.
    :param wait: for ``"busy"``, seconds until the other claim's lease ends.
    """

    kind: str
    attempt: int = 0
    outcome: str = ""
    wait: float = 0.0


def state_key(intent_id: str) -> str:
    return f"notifyqueue:{{{intent_id}}}:state"


def attempts_key(intent_id: str) -> str:
    return f"notifyqueue:{{{intent_id}}}:attempts"


class Guard:
    """The claims of one Redis database.

    :param url: a ``redis://``, ``rediss://`` or ``unix://`` URL.
    :param timeout: socket connect and read timeout, in seconds.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._client: redis.Redis | None = None

    @property
    def display(self) -> str:
        """The URL without its password, for messages."""
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.url))

    def _redis(self) -> redis.Redis:
        # Made at first use, not at init_app: nothing connects before a fork.
        # redis-py's pool notices a fork and reconnects in the child.
        if self._client is None:
            import redis

            client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                decode_responses=True,
            )
            self._claim_script = client.register_script(_CLAIM)
            self._release_script = client.register_script(_RELEASE)
            self._client = client
        return self._client

    def claim(
        self, intent_id: str, token: str, *, lease: float, retain: float
    ) -> Claim:
        """Claim ``intent_id`` for ``lease`` seconds, unless it is final or held."""
        self._redis()
        kind, value = self._claim_script(
            keys=[state_key(intent_id), attempts_key(intent_id)],
            args=[_CLAIMED + token, _ms(lease), _ms(retain)],
        )
        if kind == "claimed":
            return Claim("claimed", attempt=int(value))
        if kind == "final":
            return Claim("final", outcome=str(value))
        # PTTL is -1 only for a key without expiry, which no claim is.
        return Claim("busy", wait=max(0, int(value)) / 1000)

    def release(self, intent_id: str, token: str) -> bool:
        """Drop this execution's claim (before a retry); ``False`` if not ours."""
        self._redis()
        return bool(
            self._release_script(keys=[state_key(intent_id)], args=[_CLAIMED + token])
        )

    def finish(self, intent_id: str, outcome: str, *, retain: float) -> None:
        """Record a final outcome, kept ``retain`` seconds; forget the count."""
        if outcome not in FINAL:
            raise ValueError(f"Unknown outcome {outcome!r}; use one of {FINAL}.")
        # One round trip; the two need no atomicity (a crash between them
        # leaves a count that expires with its retain).
        pipeline = self._redis().pipeline(transaction=False)
        pipeline.set(state_key(intent_id), outcome, px=_ms(retain))
        pipeline.delete(attempts_key(intent_id))
        pipeline.execute()

    def outcome(self, intent_id: str) -> str | None:
        """The state the guard holds for ``intent_id`` (for the CLI and tests)."""
        value = self._redis().get(state_key(intent_id))
        return None if value is None else str(value)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
