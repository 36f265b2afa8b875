"""Celery for the sample app, set up as Flask's Celery guide does.

https://flask.palletsprojects.com/en/stable/patterns/celery/

Imported only when a channel is ``"delivery": "celery"`` (for example
``FLASK_FROGGY_MAIL_DELIVERY=celery``), so the sample without it never
imports Celery and needs no broker. :func:`create_app` calls
:func:`celery_init_app` before ``notify.init_app``: notifyqueue finds the
Celery app in ``app.extensions["celery"]`` and registers its task there.
"""

from __future__ import annotations

from flask import Flask

try:
    from celery import Celery, Task
except ImportError as exc:
    raise ImportError(
        "The sample app's Celery delivery needs Celery and redis-py: run"
        ' pip install -e ".[sample,celery]".'
    ) from exc


def celery_init_app(app: Flask) -> Celery:
    """Make the app's Celery app from ``app.config["CELERY"]``.

    Every task runs inside an app context of ``app``, and the Celery app is
    stored in ``app.extensions["celery"]``, where notifyqueue (and the worker
    module, :mod:`sample_app.make_celery`) find it.
    """

    class FlaskTask(Task):  # type: ignore[misc]  # Celery ships no type hints
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
