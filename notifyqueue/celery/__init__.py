"""Celery delivery: intents handed to Celery workers only after COMMIT.

A channel with ``"delivery": "celery"`` publishes each committed intent as a
``notifyqueue.deliver`` task to the Celery app in ``app.extensions["celery"]``
(set up as Flask's Celery guide does). :func:`register` puts the task on a
Celery app; ``init_app`` calls it for you.
"""

from __future__ import annotations

from .guard import Guard
from .publish import TASK_NAME
from .task import register

__all__ = ["TASK_NAME", "Guard", "register"]
