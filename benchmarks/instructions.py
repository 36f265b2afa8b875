"""B1 in instructions: the per-intent cost counted by valgrind's callgrind.

Timed figures on a small shared machine move by 10% and more between runs;
the number of instructions a process executes does not. Each side of B1 runs
in a child process (:mod:`.instructions_child`) under ``valgrind
--tool=callgrind``, which counts every instruction the process executes, from
the interpreter's start-up to its exit.

Start-up (imports, :func:`.cases.make_app`, warm-up transactions) costs far
more than the transactions, so each side runs twice, with ``T1`` and ``T2``
transactions of the same size, and the start-up cancels in the difference::

    per transaction = (I(T2) - I(T1)) / (T2 - T1)
    per intent      = (per transaction(side) - per transaction(bare)) / intents

``bare`` being B1's transaction without notifications. Django's
``transaction.on_commit`` doing the same work is counted the same way,
against a Django transaction without the hooks. At 1 intent per transaction
the whole transactions of notifyqueue and the naive queue are also compared,
nothing subtracted.

A count repeats run after run when every run starts alike: the same few
environment variables, among them ``PYTHONHASHSEED=0`` (else string hashes,
and with them the collisions in every dict and set of strings, change from
run to run); a new SQLite file, as ``make_app`` does more work on an old one
(it drops its table); and the same bytecode: a plain run of each side writes
the ``.pyc`` files first and the counted runs write none, since a run that
compiles a changed module executes some 5·10⁷ instructions more than one
that loads it compiled. A run of 2·10⁹ instructions then repeats to within
about a thousand (as does a bare ``python -c`` start-up), a few dozen per
transaction once divided by ``T2 - T1``.

What a count does depend on is where objects land in memory: CPython's type
attribute cache is keyed by the addresses of names, and its allocator takes
other paths as its pools fill. A change that should not matter (another
checkout path, one more environment variable) moves a per-intent figure by
up to 4%, to a figure that then repeats as exactly: read smaller differences
between machines or checkouts as noise.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = "benchmarks.instructions_child"
FLASK_SIDES = ("bare", "notifyqueue", "naive")
DJANGO_SIDES = ("django", "django-bare")
# Each side's transaction without notifications, in its own framework.
BARE = {"notifyqueue": "bare", "naive": "bare", "django": "django-bare"}
# Intents per transaction -> (T1, T2): each run does a few thousand intents.
LENGTHS = {1: (2000, 3000), 100: (20, 40), 1000: (3, 6)}
# Start-up is most of a run's cost, so shorter runs would save little time;
# the difference is still 2,000 intents.
QUICK_LENGTHS = {100: (10, 30)}
CALLGRIND = (
    "--tool=callgrind",
    # Only the total is read: no per-instruction or per-line records.
    "--dump-instr=no",
    "--dump-line=no",
)
# One valgrind process per core of the 2-core machines this runs on; the
# counts do not depend on it.
PARALLEL = 2
TIMEOUT = 900.0

Run = tuple[str, int, int]
"""A child run: side, intents per transaction, transactions."""


def b1_instructions(quick: bool) -> dict[str, t.Any]:
    """Instructions per transaction and per intent of each side of B1, or
    ``{"skipped": reason}`` where valgrind is not installed.

    :param quick: size 100 only, with the shortest runs, and no repeated run.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        reason = "no valgrind command (apt-get install valgrind)"
        print(f"B1 instructions skipped: {reason}", file=sys.stderr)
        return {"skipped": reason}
    sides = list(FLASK_SIDES)
    django_skipped = None
    if importlib.util.find_spec("django") is None:
        django_skipped = 'Django is not installed (pip install -e ".[bench]")'
        print(f"B1 instructions, Django skipped: {django_skipped}", file=sys.stderr)
    else:
        sides += DJANGO_SIDES
    lengths = QUICK_LENGTHS if quick else LENGTHS
    runs = [
        (side, size, n)
        for size, pair in lengths.items()
        for n in pair
        for side in sides
    ]
    # The determinism check: one run counted twice.
    repeated = None if quick else ("notifyqueue", 100, LENGTHS[100][0])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        _run_all([(side, 1, 0) for side in sides], directory, None)
        counts = _run_all(runs + ([repeated] if repeated else []), directory, valgrind)
    seconds = time.perf_counter() - started
    counted = dict(zip(runs, counts[: len(runs)], strict=True))
    rows = []
    for size, (t1, t2) in lengths.items():
        per_transaction = {
            side: (counted[side, size, t2] - counted[side, size, t1]) / (t2 - t1)
            for side in sides
        }
        per_intent = {
            side: (per_transaction[side] - per_transaction[bare]) / size
            for side, bare in BARE.items()
            if side in per_transaction
        }
        row: dict[str, t.Any] = {
            "intents": size,
            "transactions": [t1, t2],
            "instructions per transaction": per_transaction,
            "notifyqueue per intent": per_intent["notifyqueue"],
            "naive per intent": per_intent["naive"],
            "django per intent": per_intent.get("django"),
        }
        row["ratio"] = row["notifyqueue per intent"] / row["naive per intent"]
        if size == 1:
            row["whole transaction ratio"] = (
                per_transaction["notifyqueue"] / per_transaction["naive"]
            )
        rows.append(row)
    result: dict[str, t.Any] = {
        "valgrind": _valgrind_version(valgrind),
        "rows": rows,
        "seconds": round(seconds, 1),
    }
    if repeated:
        side, size, n = repeated
        result["repeated run"] = {
            "side": side,
            "intents": size,
            "transactions": n,
            "instructions": [counted[repeated], counts[-1]],
        }
    if django_skipped:
        result["django skipped"] = django_skipped
    return result


def _environment(counted: bool) -> dict[str, str]:
    """The same few variables for every child, so that no run's start-up
    differs from another's by what the caller's shell happened to hold."""
    environment = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONHASHSEED": "0"}
    if counted:
        environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return environment


def _run_all(runs: list[Run], directory: str, valgrind: str | None) -> list[int]:
    """Run a child for each of ``runs``, :data:`PARALLEL` at a time, each on a
    fresh SQLite file, under callgrind if ``valgrind`` is given: the
    instructions each executed (0 without ``valgrind``).

    A child that fails or outlives :data:`TIMEOUT` raises
    :class:`RuntimeError`; every child still running on the way out is killed.
    """
    environment = _environment(counted=valgrind is not None)
    pending = list(enumerate(runs))
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    counts = [0] * len(runs)

    def path(index: int, suffix: str) -> str:
        # Names of one length, so that the paths' lengths stay out of the counts.
        return f"{directory}/{'c' if valgrind else 'p'}{index:03d}.{suffix}"

    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                index, (side, size, n) = pending.pop(0)
                command = [sys.executable, "-m", CHILD, side, str(size), str(n)]
                if valgrind:
                    out = f"--callgrind-out-file={path(index, 'out')}"
                    command = [valgrind, *CALLGRIND, out, *command]
                with open(path(index, "log"), "wb") as log:
                    process = subprocess.Popen(
                        [*command, path(index, "db")],
                        cwd=ROOT,
                        env=environment,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                running[index] = process, time.monotonic() + TIMEOUT
            time.sleep(0.1)
            for index, (process, deadline) in list(running.items()):
                if process.poll() is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"B1 instructions: {runs[index]} ran over {TIMEOUT} s"
                        )
                    continue
                del running[index]
                if process.returncode != 0:
                    output = Path(path(index, "log")).read_text(errors="replace")
                    raise RuntimeError(
                        f"B1 instructions: {runs[index]} exited with"
                        f" {process.returncode}:\n{output[-3000:]}"
                    )
                if valgrind:
                    counts[index] = _total(Path(path(index, "out")))
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    return counts


def _total(path: Path) -> int:
    """The instructions counted in callgrind's out file ``path``."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"B1 instructions: no total in {path}")


def _valgrind_version(valgrind: str) -> str:
    return subprocess.run(
        [valgrind, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
