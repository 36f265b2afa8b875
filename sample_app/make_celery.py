"""The module a Celery worker of the sample app loads.

Run it with the app's configuration (the same ``FLASK_*`` environment as
``flask --app sample_app run``, ``FLASK_FROGGY_MAIL_DELIVERY=celery``
included)::

    celery -A sample_app.make_celery worker --loglevel INFO

The worker builds the Flask app, so notifyqueue registers its task
``notifyqueue.deliver`` on the Celery app, and each task sends through the
app's own channels and Flask-Mail settings.
"""

from __future__ import annotations

from . import create_app
from .extensions import db
from .logs import log_through_celery

flask_app = create_app()
if "celery" not in flask_app.extensions:
    raise RuntimeError(
        "No channel of the sample app is delivered by Celery, so a worker has"
        " nothing to do: set FLASK_FROGGY_MAIL_DELIVERY=celery (as for the app"
        " itself) before starting it."
    )
celery_app = flask_app.extensions["celery"]
log_through_celery(flask_app)

with flask_app.app_context():
    # create_app() used a connection to create the tables: let each worker
    # process open its own rather than share the parent's across a fork.
    db.engine.dispose()
