"""The app's extensions, created unbound and initialised in :func:`create_app`."""

from __future__ import annotations

from flask_mail import Mail
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from notifyqueue import NotifyQueue


class Base(DeclarativeBase):
    """Typed declarative base: the models subclass it, and ``db`` uses its metadata."""


db = SQLAlchemy(metadata=Base.metadata)
mail = Mail()
notify = NotifyQueue()
