"""One side of B1, run under callgrind by :mod:`.instructions`.

``python -m benchmarks.instructions_child SIDE INTENTS TRANSACTIONS SQLITE_PATH``

SIDE ``bare``, ``notifyqueue`` or ``naive`` runs B1's own transaction
(:func:`.cases._transaction`) on the app of :func:`.cases.make_app`;
``django`` and ``django-bare`` run the same work through Django's
``transaction.on_commit``, with and without the hooks. Each side first does
:data:`WARM_UP` transactions, so that lazy imports, statement caches and the
like land in the start-up that the driver's difference of two runs cancels.
"""

from __future__ import annotations

import functools
import gc
import importlib
import sys
from types import SimpleNamespace

from . import cases

SIDES = (*cases.SIDES, "django", "django-bare")
WARM_UP = 5


def flask_side(side: str, intents: int, transactions: int, path: str) -> None:
    """``transactions`` of B1's transactions of ``intents`` calls for ``side``."""
    from sample_app.extensions import db
    from sample_app.models import Froggy

    app = cases.make_app(f"sqlite:///{path}")
    with app.app_context():
        froggy = db.session.get(Froggy, 1)
        if froggy is None:
            raise RuntimeError(f"make_app left no froggy in {path}")
        colours = [f"c{i}" for i in range(intents)]
        for _ in range(WARM_UP):
            cases._transaction(side, froggy, colours)
        gc.collect()  # as B1's samples start
        for _ in range(transactions):
            cases._transaction(side, froggy, colours)


def django_side(hooks: bool, intents: int, transactions: int, path: str) -> None:
    """``transactions`` transactions of one UPDATE each, with (if ``hooks``) one
    ``transaction.on_commit`` per intent carrying the naive queue's message."""
    # Imported by name: Django ships no type hints, and mypy --strict would
    # otherwise want a stubs package for a benchmark-only dependency.
    django = importlib.import_module("django")
    settings = importlib.import_module("django.conf").settings
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path}},
        INSTALLED_APPS=[],
    )
    django.setup()
    db = importlib.import_module("django.db")
    connection, transaction = db.connection, db.transaction
    with connection.cursor() as cursor:
        # As make_app does for the Flask sides: no fsync at COMMIT.
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("DROP TABLE IF EXISTS froggy")
        cursor.execute("CREATE TABLE froggy (id INTEGER PRIMARY KEY, colour TEXT)")
        cursor.execute("INSERT INTO froggy VALUES (1, 'green')")
    froggy = SimpleNamespace(id=1)
    colours = [f"c{i}" for i in range(intents)]

    def one_transaction() -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE froggy SET colour = %s WHERE id = %s",
                    [colours[-1], froggy.id],
                )
            if hooks:
                for colour in colours:
                    message = f"Froggy colour updated: {froggy.id}; new value: {colour}"
                    transaction.on_commit(functools.partial(cases.sink, message))

    for _ in range(WARM_UP):
        one_transaction()
    gc.collect()
    for _ in range(transactions):
        one_transaction()


def main(argv: list[str]) -> int:
    side, intents, transactions, path = argv
    if side not in SIDES:
        raise ValueError(f"Unknown side {side!r}; sides: {', '.join(SIDES)}.")
    if side.startswith("django"):
        django_side(side == "django", int(intents), int(transactions), path)
    else:
        flask_side(side, int(intents), int(transactions), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
